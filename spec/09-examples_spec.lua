-- The examples run as a user would run them, against a real etcd.
local helper = require "spec.helpers.etcd"

describe("examples", function()
  local member
  setup(function() member = helper.single() end)
  teardown(function() if member then member:stop() end end)

  -- as a user runs them: the plain build of this runtime, no sanitizer
  local function run_example(args)
    local interp = jit and "luajit" or "lua5.4"
    return io.popen(("unset LD_PRELOAD; ETCDCTL_ENDPOINTS=%s LUA_PATH='lua/?.lua;lua/?/init.lua' "
      .. "LUA_CPATH='build/%s/?.so' %s %s 2>&1"):format(member.endpoint, interp, interp, args))
  end

  it("demo.lua prints like etcdctl", function()
    local p = run_example("examples/demo.lua")
    local out = p:read("*a")
    p:close()
    assert.matches("%$ etcdctl get /demo/greeting\n/demo/greeting\nhello\n", out)
    assert.matches("%$ etcdctl del /demo/ %-%-prefix\n4\n", out)
  end)

  it("runs as its header comment says: make run, or tools/env.sh sourced", function()
    local interp = jit and "luajit" or "lua5.4"
    for _, cmd in ipairs {
      ("make -s run SCRIPT=examples/demo.lua LUA=%s"):format(interp),
      ("ETCD3_LUA=%s . tools/env.sh && %s examples/demo.lua"):format(interp, interp),
    } do
      -- a clean environment: no package paths but what the command sets
      local out = helper.capture(("env -u LUA_PATH -u LUA_CPATH -u LUA_PATH_5_4 -u LUA_CPATH_5_4 "
        .. "ETCDCTL_ENDPOINTS=%s sh -c '%s' 2>&1"):format(member.endpoint, cmd))
      assert.matches("%$ etcdctl del /demo/ %-%-prefix\n4\n", out, 1, false)
    end
  end)

  it("registry.lua: two nodes see each other join and leave", function()
    local a = run_example("examples/registry.lua node-a 127.0.0.1:7001 4")
    helper.wait_for(function()
      return #helper.capture("ETCDCTL_API=3 etcdctl --endpoints=" .. member.endpoint ..
        " get /services/game/node-a --print-value-only") > 0
    end, 10, "node-a to register")
    local b = run_example("examples/registry.lua node-b 127.0.0.1:7002 1")
    local out_b = b:read("*a")
    b:close()
    local out_a = a:read("*a")
    a:close()
    assert.matches("present: node%-a at 127%.0%.0%.1:7001", out_b)
    assert.matches("joined: node%-b at 127%.0%.0%.1:7002", out_a)
    assert.matches("left: node%-b", out_a)
    assert.matches("node%-a deregistered", out_a)
    assert.are.equal("", member:etcdctl("get /services/game/ --prefix"))
  end)
end)
