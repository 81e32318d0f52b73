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

  -- Starts a game node in the background; returns its PID and output file.
  local nodes = {}
  local function start_node(name, seconds)
    local interp = jit and "luajit" or "lua5.4"
    local out = os.tmpname()
    local pid = tonumber(helper.capture(("ETCDCTL_ENDPOINTS=%s LUA_PATH='lua/?.lua;lua/?/init.lua' "
      .. "LUA_CPATH='build/%s/?.so' %s examples/game_node.lua %s 127.0.0.1:%d %d > %s 2>&1 & echo $!")
      :format(member.endpoint, interp, interp, name, 7000 + #nodes, seconds, out)))
    nodes[#nodes + 1] = { pid = pid, out = out, name = name }
    return nodes[#nodes]
  end
  local function output(node)
    local f = io.open(node.out)
    local s = f and f:read("*a") or ""
    if f then f:close() end
    return s
  end
  local function count(s, pattern)
    local n = 0
    for _ in s:gmatch(pattern) do n = n + 1 end
    return n
  end
  teardown(function()
    for _, node in ipairs(nodes) do
      helper.sh("kill -CONT " .. node.pid .. " 2>/dev/null; kill -9 " .. node.pid .. " 2>/dev/null")
    end
  end)

  it("game_node.lua: two nodes see each other join and leave", function()
    local a = start_node("node-a", 8)
    helper.wait_for(function() return output(a):find("registered", 1, true) end, 15, "node-a to register")
    local b = start_node("node-b", 2)
    helper.wait_for(function() return output(b):find("deregistered", 1, true) end, 40, "node-b to finish")
    helper.wait_for(function() return output(a):find("deregistered", 1, true) end, 40, "node-a to finish")
    assert.matches("present: node%-a at 127%.0%.0%.1:7000", output(b))
    assert.matches("joined: node%-b at 127%.0%.0%.1:7001", output(a))
    assert.matches("left: node%-b", output(a))
    assert.are.equal("", member:etcdctl("get /game/nodes/ --prefix"))
  end)

  it("game_node.lua: five nodes see a killed one leave within TTL + 1 s, a stopped one leave and join again", function()
    local five = {}
    for i = 1, 5 do five[i] = start_node("n" .. i, 120) end
    for i = 1, 5 do
      helper.wait_for(function()
        local s = output(five[i])
        return count(s, "present: ") + count(s, "joined: ") >= 5
      end, 60, "n" .. i .. " to see all five")
    end
    -- kill -9: the lease runs out (TTL 5 s), etcd deletes the key
    helper.sh("kill -9 " .. five[5].pid)
    local killed = helper.now()
    helper.wait_for(function()
      for i = 1, 4 do if not output(five[i]):find("left: n5", 1, true) then return false end end
      return true
    end, 5 + 1, "the others to see n5 leave within TTL + 1 s")
    print(("\n[game nodes] n5 left for all others %.1f s after kill -9 (TTL 5 s)"):format(helper.now() - killed))
    -- SIGSTOP beyond the TTL: gone for the others; SIGCONT: back by itself
    local joined_before = {}
    for i = 1, 3 do joined_before[i] = count(output(five[i]), "joined: n4") end
    helper.sh("kill -STOP " .. five[4].pid)
    helper.wait_for(function()
      for i = 1, 3 do if not output(five[i]):find("left: n4", 1, true) then return false end end
      return true
    end, 5 + 3, "the others to see the stopped n4 leave")
    helper.sh("kill -CONT " .. five[4].pid)
    helper.wait_for(function()
      for i = 1, 3 do if count(output(five[i]), "joined: n4") <= joined_before[i] then return false end end
      return true
    end, 10, "the others to see n4 join again")
    for i = 1, 4 do helper.sh("kill -9 " .. five[i].pid) end
  end)
end)
