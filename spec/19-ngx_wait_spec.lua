-- OpenResty waits that the completion itself wakes (API.md, "OpenResty"),
-- in Debian's nginx + lua-nginx-module (LuaJIT) against a real etcd: an
-- idle worker with many waiting watches sleeps, one put wakes them all,
-- calls never fall back to ngx.sleep, and a reload does not hang on waits.
local helper = require "spec.helpers.etcd"
local nginx = require "spec.helpers.nginx"
local core = require "etcd3.core"

--- CPU seconds (all threads) of a process, from /proc/PID/stat.
local function cpu_seconds(pid)
  local f = assert(io.open("/proc/" .. pid .. "/stat"))
  local stat = f:read("*a")
  f:close()
  -- fields after the command name (which may hold spaces): state is 3rd
  local rest = stat:match("%) (.*)$")
  local fields = {}
  for v in rest:gmatch("%S+") do fields[#fields + 1] = v end
  -- utime and stime are fields 14 and 15 of the whole line (12, 13 here)
  return (tonumber(fields[12]) + tonumber(fields[13])) / tonumber(helper.capture("getconf CLK_TCK"))
end

--- How often the main thread of a process went to sleep by itself (each
-- wait in epoll that blocked counts once).
local main_thread_wakes = require("spec.helpers.process").main_thread_wakes

--- Whether the process is gone (an exited child the master has not reaped
-- yet counts as gone).
local function gone(pid)
  local f = io.open("/proc/" .. pid .. "/status")
  if not f then return true end
  local status = f:read("*a")
  f:close()
  return status:match("State:%s*Z") ~= nil
end

describe("OpenResty waits woken by the completion", function()
  local member, server

  setup(function()
    member = helper.single()
    assert.matches("OK", member:etcdctl("put /nw/get value-1"))
    server = nginx.start([[
  init_worker_by_lua_block {
    local etcd3 = require "etcd3"
    local state = { sleeps = 0, waiting = 0 }
    package.loaded["spec.ngx_wait_state"] = state
    -- counts every ngx.sleep (the polling fallback would call it)
    local sleep = ngx.sleep
    ngx.sleep = function(s)
      state.sleeps = state.sleeps + 1
      return sleep(s)
    end
    state.cli = assert(etcd3.new { endpoints = "]] .. member.endpoint .. [[" })
    -- init_worker still blocks within the deadline (the worker serves nothing yet)
    state.bootstrap = assert(state.cli:get("/nw/get")).kvs[1].value
  }
  server {
    listen 127.0.0.1:${PORT};
    location = / { return 200 "up"; }
    location = /pid { content_by_lua_block { ngx.say(ngx.worker.pid()) } }
    location = /waiting {
      content_by_lua_block { ngx.say(require("spec.ngx_wait_state").waiting) }
    }
    location = /gets {
      content_by_lua_block {
        local state = require("spec.ngx_wait_state")
        local ok, before = 0, state.sleeps
        local junk = {}
        for i = 1, tonumber(ngx.var.arg_n) do
          -- garbage, so that collections run inside the library's own
          -- allocations too (a __gc there must never meet the engine lock)
          junk[i % 64] = { {}, {}, {}, ("x"):rep(i % 100) }
          local sleeps = state.sleeps
          local res, err = state.cli:get("/nw/get")
          if not res then ngx.say("error: ", tostring(err)) end
          if res and res.kvs[1].value == "value-1" and state.sleeps == sleeps then ok = ok + 1 end
        end
        ngx.say("bootstrap=", state.bootstrap, " ok=", ok, " sleeps=", state.sleeps - before)
      }
    }
    location = /second {
      content_by_lua_block {
        local state = require("spec.ngx_wait_state")
        if ngx.var.arg_close then
          state.second:close()
          return ngx.say("closed")
        end
        state.second = assert(require("etcd3").new { endpoints = "]] .. member.endpoint .. [[" })
        local res, err = state.second:get("/nw/get")
        -- a wait that parks for sure (the get may be answered before it
        -- would have to), so that the client's notifier connection exists
        local w = assert(state.second:watch("/nw/second-quiet"))
        assert(not w:next(0.05))
        w:cancel()
        ngx.say(res and res.kvs[1].value or tostring(err))
      }
    }
    location /watches/ {
      content_by_lua_block {
        local state = require("spec.ngx_wait_state")
        local n = tonumber(ngx.var.arg_n)
        local key = "/nw/" .. ngx.var.uri:match("^/watches/(.+)$")
        local function one()
          local w, err = state.cli:watch(key)
          if not w then return "watch: " .. tostring(err) end
          state.waiting = state.waiting + 1
          local ev, nerr = w:next(60)
          state.waiting = state.waiting - 1
          w:cancel()
          return ev and ev.kv.value or tostring(nerr)
        end
        local threads, counts = {}, {}
        for i = 1, n do threads[i] = ngx.thread.spawn(one) end
        for i = 1, n do
          local ok, v = ngx.thread.wait(threads[i])
          if not ok then v = "thread: " .. tostring(v) end
          counts[v] = (counts[v] or 0) + 1
        end
        for v, c in pairs(counts) do ngx.say(v, " x", c) end
      }
    }
  }
]])
  end)

  teardown(function() nginx.stop_all(server, member) end)

  it("serial gets complete without any ngx.sleep (init_worker read blocking)", function()
    assert.are.equal("bootstrap=value-1 ok=50 sleeps=0\n", (server:get("/gets?n=50", 60)))
  end)

  it("2000 serial gets while garbage piles up", function()
    assert.are.equal("bootstrap=value-1 ok=2000 sleeps=0\n", (server:get("/gets?n=2000", 120)))
  end)

  it("300 waiting watches: the idle worker sleeps, and one put releases all of them", function()
    local pid = assert(tonumber((server:get("/pid"))))
    local finish = server:get_async("/watches/many?n=300", 120)
    helper.wait_for(function() return server:get("/waiting") == "300\n" end, 60, "300 confirmed watches")
    local cpu0, wakes0, t0 = cpu_seconds(pid), main_thread_wakes(pid), helper.now()
    core.sleep(5) -- the measurement window (nothing to wait for)
    local cpu = (cpu_seconds(pid) - cpu0) / (helper.now() - t0)
    local wakes = main_thread_wakes(pid) - wakes0
    io.stderr:write(("\n[ngx wait] 300 idle watches over 5 s: worker CPU %.2f %%, main thread woke %d times\n")
      :format(cpu * 100, wakes))
    assert.is_true(cpu < 0.01, "worker CPU " .. cpu * 100 .. " %")
    assert.is_true(wakes <= 10, "main thread woke " .. wakes .. " times")
    assert.matches("OK", member:etcdctl("put /nw/many released"))
    assert.are.equal("released x300\n", finish())
  end)

  it("keeps no socket file and nothing listening; a closed client's connection goes", function()
    local pid = assert(tonumber((server:get("/pid"))))
    -- the worker's unix sockets: inode -> the peer's inode ("l": listening)
    local function unix_sockets(flags)
      local found, n = {}, 0
      for line in helper.capture("ss -xpn" .. flags .. " 2>/dev/null"):gmatch("[^\n]+") do
        if line:find("pid=" .. pid .. ",", 1, true) then
          local inode, peer = line:match("(%d+)%s+%S+%s+(%d+)%s+users:")
          if inode then found[inode] = peer end
          n = n + 1
        end
      end
      return found, n
    end
    -- a connection both of whose ends are in the worker and were not there
    -- `before` (other sockets may come and go meanwhile)
    local function new_pair(before)
      for inode, peer in pairs((unix_sockets("a"))) do
        if not before[inode] and not before[peer] and unix_sockets("a")[peer] == inode then
          return { inode, peer }
        end
      end
    end
    assert.are.equal("bootstrap=value-1 ok=1 sleeps=0\n", (server:get("/gets?n=1")))
    local before, n = unix_sockets("a")
    assert.is_true(n >= 2, "the reader's connection (both ends in the worker)")
    assert.are.equal("value-1\n", (server:get("/second")))
    local pair = helper.wait_for(function() return new_pair(before) end, 10, "a second client's connection")
    assert.are.equal(0, select(2, unix_sockets("l")))
    assert.are.equal("closed\n", (server:get("/second?close=1")))
    helper.wait_for(function()
      local now = unix_sockets("a")
      return not now[pair[1]] and not now[pair[2]]
    end, 10, "the closed client's connection to go")
  end)

  it("reloads (HUP) with 4 waiting watches: the old worker exits within 2 s", function()
    local old = assert(tonumber((server:get("/pid"))))
    local finishes = {}
    for i = 1, 4 do finishes[i] = server:get_async("/watches/reload?n=1", 30) end
    helper.wait_for(function() return server:get("/waiting") == "4\n" end, 30, "4 confirmed watches")
    assert(helper.sh("kill -HUP " .. server.pid))
    local t0 = helper.now()
    helper.wait_for(function() return gone(old) end, 10, "the old worker to exit")
    local took = helper.now() - t0
    io.stderr:write(("\n[ngx wait] old worker gone %.2f s after HUP\n"):format(took))
    assert.is_true(took < 2, "the old worker took " .. took .. " s")
    for i = 1, 4 do
      assert.matches("CANCELLED: the nginx worker is exiting", finishes[i]())
    end
    -- the new worker serves, with its own client
    local new = helper.wait_for(function()
      local pid = tonumber((server:get("/pid")))
      return pid and pid ~= old and pid
    end, 10, "the new worker")
    assert.are_not.equal(old, new)
    assert.are.equal("bootstrap=value-1 ok=5 sleeps=0\n", (server:get("/gets?n=5", 60)))
  end)
end)

describe("README's OpenResty nginx.conf files", function()
  local member

  --- The nth ```nginx block of README's "OpenResty" section, made to run
  -- here: this checkout's Lua paths, this etcd, a free port.
  local function readme_conf(n)
    local f = assert(io.open("README.md"))
    local text = f:read("*a")
    f:close()
    local section = assert(text:match("\n### OpenResty\n(.-)\n### "), "README has an OpenResty section")
    local blocks = {}
    for block in section:gmatch("```nginx\n(.-)```") do blocks[#blocks + 1] = block end
    local conf = assert(blocks[n], "README's OpenResty section has nginx block " .. n)
    local function sub(pattern, repl)
      local count
      conf, count = conf:gsub(pattern, repl)
      assert(count > 0, "README's nginx block " .. n .. " has " .. pattern)
    end
    sub('lua_package_path%s+"[^"]*"', 'lua_package_path "${LUA_PATH}"')
    sub('lua_package_cpath%s+"[^"]*"', 'lua_package_cpath "${LUA_CPATH}"')
    sub("127%.0%.0%.1:2379", member.endpoint)
    sub("listen 127%.0%.0%.1:8080", "listen 127.0.0.1:${PORT}")
    return conf
  end

  local function put(key, value)
    assert.matches("OK", member:etcdctl(("put %s %s"):format(key, value)))
  end

  setup(function() member = helper.single() end)
  teardown(function() if member then member:stop() end end)

  it("config lookups: the bootstrap value, live reads, 404 for a missing key", function()
    put("/app/bootstrap", "boot-1")
    put("/app/color", "blue")
    local server = nginx.start_conf(readme_conf(1))
    local ok, err = pcall(function()
      assert.are.equal("boot-1\n", (server:get("/bootstrap")))
      assert.are.equal("blue\n", (server:get("/cfg/color")))
      put("/app/color", "green")
      assert.are.equal("green\n", (server:get("/cfg/color")))
      assert.matches("404 Not Found", (server:get("/cfg/missing")))
    end)
    server:stop()
    assert(ok, err)
  end)

  it("watches: each worker's copy follows, a long poll answers, a reload does not hang", function()
    put("/app/a", "1")
    local server = nginx.start_conf(readme_conf(2))
    local ok, err = pcall(function()
      assert.are.equal("1\n", (server:get("/copy/a")))
      put("/app/a", "2")
      helper.wait_for(function() return server:get("/copy/a") == "2\n" end, 10, "the copy to follow")
      local rev = assert(tonumber(member:etcdctl("get /app/a -w json"):match('"revision":(%d+)')))
      local finish = server:get_async("/changes/b?after=" .. rev, 60)
      put("/app/b", "x")
      assert.are.equal(("%d x\n"):format(rev + 1), finish())
      -- reload: the old workers (each with a watch waiting in a timer) go
      local workers = helper.capture("ps -o pid= --ppid " .. server.pid)
      assert(helper.sh("kill -HUP " .. server.pid))
      for pid in workers:gmatch("%d+") do
        helper.wait_for(function() return gone(pid) end, 10, "old worker " .. pid .. " to exit")
      end
      put("/app/a", "3")
      helper.wait_for(function() return server:get("/copy/a") == "3\n" end, 10, "the new workers' copy")
    end)
    server:stop()
    assert(ok, err)
  end)
end)

describe("OpenResty notifier files", function()
  local member

  --- A worker whose TMPDIR is `tmpdir`, with /get reporting the value and
  -- how many ngx.sleep calls the get made.
  local function start(tmpdir)
    return nginx.start_conf([[
env TMPDIR=]] .. tmpdir .. [[;
worker_processes 1;
events { worker_connections 64; }
http {
  lua_package_path "${LUA_PATH}";
  lua_package_cpath "${LUA_CPATH}";
  init_worker_by_lua_block {
    local state = { sleeps = 0 }
    package.loaded["spec.ngx_files_state"] = state
    local sleep = ngx.sleep
    ngx.sleep = function(s)
      state.sleeps = state.sleeps + 1
      return sleep(s)
    end
    state.cli = assert(require("etcd3").new { endpoints = "]] .. member.endpoint .. [[" })
  }
  server {
    listen 127.0.0.1:${PORT};
    location = / { return 200 "up"; }
    location = /get {
      content_by_lua_block {
        local state = require("spec.ngx_files_state")
        local sleeps = state.sleeps
        local res, err = state.cli:get("/nf/k")
        ngx.say(res and res.kvs[1].value or tostring(err), " sleeps=", state.sleeps - sleeps)
      }
    }
    # a wait that cannot end early: 0.2 s on a quiet key
    location = /quiet {
      content_by_lua_block {
        local state = require("spec.ngx_files_state")
        local w = assert(state.cli:watch("/nf/quiet"))
        local sleeps = state.sleeps
        local ev, err = w:next(0.2)
        w:cancel()
        ngx.say(ev and "an event?!" or err.code, " sleeps=", state.sleeps - sleeps)
      }
    }
  }
}]])
  end

  setup(function()
    member = helper.single()
    assert.matches("OK", member:etcdctl("put /nf/k v"))
  end)
  teardown(function() if member then member:stop() end end)

  it("leaves nothing in TMPDIR once the worker is connected", function()
    local tmpdir = helper.capture("mktemp -d /tmp/etcd3-nftmp.XXXXXX"):gsub("%s+$", "")
    -- the worker runs as nobody: it may create its private dir here
    assert(helper.sh("chmod 1777 " .. tmpdir))
    local server = start(tmpdir)
    local ok, err = pcall(function()
      assert.are.equal("v sleeps=0\n", (server:get("/get")))
      assert.are.equal("TIMEOUT sleeps=0\n", (server:get("/quiet")))
      assert.are.equal("", helper.capture("ls -A " .. tmpdir))
    end)
    server:stop()
    helper.sh("rm -rf '" .. tmpdir .. "'")
    assert(ok, err)
  end)

  it("falls back to polling, with a warning, when no socket can be made", function()
    local server = start("/nonexistent-etcd3-dir")
    local ok, err = pcall(function()
      -- the first get that waits starts the reader, which fails and wakes
      -- it (a get answered before it had to wait starts nothing: slower
      -- runs, under the sanitizer, saw that)
      helper.wait_for(function()
        assert.matches("^v sleeps=%d+\n$", (server:get("/get")))
        return server:error_log():find("etcd3: waits fall back to polling: cannot make a private directory in "
          .. "/nonexistent-etcd3-dir", 1, true) ~= nil
      end, 10, "the fallback warning")
      -- later waits poll (ngx.sleep), with no new attempt
      assert.matches("^TIMEOUT sleeps=[1-9]", (server:get("/quiet")))
      assert.matches("^v sleeps=%d+\n$", (server:get("/get")))
      local _, warnings = server:error_log():gsub("waits fall back to polling", "")
      assert.are.equal(1, warnings)
    end)
    server:stop()
    assert(ok, err)
  end)
end)
