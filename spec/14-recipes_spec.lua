-- Sessions, mutexes and elections: clientv3's key layout, shared with
-- etcdctl lock / etcdctl elect and with other processes.
local etcd3 = require "etcd3"
local helper = require "spec.helpers.etcd"
local process = require "spec.helpers.process"
local keys_under, raises = process.keys_under, process.raises

local op = etcd3.op

describe("session", function()
  local cli
  local start_member, stop_member = helper.member_and_client(function(_, c) cli = c end)
  setup(start_member)
  teardown(stop_member)

  it("keeps its lease alive; close revokes it", function()
    local s = assert(cli:session { ttl = 2 })
    assert.are.equal(s.lease.id, s:lease_id())
    assert.matches("^%x+$", s:lease_id())
    assert(cli:put("/session/a", "x", { lease = s:lease_id() }))
    -- past two TTLs the key is still there
    local _, err = s:wait_lost(4.5)
    assert.are.equal("TIMEOUT", err.code)
    assert.is_true(s:alive())
    assert.are.equal(1, assert(cli:get("/session/a")).count)
    assert.is_true(s:close())
    assert.is_false(s:alive())
    assert.is_true(s:wait_lost(0))
    assert.are.equal(0, assert(cli:get("/session/a")).count)
    assert.are.equal(-1, assert(cli:time_to_live(s:lease_id())).ttl)
    assert.is_true(s:close()) -- idempotent
  end)

  it("orphan stops renewing without revoking", function()
    local s = assert(cli:session { ttl = 2 })
    local m = s:mutex("/session/orphan")
    assert(m:lock())
    assert.is_true(s:orphan())
    assert.are.equal(1, assert(cli:get(m:key())).count) -- not revoked
    assert.is_true(s:wait_lost(2 + 2))
    helper.wait_for(function() return assert(cli:get(m:key())).count == 0 end, 5, "the orphaned lease to run out")
    raises("etcd3%.mutex:lock: the session was orphaned", m.lock, m)
  end)

  it("takes over an existing lease", function()
    local lease = assert(cli:grant(2))
    local s = assert(cli:session { lease = lease.id })
    assert.are.equal(lease.id, s:lease_id())
    local _, err = s:wait_lost(3.5)
    assert.are.equal("TIMEOUT", err.code)
    assert.is_true(assert(cli:time_to_live(lease.id)).ttl > 0)
    assert.is_true(s:close())
    local _, nf = cli:session { lease = lease.id }
    assert.are.equal("NOT_FOUND", nf.code)
  end)

  it("raises on bad input and on use once closed", function()
    raises("etcd3%.session: option 'ttl': integer expected", cli.session, cli, { ttl = "10" })
    raises("etcd3%.session: unknown option 'ttls'", cli.session, cli, { ttls = 10 })
    raises("bad argument to 'etcd3%.session' %(options table expected", cli.session, cli, 10)
    raises("etcd3%.session: options 'ttl' and 'lease' exclude each other", cli.session, cli, { ttl = 5, lease = "abc" })
    raises("etcd3%.session: option 'lease': ID", cli.session, cli, { lease = "xyz" })
    raises("etcd3%.session: called without an object", cli.session)
    local s = assert(cli:session { ttl = 5 })
    -- the errors point at the caller's line
    raises("^spec/14%-recipes_spec%.lua:%d+: bad argument #1 to 'etcd3%.session:mutex'", function() s:mutex({}) end)
    raises("^spec/14%-recipes_spec%.lua:%d+: etcd3%.session: unknown option", function() cli:session { x = 1 } end)
    raises("^spec/14%-recipes_spec%.lua:%d+: bad argument #1 to 'etcd3%.mutex:lock'",
      function() s:mutex("/pos"):lock("x") end)
    raises("bad argument #1 to 'etcd3%.session:mutex' %(string expected, got 5%)", s.mutex, s, 5)
    raises("bad argument #1 to 'etcd3%.session:election' %(string expected, got nil%)", s.election, s)
    raises("bad argument #1 to 'etcd3%.session:wait_lost' %(number expected", s.wait_lost, s, "1")
    local m, e = s:mutex("/bad/m"), s:election("/bad/e")
    raises("bad argument #1 to 'etcd3%.mutex:lock' %(number expected, got string%)", m.lock, m, "1")
    raises("etcd3%.mutex:lock: called without an object %(use obj:lock", m.lock)
    raises("bad argument #1 to 'etcd3%.election:campaign' %(string expected, got 1%)", e.campaign, e, 1)
    raises("bad argument #2 to 'etcd3%.election:campaign' %(number expected", e.campaign, e, "v", "1")
    raises("bad argument #1 to 'etcd3%.election:proclaim' %(string expected, got nil%)", e.proclaim, e)
    raises("bad argument #1 to 'etcd3%.observer:next' %(number expected", e:observe().next, e:observe(), "x")
    assert.is_true(s:close())
    raises("^spec/14%-recipes_spec%.lua:%d+: etcd3%.election:campaign: the session was closed",
      function() e:campaign("v") end)
    raises("^spec/14%-recipes_spec%.lua:%d+: etcd3%.session:mutex: the session was closed",
      function() s:mutex("/pos") end)
    for name, fn in pairs { lock = m.lock, try_lock = m.try_lock, unlock = m.unlock } do
      raises("etcd3%.mutex:" .. name .. ": the session was closed", fn, m)
    end
    raises("etcd3%.election:campaign: the session was closed", e.campaign, e, "v")
    raises("etcd3%.election:proclaim: the session was closed", e.proclaim, e, "v")
    raises("etcd3%.election:resign: the session was closed", e.resign, e)
    raises("etcd3%.session:mutex: the session was closed", s.mutex, s, "/bad/m2")
    raises("etcd3%.session:election: the session was closed", s.election, s, "/bad/e2")
  end)
end)

describe("mutex", function()
  local member, cli
  local start_member, stop_member = helper.member_and_client(function(m, c) member, cli = m, c end)
  setup(start_member)
  teardown(stop_member)

  it("writes clientv3's key: prefix/lease in hex without leading zeros, under the lease, in the namespace", function()
    assert(cli:grant(30, { id = "00000000000abc12" }))
    local ns = assert(etcd3.new { endpoints = member.endpoint, namespace = "/ns/" })
    local s = assert(ns:session { lease = "00000000000abc12" })
    local m = s:mutex("layout")
    assert.is_nil(m:revision())
    assert.is_true(m:lock())
    assert.are.equal("layout/abc12", m:key()) -- as the namespaced client sees it
    local out = member:etcdctl("get /ns/layout --prefix -w json")
    assert.matches('"key":"L25zL2xheW91dC9hYmMxMg=="', out) -- base64 of /ns/layout/abc12
    assert.matches('"lease":703506', out)                    -- 0xabc12
    assert.matches('"create_revision":' .. m:revision() .. ',', out)
    assert.is_true(m:unlock())
    assert.is_nil(m:revision())
    assert.are.equal("", member:etcdctl("get /ns/layout --prefix"))
    -- an election: the same layout, the value on the key
    local e = s:election("layout-el")
    assert.is_true(e:campaign("namespaced"))
    assert.are.equal("layout-el/abc12", e:key())
    assert.are.equal("/ns/layout-el/abc12\nnamespaced\n", member:etcdctl("get /ns/layout-el --prefix"))
    assert.are.equal("namespaced", (e:leader()))
    s:close()
    assert.are.equal("", member:etcdctl("get /ns/layout-el --prefix"))
    ns:close()
  end)

  it("guards a write with is_owner()", function()
    local s = assert(cli:session { ttl = 10 })
    local m = s:mutex("/guard")
    local function guarded_put(v)
      return assert(cli:txn():when(m:is_owner()):success(op.put("/guarded", v)):commit()).succeeded
    end
    assert.is_false(guarded_put("before")) -- not held
    assert(m:lock())
    assert.is_true(guarded_put("held"))
    -- someone deletes our key: we no longer own the lock
    assert(cli:delete(m:key()))
    assert.is_false(guarded_put("stolen"))
    assert.are.equal("held", assert(cli:get("/guarded")).kvs[1].value)
    s:close()
  end)

  it("try_lock returns false and leaves nothing while held; lock(0.5) times out and removes its key", function()
    local s1, s2 = assert(cli:session { ttl = 10 }), assert(cli:session { ttl = 10 })
    local m1, m2 = s1:mutex("/held"), s2:mutex("/held")
    assert.is_true(m1:try_lock())
    assert.is_false(m2:try_lock())
    assert.are.same({ m1:key() }, keys_under(cli, "/held/"))
    local _, err = m2:lock(0.5)
    assert.are.equal("TIMEOUT", err.code)
    assert.is_nil(m2:revision())
    assert.are.same({ m1:key() }, keys_under(cli, "/held/"))
    assert(m1:unlock())
    assert.is_true(m2:try_lock())
    s1:close()
    s2:close()
  end)

  it("returns SESSION_EXPIRED at once when the lease is lost while waiting", function()
    local holder = assert(cli:session { ttl = 10 })
    assert(holder:mutex("/expire"):lock())
    local coop = process.cooperative_client(member.endpoint)
    local s = assert(coop:session { ttl = 3 })
    local m = s:mutex("/expire")
    local waiting = process.task(function() return m:lock(60) end)
    waiting.until_(function() return #keys_under(cli, "/expire/") == 2 end, 20, "the waiter's key")
    assert(cli:revoke(s:lease_id()))
    -- well before the lock's own 60 s (the engine hears of it at the next renewal)
    local ok, err = waiting.finish(30)
    assert.is_nil(ok)
    assert.are.equal("SESSION_EXPIRED", err.code)
    holder:close()
    coop:close()
  end)

  it("session:close() while holding frees the lock for the next waiter", function()
    local s = assert(cli:session { ttl = 10 })
    local m = s:mutex("/handover")
    assert(m:lock())
    local child = process.lua([[
      local etcd3 = require "etcd3"
      local cli = assert(etcd3.new { endpoints = "]] .. member.endpoint .. [[" })
      local s = assert(cli:session { ttl = 10 })
      local m = s:mutex("/handover")
      assert(m:lock(60))
      print("locked " .. m:key())
      s:close()
    ]])
    helper.wait_for(function() return #keys_under(cli, "/handover/") == 2 end, 20, "the child's key")
    local mine = m:key()
    assert.is_true(s:close())
    assert.are.equal(0, assert(cli:get(mine)).count)
    local out = child:read("*a")
    child:close()
    assert.matches("exit=0", out)
    assert.matches("locked /handover/%x+", out)
    assert.is_nil(out:find("locked " .. mine, 1, true))
  end)

  it("counts to exactly 150: three processes, 50 locked read-modify-writes each", function()
    assert(cli:put("/counter", "0"))
    -- the same locked read-modify-write loop, here and in both children
    local count = [[
      local cli, m = ...
      for _ = 1, 50 do
        assert(m:lock(120))
        local n = tonumber(assert(cli:get("/counter")).kvs[1].value)
        assert(cli:put("/counter", tostring(n + 1)))
        assert(m:unlock())
      end
    ]]
    local script = [[
      local etcd3 = require "etcd3"
      local cli = assert(etcd3.new { endpoints = "]] .. member.endpoint .. [[" })
      local s = assert(cli:session { ttl = 10 })
      assert(load(]] .. ("%q"):format(count) .. [[))(cli, s:mutex("/count-lock"))
      s:close()
      print("done")
    ]]
    local children = { process.lua(script), process.lua(script) }
    local s = assert(cli:session { ttl = 10 })
    assert(load(count))(cli, s:mutex("/count-lock"))
    for _, child in ipairs(children) do
      local out = child:read("*a")
      child:close()
      assert.matches("done\nexit=0", out)
    end
    assert.are.equal("150", assert(cli:get("/counter")).kvs[1].value)
    assert.are.same({}, keys_under(cli, "/count-lock/"))
    s:close()
  end)

  it("excludes coroutines of one cqueues controller, which keeps running while they wait", function()
    local cqueues = require "cqueues"
    local cq = cqueues.new()
    local inside, most, turns = 0, 0, 0
    for _ = 1, 3 do
      cq:wrap(function()
        local s = assert(cli:session { ttl = 10 })
        local m = s:mutex("/cq-lock")
        for _ = 1, 10 do
          assert(m:lock(60))
          inside = inside + 1
          most = math.max(most, inside)
          cqueues.sleep(0.005) -- the others run meanwhile, and wait
          inside = inside - 1
          turns = turns + 1
          assert(m:unlock())
        end
        s:close()
      end)
    end
    assert(cq:loop(120))
    assert.are.equal(30, turns)
    assert.are.equal(1, most)
  end)

  it("etcdctl lock held: try_lock is false, lock waits until etcdctl's command exits", function()
    local ctl = process.etcdctl(member, "lock /ctl-held sleep 3")
    local theirs = helper.wait_for(function() return keys_under(cli, "/ctl-held/")[1] end, 20, "etcdctl's key")
    local s = assert(cli:session { ttl = 10 })
    local m = s:mutex("/ctl-held")
    assert.is_false(m:try_lock())
    assert.is_true(m:lock(60))
    -- etcdctl unlocked first: its key is gone, ours is the only one
    assert.are.equal(0, assert(cli:get(theirs)).count)
    assert.are.same({ m:key() }, keys_under(cli, "/ctl-held/"))
    helper.wait_for(function() return not process.running(ctl.pid) end, 20, "etcdctl to exit")
    process.stop(ctl)
    s:close()
  end)

  it("held here: etcdctl lock waits until unlock", function()
    local s = assert(cli:session { ttl = 10 })
    local m = s:mutex("/lua-held")
    assert(m:lock())
    local ctl = process.etcdctl(member, "lock /lua-held echo acquired-by-etcdctl")
    helper.wait_for(function() return #keys_under(cli, "/lua-held/") == 2 end, 20, "etcdctl's waiting key")
    assert.is_true(process.running(ctl.pid))
    assert.are.equal("", process.output(ctl))
    assert.is_true(m:unlock())
    helper.wait_for(function() return not process.running(ctl.pid) end, 20, "etcdctl to get the lock and exit")
    assert.matches("acquired%-by%-etcdctl", process.stop(ctl))
    assert.are.same({}, keys_under(cli, "/lua-held/"))
    s:close()
  end)
end)

describe("election", function()
  local member, cli
  local start_member, stop_member = helper.member_and_client(function(m, c) member, cli = m, c end)
  setup(start_member)
  teardown(stop_member)

  it("campaigns, proclaims, resigns; leader() and is_leader() follow", function()
    local s1, s2 = assert(cli:session { ttl = 10 }), assert(cli:session { ttl = 10 })
    local e1, e2 = s1:election("/el"), s2:election("/el")
    local _, none = e1:leader()
    assert.are.equal("NO_LEADER", none.code)
    assert.is_false(e1:is_leader())
    assert.is_true(e1:campaign("one"))
    assert.is_true(e1:is_leader())
    local value, kv = e1:leader()
    assert.are.equal("one", value)
    assert.are.equal(e1:key(), kv.key)
    assert.are.equal("/el/" .. s1:lease_id():gsub("^0+", ""), e1:key())
    assert.is_true(e1:proclaim("one-b"))
    assert.are.equal("one-b", (e2:leader()))
    -- not leading: NOT_LEADER for proclaim and resign
    local _, err = e2:proclaim("two")
    assert.are.equal("NOT_LEADER", err.code)
    _, err = e2:resign()
    assert.are.equal("NOT_LEADER", err.code)
    -- campaign(0.5) while another leads: TIMEOUT, and its key is removed
    _, err = e2:campaign("two", 0.5)
    assert.are.equal("TIMEOUT", err.code)
    assert.are.same({ e1:key() }, keys_under(cli, "/el/"))
    assert.is_true(e1:resign())
    assert.is_false(e1:is_leader())
    _, err = e1:resign()
    assert.are.equal("NOT_LEADER", err.code)
    assert.is_true(e2:campaign("two", 10))
    assert.are.equal("two", (e1:leader()))
    s1:close()
    s2:close()
  end)

  it("proclaim returns NOT_LEADER once another leads", function()
    local s1, s2 = assert(cli:session { ttl = 10 }), assert(cli:session { ttl = 10 })
    local e1, e2 = s1:election("/usurp"), s2:election("/usurp")
    assert(e1:campaign("one"))
    assert(cli:delete(e1:key())) -- e1's key removed behind its back
    assert(e2:campaign("two", 10))
    local _, err = e1:proclaim("one-again")
    assert.are.equal("NOT_LEADER", err.code)
    assert.is_false(e1:is_leader())
    assert.are.equal("two", (e2:leader()))
    s1:close()
    s2:close()
  end)

  it("observe yields each elected or proclaimed value, nothing when a leader resigns alone", function()
    local coop = process.cooperative_client(member.endpoint)
    local s1, s2 = assert(cli:session { ttl = 10 }), assert(coop:session { ttl = 10 })
    local e1, e2 = s1:election("/obs"), s2:election("/obs")
    local obs = e1:observe()
    local _, err = obs:next(0.3)
    assert.are.equal("TIMEOUT", err.code)
    assert(e1:campaign("a"))
    assert.are.equal("a", (obs:next(10)))
    assert(e1:proclaim("a2"))
    assert(e1:proclaim("a3"))
    assert.are.equal("a2", (obs:next(10)))
    assert.are.equal("a3", (obs:next(10)))
    -- a successor is elected when the leader resigns
    local second = process.task(function() return e2:campaign("b", 60) end)
    second.until_(function() return #keys_under(cli, "/obs/") == 2 end, 20, "the second candidate")
    assert(e1:resign())
    assert.is_true(second.finish(30))
    local value, kv = obs:next(10)
    assert.are.equal("b", value)
    assert.are.equal(e2:key(), kv.key)
    -- the last leader resigns: nothing is yielded until the next one
    assert(e2:resign())
    _, err = obs:next(0.5)
    assert.are.equal("TIMEOUT", err.code)
    assert(e1:campaign("c"))
    assert.are.equal("c", (obs:next(10)))
    obs:close()
    local seen = {}
    assert(e1:proclaim("d"))
    for v in e2:observe() do
      seen[#seen + 1] = v
      if #seen == 1 then break end
    end
    assert.are.same({ "d" }, seen)
    s1:close()
    s2:close()
    coop:close()
  end)

  it("returns SESSION_EXPIRED when the lease is lost while campaigning", function()
    local s1 = assert(cli:session { ttl = 10 })
    assert(s1:election("/el-exp"):campaign("one"))
    local coop = process.cooperative_client(member.endpoint)
    local s2 = assert(coop:session { ttl = 3 })
    local e2 = s2:election("/el-exp")
    local waiting = process.task(function() return e2:campaign("two", 60) end)
    waiting.until_(function() return #keys_under(cli, "/el-exp/") == 2 end, 20, "the candidate's key")
    assert(cli:revoke(s2:lease_id()))
    local ok, err = waiting.finish(30)
    assert.is_nil(ok)
    assert.are.equal("SESSION_EXPIRED", err.code)
    assert.is_false(e2:is_leader())
    s1:close()
    coop:close()
  end)

  it("etcdctl elect leading: campaign waits until etcdctl is stopped", function()
    local ctl = process.etcdctl(member, "elect /ctl-el from-etcdctl")
    local e_obs = assert(cli:session { ttl = 10 }):election("/ctl-el")
    helper.wait_for(function() return e_obs:leader() == "from-etcdctl" end, 20, "etcdctl to lead")
    local coop = process.cooperative_client(member.endpoint)
    local s = assert(coop:session { ttl = 10 })
    local e = s:election("/ctl-el")
    local campaign = process.task(function() return e:campaign("from-lua", 60) end)
    campaign.until_(function() return #keys_under(cli, "/ctl-el/") == 2 end, 20, "our candidate key")
    -- still waiting while etcdctl leads
    for _ = 1, 20 do assert.is_false(campaign.step()) end
    assert.are.equal("from-etcdctl", (e_obs:leader()))
    process.stop(ctl) -- SIGINT: etcdctl resigns
    assert.is_true(campaign.finish(30))
    assert.are.equal("from-lua", (e_obs:leader()))
    assert.are.same({ e:key() }, keys_under(cli, "/ctl-el/"))
    e_obs.session:close()
    s:close()
    coop:close()
  end)

  it("leading here: etcdctl elect -l prints the value and each proclaimed value", function()
    local s = assert(cli:session { ttl = 10 })
    local e = s:election("/lua-el")
    assert(e:campaign("v1"))
    local ctl = process.etcdctl(member, "elect -l /lua-el")
    local key = e:key()
    helper.wait_for(function() return process.output(ctl):find(key .. "\nv1\n", 1, true) end, 20, "etcdctl to print v1")
    assert(e:proclaim("v2"))
    helper.wait_for(function() return process.output(ctl):find("\nv2\n", 1, true) end, 20, "etcdctl to print v2")
    assert(e:proclaim("v3"))
    helper.wait_for(function() return process.output(ctl):find("\nv3\n", 1, true) end, 20, "etcdctl to print v3")
    local out = process.stop(ctl)
    assert.are.equal(key .. "\nv1\n" .. key .. "\nv2\n" .. key .. "\nv3\n", out)
    s:close()
  end)
end)

describe("recipes in OpenResty", function()
  local nginx = require "spec.helpers.nginx"
  local member, cli, server

  setup(function()
    member = helper.single()
    cli = assert(etcd3.new { endpoints = member.endpoint })
    server = nginx.start([[
  init_worker_by_lua_block {
    local etcd3 = require "etcd3"
    package.loaded["spec.ngx_state"] = { cli = assert(etcd3.new { endpoints = "]] .. member.endpoint .. [[" }) }
  }
  server {
    listen 127.0.0.1:${PORT};
    location = / { return 200 "up"; }
    location = /up { content_by_lua_block { ngx.say("up") } }
    location = /lock {
      content_by_lua_block {
        local cli = require("spec.ngx_state").cli
        local s = assert(cli:session { ttl = 10 })
        local ok, err = s:mutex("/ngx-lock"):lock(20)
        ngx.say(ok and "locked" or tostring(err))
        s:close()
      }
    }
  }
]])
  end)

  teardown(function() nginx.stop_all(server, cli, member) end)

  it("waits for a lock in a content handler while the worker keeps serving", function()
    local s = assert(cli:session { ttl = 10 })
    local m = s:mutex("/ngx-lock")
    assert(m:lock())
    local finish = server:get_async("/lock", 30)
    helper.wait_for(function() return #keys_under(cli, "/ngx-lock/") == 2 end, 20, "the handler's key")
    -- one worker: it answers while its handler waits for the lock
    assert.are.equal("up\n", (server:get("/up", 5)))
    assert(m:unlock())
    assert.are.equal("locked\n", finish())
    assert.are.same({}, keys_under(cli, "/ngx-lock/"))
    s:close()
  end)
end)
