-- etcd3.testing as a user's spec uses it: start, client, kill, freeze,
-- thaw, restart, leader, stop (nothing left behind), auth and TLS, and
-- examples/testing_spec.lua (the README's example) run by busted.
local testing = require "etcd3.testing"
local etcd3 = require "etcd3"
local helper = require "spec.helpers.etcd"
local process = require "spec.helpers.process"

local INTERP = jit and "luajit" or "lua5.4"

local function q(s) return "'" .. s:gsub("'", "'\\''") .. "'" end

--- start() with every PID it starts recorded (for the runner, and for
-- the spec to check they are gone): the cluster and its PIDs.
local function start(opts)
  local pids = {}
  opts.on_start = function(pid)
    helper.record_pid(pid)
    pids[#pids + 1] = pid
  end
  return testing.start(opts), pids
end

local state = process.state
local function gone(pid) return not process.running(pid) end

local function exists(path)
  local f = io.open(path)
  if f then f:close() end
  return f ~= nil
end

--- Fails unless every PID is gone and the cluster's directory removed.
local function assert_clean(dir, pids)
  assert.is_false(exists(dir), dir .. " is still there")
  for _, pid in ipairs(pids) do assert.is_true(gone(pid), "etcd " .. pid .. " still runs") end
end

describe("etcd3.testing", function()
  it("starts one member a client reads and writes, and stop leaves nothing", function()
    local c, pids = start {}
    local dir = c.dir
    finally(function() c:stop() end)
    assert.are.equal(1, #c.endpoints)
    assert.truthy(c.endpoints[1]:match("^http://127%.0%.0%.1:%d+$"))
    assert.are.equal(1, #pids)
    local cli = c:client { timeout = 10 }
    assert(cli:put("/t/a", "1"))
    assert.are.equal("1", assert(cli:get("/t/a")).kvs[1].value)
    cli:close()
    c:stop()
    assert_clean(dir, pids)
    c:stop() -- idempotent
  end)

  it("stops on __gc (and on <close> on Lua 5.4)", function()
    local c, pids = start {}
    local dir = c.dir
    c = nil -- luacheck: ignore
    collectgarbage()
    collectgarbage()
    assert_clean(dir, pids)
    if _VERSION == "Lua 5.4" then
      local seen = {}
      assert(load([[
        local testing, seen = ...
        local c <close> = testing.start { on_start = function(pid) seen[#seen + 1] = pid end }
        seen.dir = c.dir
      ]]))(testing, seen)
      assert_clean(seen.dir, seen)
    end
  end)

  it("kills, restarts, freezes and thaws members of 3, and finds the leader", function()
    local c, pids = start { members = 3 }
    local dir = c.dir
    finally(function() c:stop() end)
    assert.are.equal(3, #c.endpoints)
    local cli = c:client { timeout = 10 }
    assert(cli:put("/t/k", "v1"))
    local leader = c:leader()
    assert.is_true(leader >= 1 and leader <= 3)
    -- the leader killed: the others elect another one, and serve writes
    c:kill(leader)
    assert.is_true(gone(pids[leader]))
    local other = c:leader()
    assert.are_not.equal(leader, other)
    assert(cli:put("/t/k", "v2"))
    -- it comes back on the same ports and data
    c:restart(leader)
    local back = assert(etcd3.new { endpoints = c.endpoints[leader] })
    helper.wait_for(function()
      local r = back:get("/t/k", { serializable = true })
      return r and r.kvs[1] and r.kvs[1].value == "v2"
    end, 30, "the restarted member to catch up")
    back:close()
    -- a frozen follower is stopped (state T) until thawed
    local now_leader = c:leader()
    local follower = now_leader % 3 + 1
    local pid = c.members[follower].pid
    c:freeze(follower)
    helper.wait_for(function() return state(pid) == "T" end, 10, "the member to stop")
    -- the others still commit (written through the leader: a client whose
    -- member is frozen waits for its deadline, as with a dead host)
    local on_leader = c:client { endpoints = c.endpoints[now_leader], timeout = 10 }
    assert(on_leader:put("/t/k", "v3"))
    on_leader:close()
    c:thaw(follower)
    helper.wait_for(function() return state(pid) ~= "T" end, 10, "the member to go on")
    cli:close()
    local all = {}
    for _, m in ipairs(c.members) do all[#all + 1] = m.pid end
    c:stop()
    assert_clean(dir, all)
  end)

  it("makes an auth-enabled member whose client carries the credentials", function()
    local c = start { auth = { "root", "t3st-pw" } }
    finally(function() c:stop() end)
    local cli = c:client()
    assert(cli:put("/t/auth", "yes"))
    assert.is_true(assert(cli:auth_status()).enabled)
    cli:close()
    local anonymous = assert(etcd3.new { endpoints = c.endpoints })
    local res, err = anonymous:put("/t/auth", "no")
    assert.is_nil(res)
    assert.is_not_nil(err)
    anonymous:close()
    local wrong = etcd3.new(c:config { password = "wrong" })
    assert.is_nil(wrong)
  end)

  it("makes a TLS member that demands the client certificate it made", function()
    local c = start { tls = true }
    local dir = c.dir
    finally(function() c:stop() end)
    assert.truthy(c.endpoints[1]:match("^https://127%.0%.0%.1:%d+$"))
    assert.truthy(c.tls.ca:find(dir, 1, true) == 1, "the CA is in the cluster's temp dir")
    local cli = c:client()
    assert(cli:put("/t/tls", "yes"))
    assert.are.equal("yes", assert(cli:get("/t/tls")).kvs[1].value)
    cli:close()
    local no_cert = etcd3.new { endpoints = c.endpoints, tls = { ca = c.tls.ca }, dial_timeout = 3 }
    assert.is_nil(no_cert)
    c:stop()
    assert.is_false(exists(dir))
  end)

  it("runs examples/testing_spec.lua (the README's example) under busted", function()
    -- busted re-runs itself under --lua (and .busted's lua) without
    -- quoting its arguments: this run's module path is one plain word
    local cpath = package.cpath:match("^[^;]+")
    local cmd = ("%s busted --lua=%s --cpath=%s -o TAP examples/testing_spec.lua 2>&1; echo \"exit $?\"")
      :format(helper.child_env, INTERP, q(cpath))
    local p = assert(io.popen(cmd))
    local out = p:read("*a")
    p:close()
    assert.truthy(out:match("exit 0\n?$"), out)
    assert.truthy(out:find("ok 1 ", 1, true), out)
    -- README.md shows this file as it is (after its two comment lines)
    local function read(path) local f = assert(io.open(path)); local t = f:read("*a"); f:close(); return t end
    local example = read("examples/testing_spec.lua"):gsub("^%-%-[^\n]*\n%-%-[^\n]*\n", "")
    assert.truthy(read("README.md"):find("```lua\n" .. example .. "```", 1, true),
      "README.md's \"Testing your code\" differs from examples/testing_spec.lua")
  end)
end)
