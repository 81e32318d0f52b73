-- client:register: a key the engine keeps under a lease by itself, even
-- while the Lua code makes no call at all (another OS process spinning in
-- a pure-Lua loop, or stopped with SIGSTOP beyond its TTL).
local helper = require "spec.helpers.etcd"
local etcd3 = require "etcd3"

describe("registration", function()
  local member, cli
  local children = {}

  local start_member, stop_member = helper.member_and_client(function(m, c) member, cli = m, c end)
  setup(start_member)
  teardown(function()
    for _, pid in ipairs(children) do helper.sh("kill -CONT " .. pid .. "; kill -9 " .. pid .. " 2>/dev/null") end
    stop_member()
  end)

  local function value_of(key)
    return member:etcdctl("get " .. key .. " --print-value-only"):gsub("\n$", "")
  end

  -- Starts `script` in another process of this runtime; returns its PID and
  -- the file its output goes to.
  local function spawn(script)
    local out = os.tmpname()
    local pid = tonumber(helper.capture(helper.lua_command(script) .. " > " .. out .. " 2>&1 & echo $!"))
    children[#children + 1] = pid
    return pid, out
  end

  local function read_file(path)
    local f = io.open(path)
    local s = f and f:read("*a") or ""
    if f then f:close() end
    return s
  end

  local function spinning_node(key, ttl)
    return ([[
      local etcd3 = require "etcd3"
      local cli = assert(etcd3.new { endpoints = %q })
      local reg = assert(cli:register(%q, "up", { ttl = %d }))
      io.write("lease ", reg:lease_id(), "\n"); io.flush()
      local x, stop = 0, os.time() + 60
      while os.time() < stop do x = x + 1 end -- no library call from here on
    ]]):format(member.endpoint, key, ttl)
  end

  it("puts the key under a lease and keeps it alive; set and close", function()
    local reg = assert(cli:register("/reg/a", "v1", { ttl = 2 }))
    assert.is_true(reg:alive())
    assert.matches("^%x+$", reg:lease_id())
    assert.are.equal("v1", value_of("/reg/a"))
    local res = assert(cli:get("/reg/a"))
    assert.are.equal(reg:lease_id(), res.kvs[1].lease)
    local id = reg:lease_id()
    -- beyond the TTL: renewed by the engine
    local until_t = helper.now() + 3
    helper.wait_for(function() return helper.now() > until_t end, 5, "3 s to pass")
    assert.are.equal("v1", value_of("/reg/a"))
    assert.is_true(reg:set("v2"))
    assert.are.equal("v2", value_of("/reg/a"))
    assert.are.equal(id, reg:lease_id())
    assert.is_true(reg:close())
    assert.is_false(reg:alive())
    assert.are.equal("", value_of("/reg/a"))
    assert.matches("expired", member:etcdctl("lease timetolive " .. id))
    assert.is_true(reg:close()) -- idempotent
  end)

  it("comes back by itself after a revoke while its process spins in pure Lua", function()
    local _, out = spawn(spinning_node("/reg/spin", 10))
    local lease = helper.wait_for(function() return read_file(out):match("lease (%x+)") end, 15,
      "the node to register")
    assert.are.equal("up", value_of("/reg/spin"))
    member:etcdctl("lease revoke " .. lease)
    local revoked_at = helper.now()
    helper.wait_for(function()
      local res = cli:get("/reg/spin")
      return res and res.kvs[1] and res.kvs[1].lease ~= lease
    end, 2, "the key to come back under a new lease within 2 s")
    print(("\n[registration] back %.0f ms after the revoke"):format((helper.now() - revoked_at) * 1000))
  end)

  it("comes back by itself after SIGSTOP beyond its TTL and SIGCONT", function()
    local pid, out = spawn(spinning_node("/reg/stopped", 2))
    helper.wait_for(function() return read_file(out):match("lease (%x+)") end, 15, "the node to register")
    helper.sh("kill -STOP " .. pid)
    helper.wait_for(function() return value_of("/reg/stopped") == "" end, 10, "the lease to expire")
    helper.sh("kill -CONT " .. pid)
    helper.wait_for(function() return value_of("/reg/stopped") == "up" end, 5, "the key to come back")
  end)

  it("applies the namespace", function()
    local ns = assert(etcd3.new { endpoints = member.endpoint, namespace = "/tenant" })
    local reg = assert(ns:register("/reg/n", "v"))
    assert.are.equal("v", value_of("/tenant/reg/n"))
    assert.is_true(reg:close())
    assert.are.equal("", value_of("/tenant/reg/n"))
    ns:close()
  end)

  it("gives up within its timeout when no member answers, leaving nothing behind", function()
    local dead = assert(etcd3.new { endpoints = "127.0.0.1:1", dial_timeout = 0 })
    local t0 = helper.now()
    local reg, err = dead:register("/reg/x", "v", { timeout = 0.5 })
    assert.is_nil(reg)
    assert.are.equal("TIMEOUT", err.code)
    assert.is_true(helper.now() - t0 < 1.5)
    dead:close()
  end)

  it("raises on bad arguments and after close", function()
    assert.error_matches(function() cli:register(1, "v") end, "bad argument #1 to 'etcd3.register'", nil, true)
    assert.has_error(function() cli:register("/k", nil) end)
    assert.has_error(function() cli:register("/k", "v", { ttl = "x" }) end)
    assert.has_error(function() cli:register("/k", "v", { bogus = 1 }) end)
    assert.has_error(function() cli:register("/k", "v", { ttl = 0 }) end)
    local reg = assert(cli:register("/reg/b", "v"))
    assert.is_true(reg:close())
    assert.error_matches(function() reg:set("v2") end, "etcd3.registration:set: registration is closed", nil, true)
    assert.has_error(function() reg:lease_id() end)
    assert.has_error(function() reg.set({}, "v") end)
  end)

  it("survives being collected while registered, and a client closed under it", function()
    local c2 = assert(etcd3.new { endpoints = member.endpoint })
    local reg = assert(c2:register("/reg/gc", "v", { ttl = 2 }))
    c2:close()
    assert.is_false(reg:alive())
    reg = nil -- luacheck: ignore
    collectgarbage(); collectgarbage()
    local c3 = assert(etcd3.new { endpoints = member.endpoint })
    assert(c3:register("/reg/gc2", "v", { ttl = 2 }))
    c3 = nil -- luacheck: ignore
    collectgarbage(); collectgarbage()
  end)
end)
