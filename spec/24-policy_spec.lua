-- The request policy (src/policy.h) that Lua's calls and the engine's
-- background services share: re-authentication when a token expired
-- (simple tokens that live --auth-token-ttl seconds after their last use,
-- and die with the member), the retry rules, and members that auto_sync
-- found removed.
--
-- An expired token cannot be waited for as a condition: any request that
-- looked would renew it. The tests leave the client idle for longer than
-- the token's TTL (TOKEN_TTL + 1 s) instead.
local etcd3 = require "etcd3"
local core = require "etcd3.core"
local helper = require "spec.helpers.etcd"
local proxy = require "spec.helpers.proxy"

local TOKEN_TTL = 2
local ROOT_PW, NODE_PW = "r00t-s3cret", "n0de-s3cret"

local function let_token_expire()
  core.sleep(TOKEN_TTL + 1)
end

-- The value and lease of `key` as etcdctl sees it (nil when absent).
local function etcdctl_get(member, key)
  local out = member:etcdctl("get -w json " .. key)
  local value = out:match('"value":"([^"]*)"')
  return value and helper.unbase64(value), out:match('"lease":(%d+)')
end

describe("request policy under an expired token", function()
  local member, admin

  setup(function()
    member = helper.single { extra = { "--auth-token-ttl", tostring(TOKEN_TTL) } }
    local cli = assert(etcd3.new { endpoints = member.endpoint })
    assert(cli:user_add("root", ROOT_PW))
    assert(cli:user_grant_role("root", "root"))
    -- a game node's user: its role covers its own prefix only
    assert(cli:role_add("nodes"))
    assert(cli:role_grant_permission("nodes", "readwrite", "/svc/", { prefix = true }))
    assert(cli:user_add("node", NODE_PW))
    assert(cli:user_grant_role("node", "nodes"))
    assert(cli:auth_enable())
    cli:close()
    member.auth = "root:" .. ROOT_PW -- for the helper's etcdctl
    admin = assert(etcd3.new { endpoints = member.endpoint, user = "root", password = ROOT_PW })
  end)
  teardown(function()
    if admin then admin:close() end
    if member then member:stop() end
  end)

  for _, who in ipairs { { "root", ROOT_PW }, { "node", NODE_PW } } do
    it("re-creates a registration after its lease is revoked, for " .. who[1], function()
      local cli = assert(etcd3.new { endpoints = member.endpoint, user = who[1], password = who[2] })
      finally(function() cli:close() end)
      local key = "/svc/reg-" .. who[1]
      local reg = assert(cli:register(key, "up", { ttl = 5 }))
      helper.wait_for(function() return reg:alive() end, 5, "the registration")
      local first = reg:lease_id()
      let_token_expire()
      member:etcdctl("lease revoke " .. first)
      local revoked = core.now()
      local back = helper.wait_for(function()
        local value, lease = etcdctl_get(member, key)
        return value == "up" and lease and ("%x"):format(tonumber(lease)) ~= first:gsub("^0+", "")
          and core.now()
      end, 5, "the key back under a new lease")
      assert.is_true(back - revoked < 2, ("took %.2f s"):format(back - revoked))
      helper.wait_for(function() return reg:alive() end, 5, "alive again")
      assert.are_not.equal(first, reg:lease_id())
      assert.is_true(reg:close())
    end)
  end

  it("resumes a watch exactly once when its stream breaks while the token is expired", function()
    local p = proxy.start(member.endpoint)
    local cli = assert(etcd3.new { endpoints = p.endpoint, user = "root", password = ROOT_PW })
    finally(function()
      member:signal("CONT")
      cli:close()
      p:stop()
    end)
    local w = assert(cli:watch("/svc/w/", { prefix = true }))
    assert(admin:put("/svc/w/1", "a"))
    assert.are.equal("a", assert(w:next(5)).kv.value)
    let_token_expire()
    p:stop() -- the stream breaks; the member freezes for a second meanwhile
    member:signal("STOP")
    core.sleep(1)
    member:signal("CONT")
    p:start()
    assert(admin:put("/svc/w/2", "b"))
    local ev = assert(w:next(10))
    assert.are.equal("/svc/w/2", ev.kv.key)
    assert.are.equal("TIMEOUT", select(2, w:next(0.5)).code)
    w:cancel()
  end)

  it("resumes a watch exactly once after a restart forgot every token", function()
    local cli = assert(etcd3.new { endpoints = member.endpoint, user = "root", password = ROOT_PW })
    finally(function() cli:close() end)
    local w = assert(cli:watch("/svc/rw/", { prefix = true }))
    assert(admin:put("/svc/rw/1", "a"))
    assert.are.equal("a", assert(w:next(5)).kv.value)
    member:kill()
    member:start()
    member:wait_healthy()
    assert(admin:put("/svc/rw/2", "b"))
    assert.are.equal("/svc/rw/2", assert(w:next(10)).kv.key)
    assert.are.equal("TIMEOUT", select(2, w:next(0.5)).code)
    w:cancel()
  end)

  it("locks a mutex of a session made before the token expired", function()
    local cli = assert(etcd3.new { endpoints = member.endpoint, user = "node", password = NODE_PW })
    finally(function() cli:close() end)
    local session = assert(cli:session { ttl = 5 })
    let_token_expire()
    local mutex = session:mutex("/svc/lock")
    assert(mutex:lock(5))
    assert.is_true(session:alive())
    assert(mutex:unlock())
    assert(session:close())
  end)

  it("keeps a lease alive across three token lifetimes", function()
    local cli = assert(etcd3.new { endpoints = member.endpoint, user = "node", password = NODE_PW })
    finally(function() cli:close() end)
    local lease = assert(cli:grant(3))
    assert(lease:keepalive())
    local until_ = core.now() + 3 * TOKEN_TTL + 1
    helper.wait_for(function()
      assert.is_true(lease:alive(), "lease lost")
      return core.now() > until_
    end, 3 * TOKEN_TTL + 5, "three token lifetimes")
    assert.matches("remaining%(%d+s%)", member:etcdctl("lease timetolive " .. lease.id))
    assert(cli:put("/svc/leased", "x", { lease = lease.id }))
    assert(lease:revoke())
  end)

  it("keeps a mirror current after the token expired", function()
    local cli = assert(etcd3.new { endpoints = member.endpoint, user = "node", password = NODE_PW })
    finally(function() cli:close() end)
    assert(admin:put("/svc/m/a", "1"))
    local m = assert(cli:mirror("/svc/m/"))
    assert.are.equal("1", m:get("/svc/m/a"))
    let_token_expire()
    assert(admin:put("/svc/m/b", "2"))
    helper.wait_for(function()
      m:update(0.2)
      return m:get("/svc/m/b") == "2"
    end, 10, "the mirror to see the put")
    m:close()
  end)

  it("returns a wrong password as etcd's error, without retrying it", function()
    local cli, err = etcd3.new { endpoints = member.endpoint, user = "node", password = "wrong" }
    assert.is_nil(cli)
    assert.are.equal("INVALID_ARGUMENT", err.code)
    assert.matches("invalid user ID or password", err.message)
  end)
end)

describe("request policy: retries", function()
  local cluster

  setup(function() cluster = helper.cluster(3) end)
  teardown(function() if cluster then cluster.stop() end end)

  --- A client whose first endpoint is `p` (a proxy in front of member 1),
  -- waiting with `wait`, connected through the proxy; closed, and the
  -- proxy stopped, when the test ends.
  local function through_proxy(p, wait)
    local cli = assert(etcd3.new {
      endpoints = { p.endpoint, cluster.endpoints[2], cluster.endpoints[3] }, dial_timeout = 0, wait = wait,
    })
    finally(function()
      cli:close()
      p:stop()
    end)
    assert(cli:get("/put/warm", { timeout = 20 })) -- connects through the proxy
    assert.are.equal(1, cli._core:pick())
    return cli
  end

  it("moves a get to another member when its member dies", function()
    -- (busted keeps one finally per test: it does every cleanup)
    local cli = assert(etcd3.new { endpoints = cluster.endpoints })
    assert(cli:put("/get/k", "v"))
    local first = cli._core:pick()
    local victim = cluster.members[first]
    finally(function()
      cli:close()
      victim:start()
      victim:wait_healthy()
    end)
    victim:kill()
    assert.are.equal("v", assert(cli:get("/get/k")).kvs[1].value)
    assert.are_not.equal(first, cli._core:pick())
  end)

  it("does not retry a put that may have reached a member, and returns its error", function()
    -- member 1 behind a proxy that hands its answers over 2.5 s late; while
    -- the put waits for its answer, once etcd has applied it, the proxy is
    -- killed: the connection breaks (UNAVAILABLE) well inside the deadline.
    -- A retry on another member would succeed and apply it twice.
    local p = proxy.start(cluster.endpoints[1], { delay = 2.5 })
    local putting, cut = false, false
    local function applied()
      local out = cluster.members[2]:etcdctl("get -w json /put/k")
      return out:match('"version":') and out
    end
    local cli = through_proxy(p, function(_, timeout, op)
      if putting and not cut then
        helper.wait_for(applied, 10, "the put applied")
        p:stop()
        cut = true
      end
      op:wait(math.min(timeout, 0.05))
    end)
    putting = true
    local res, err = cli:put("/put/k", "v", { timeout = 20 })
    assert.is_true(cut)
    assert.is_nil(res)
    assert.are.equal("UNAVAILABLE", err.code)
    assert.are.equal("1", applied():match('"version":(%d+)'))
  end)

  it("moves the next request on when a put's own wait ran into its deadline", function()
    -- member 1 black-holed: the put's wait reaches its deadline before
    -- gRPC's own deadline timer answers (on a loaded machine it lags), so
    -- the timeout is seen by the wait, not by gRPC. Either way the member
    -- failed it, and the next request must start elsewhere (a loaded CI
    -- machine once spent 30 s of puts on an isolated member).
    local p = proxy.start(cluster.endpoints[1])
    local cli = through_proxy(p, function(_, timeout, op) op:wait(math.min(timeout, 0.05)) end)
    p:blackhole()
    local res, err = cli:put("/put/late", "v", { timeout = 0.3 })
    assert.is_nil(res)
    assert.are.equal("DEADLINE_EXCEEDED", err.code)
    assert.are_not.equal(1, cli._core:pick())
    assert(cli:put("/put/late", "w", { timeout = 10 }))
  end)

  it("retries a put that never left (no connection to its first endpoint)", function()
    local cli = assert(etcd3.new {
      endpoints = { "127.0.0.1:1", cluster.endpoints[1] }, dial_timeout = 0,
    })
    finally(function() cli:close() end)
    assert(cli:put("/put/never-sent", "v"))
    assert.are.equal("v", (etcdctl_get(cluster.members[1], "/put/never-sent")))
  end)

  it("never sends a background service to a member auto_sync found removed", function()
    -- another cluster's member, listed second: once auto_sync retires it,
    -- the registration's put must go to the cluster's other members
    local stranger = helper.single()
    local first = cluster.members[1]
    local cli
    finally(function()
      if cli then cli:close() end
      stranger:stop()
      if not first.pid then
        first:start()
        first:wait_healthy()
      end
    end)
    -- (lazily connected: requests start on the first endpoint, whichever
    -- connects first, so auto_sync asks the cluster, not the stranger)
    cli = assert(etcd3.new {
      endpoints = { cluster.endpoints[1], stranger.endpoint }, auto_sync = 0.1, dial_timeout = 0,
    })
    assert(cli:get("/sync/warm")) -- the first request syncs
    helper.wait_for(function()
      cli:get("/sync/warm")
      return #cli:endpoints() == 3
    end, 10, "auto_sync")
    local reg = assert(cli:register("/sync/reg", "v1", { ttl = 5 }))
    helper.wait_for(function() return reg:alive() end, 5, "the registration")
    first:kill()
    assert(reg:set("v2", { timeout = 8 }))
    assert.are.equal("v2", (etcdctl_get(cluster.members[2], "/sync/reg")))
    assert.is_nil((etcdctl_get(stranger, "/sync/reg")))
    assert.is_true(reg:close())
  end)
end)
