-- etcd3.ngx for real: Debian's nginx + lua-nginx-module (LuaJIT) with 4
-- workers sharing one mirror of a prefix through a lua_shared_dict. The
-- spec process itself may run on either runtime: it only drives etcd, curl,
-- ss and signals.
local etcd3 = require "etcd3"
local helper = require "spec.helpers.etcd"
local nginx = require "spec.helpers.nginx"

local WORKERS = 4

-- Each worker notes (CLOCK_MONOTONIC, shared by every process of the
-- machine) when it first sees each revision of the copy: the spec compares
-- that with when it sent the put. A probe, not part of the module.
local PROBE = [[
    local core = require "etcd3.core"
    local view = ngxm.view("etcd_cfg")
    local lat, id = ngx.shared.lat, ngx.worker.id()
    assert(ngx.timer.at(0, function(premature)
      if premature then return end
      local last = view:revision()
      while not ngx.worker.exiting() do
        local rev = view:revision()
        if rev > last then
          local t = core.now()
          for r = math.max(last + 1, rev - 100), rev do lat:set(id .. ":" .. r, t) end
          last = rev
        end
        ngx.sleep(0.001)
      end
    end))
]]

--- `extra`: more fields of the mirror{} call (Lua text, ", name = value").
local function config(endpoint, dict_size, prefix, extra)
  return [[
  lua_shared_dict etcd_cfg ]] .. dict_size .. [[;
  lua_shared_dict lat 1m;
  init_by_lua_block {
    -- Debian's nginx lacks OpenResty's privileged agent patch: worker 0 writes
    agent_ok, agent_err = require("etcd3.ngx").enable_privileged_agent()
  }
  init_worker_by_lua_block {
    local ngxm = require "etcd3.ngx"
    ngxm.mirror { dict = "etcd_cfg", prefix = "]] .. prefix .. [[", endpoints = "]] .. endpoint .. [["]]
      .. (extra or "") .. [[ }
]] .. PROBE .. [[
  }
  server {
    listen 127.0.0.1:${PORT} reuseport;
    location = / { return 200 "up"; }
    location = /get {
      content_by_lua_block {
        local v = require("etcd3.ngx").view("etcd_cfg"):get(ngx.var.arg_k)
        ngx.say(ngx.worker.id(), " ", v or "<nil>")
      }
    }
    location = /dump {
      content_by_lua_block {
        local view = require("etcd3.ngx").view("etcd_cfg")
        ngx.say(view:revision(), " ", tostring(view:err()))
        for k, v in view:pairs() do ngx.say(k, "=", v) end
      }
    }
    location = /agent {
      content_by_lua_block { ngx.say(tostring(agent_ok), " ", tostring(agent_err)) }
    }
    location = /pid {
      content_by_lua_block { ngx.say(ngx.worker.id(), " ", ngx.worker.pid()) }
    }
    location = /newer {
      content_by_lua_block {
        -- what a newer writer's copy looks like to this one
        ngx.shared.etcd_cfg:set("/m/from-newer", "x")
        ngx.shared.etcd_cfg:set("\0etcd3:rev", tonumber(ngx.var.arg_rev))
      }
    }
    location = /writer {
      content_by_lua_block { ngx.say(ngx.shared.etcd_cfg:get("\0etcd3:writer") or 0) }
    }
    location = /lat {
      content_by_lua_block {
        for id = 0, ]] .. (WORKERS - 1) .. [[ do
          ngx.say(ngx.shared.lat:get(id .. ":" .. ngx.var.arg_rev) or "-")
        end
      }
    }
    location = /args {
      content_by_lua_block {
        local ngxm = require "etcd3.ngx"
        local function e(f, ...) local ok, err = pcall(f, ...) ngx.say(ok and "no error" or err) end
        e(ngxm.mirror, { dict = "etcd_cfg", prefix = "/m/", bogus = 1 })
        e(ngxm.mirror, { dict = "nope", prefix = "/m/" })
        e(ngxm.mirror, { dict = "etcd_cfg", prefix = "" })
        e(ngxm.view, 5)
        e(function() return ngxm.view("etcd_cfg"):get(1) end)
        e(ngxm.mirror, { prefix = "/m/" })
        e(ngxm.mirror, { dict = "etcd_cfg", prefix = "/m/" })
        e(ngxm.mirror, { dict = "etcd_cfg", prefix = "/m/", namespaces = "/x" })
        e(ngxm.mirror, { dict = "etcd_cfg", prefix = "/m/", namespace = 5 })
      }
    }
    location = /client_options {
      content_by_lua_block {
        -- each etcd3.new option, alone, with a value of its kind: mirror{}
        -- takes it (the error is then the phase's, not the option's)
        local ngxm = require "etcd3.ngx"
        local sample = { any = "127.0.0.1:1", number = 5, integer = 5, string = "s",
                         ["function"] = function() end, table = {} }
        for name, kind in pairs(require("etcd3.client").CONFIG) do
          if sample[kind] == nil then
            ngx.say(name, " no sample value of kind ", tostring(kind), " in this spec")
          else
            local _, err = pcall(ngxm.mirror, { dict = "etcd_cfg", prefix = "/m/", [name] = sample[kind] })
            ngx.say(name, " ", err)
          end
        end
      }
    }
    location = /wait {
      content_by_lua_block {
        local view = require("etcd3.ngx").view("etcd_cfg")
        local rev, err = view:wait(tonumber(ngx.var.arg_rev), tonumber(ngx.var.arg_t))
        ngx.say(rev or err.code)
      }
    }
  }
]]
end

local function sh(cmd) assert(helper.sh(cmd), cmd) end

--- Established TCP connections from those PIDs to etcd's client port.
local function connections(server, port)
  local pids, n = server:pids(), 0
  for line in helper.capture("ss -tnpH state established"):gmatch("[^\n]+") do
    -- (the peer may show as [::ffff:127.0.0.1]:port)
    local peer = line:match("%S+%s+%S+%s+%S+%s+(%S+)") or ""
    if peer:find("127.0.0.1", 1, true) and peer:match(":(%d+)$") == tostring(port) then
      for pid in line:gmatch("pid=(%d+)") do
        if pids[tonumber(pid)] then
          n = n + 1
          break
        end
      end
    end
  end
  return n
end

--- Waits until every worker answers `value` for `key` ("<nil>": absent).
local function visible_everywhere(server, key, value)
  helper.wait_for(function()
    local seen = server:ask_all("/get?k=" .. key, 24)
    for id = 0, WORKERS - 1 do
      local got = seen[id]
      if not got or not got[value] then return false end
      for v in pairs(got) do if v ~= value then return false end end
    end
    return true
  end, 20, key .. " = " .. value .. " in every worker")
end

local function dump(server)
  local body = server:get("/dump")
  local rev, err = body:match("^(%d+) ([^\n]*)")
  local kvs = {}
  for k, v in body:gmatch("\n([^=\n]+)=([^\n]*)") do kvs[k] = v end
  return tonumber(rev), err, kvs
end

--- Waits until the copy is at `revision` or later and equals etcd's prefix.
local function exact(server, cli, prefix, revision)
  local rev, err, kvs
  helper.wait_for(function()
    rev, err, kvs = dump(server)
    return rev and rev >= revision and err == "nil"
  end, 30, "the copy to reach revision " .. revision .. " with view:err() nil")
  local res = assert(cli:get(prefix, { prefix = true, revision = rev }))
  local want = {}
  for _, kv in ipairs(res.kvs) do want[kv.key] = kv.value end
  assert.are.same(want, kvs)
end

local function writer_pid(server)
  return tonumber((server:get("/writer")))
end

local function quantile(sorted, q)
  return sorted[math.max(1, math.ceil(#sorted * q))]
end

describe("etcd3.ngx", function()
  local member, cli, server, port

  setup(function()
    member = helper.single()
    port = tonumber(member.endpoint:match(":(%d+)$"))
    cli = assert(etcd3.new { endpoints = member.endpoint })
    for i = 1, 10 do assert(cli:put(("/m/k%02d"):format(i), "v" .. i)) end
    server = nginx.start(config(member.endpoint, "1m", "/m/"), WORKERS)
  end)

  teardown(function() nginx.stop_all(server, cli, member) end)

  it("serves the prefix in every worker over one connection to etcd", function()
    exact(server, cli, "/m/", 1)
    visible_everywhere(server, "/m/k03", "v3")
    -- connections settle: let the workers finish starting
    helper.wait_for(function() return connections(server, port) == 1 end, 10, "one connection")
    local pids = server:pids()
    local n = 0
    for _ in pairs(pids) do n = n + 1 end
    assert.are.equal(WORKERS + 1, n)
    io.stderr:write(("\n[ngx mirror] %d nginx processes, %d TCP connection(s) to etcd\n"):format(
      n, connections(server, port)))
  end)

  it("writes from worker 0 when nginx has no privileged agent", function()
    local agent = server:get("/agent")
    if agent:match("^true") then
      pending("this nginx has a privileged agent: it writes")
      return
    end
    assert.matches("missing privileged agent process patch", agent, 1, true)
    local pid
    helper.wait_for(function()
      local seen = server:ask_all("/pid", 24)
      pid = seen[0] and next(seen[0])
      return pid
    end, 20, "an answer from worker 0")
    assert.are.equal(tonumber(pid), writer_pid(server))
  end)

  it("shows puts and deletes in every worker", function()
    assert(cli:put("/m/new", "fresh"))
    visible_everywhere(server, "/m/new", "fresh")
    assert(cli:put("/m/new", "fresher"))
    visible_everywhere(server, "/m/new", "fresher")
    assert(cli:delete("/m/new"))
    visible_everywhere(server, "/m/new", "<nil>")
    assert(cli:put("/outside", "x"))
    visible_everywhere(server, "/outside", "<nil>")
    exact(server, cli, "/m/", 1)
  end)

  it("makes a put visible in every worker quickly (measured)", function()
    local lat = {}
    for i = 1, 100 do
      local t0 = helper.now()
      local res = assert(cli:put("/m/lat", tostring(i)))
      local rev = res.header.revision
      local times
      helper.wait_for(function()
        times = {}
        for t in server:get("/lat?rev=" .. rev):gmatch("[^\n]+") do times[#times + 1] = tonumber(t) end
        return #times == WORKERS
      end, 10, "revision " .. rev .. " in every worker")
      local last = 0
      for _, t in ipairs(times) do last = math.max(last, t - t0) end
      lat[#lat + 1] = last
    end
    table.sort(lat)
    io.stderr:write(("[ngx mirror] put -> visible in all %d workers: p50 %.1f ms, p99 %.1f ms, max %.1f ms\n"):format(
      WORKERS, quantile(lat, 0.5) * 1000, quantile(lat, 0.99) * 1000, lat[#lat] * 1000))
    -- a functional bound only: the machine is shared
    assert.is_true(quantile(lat, 0.5) < 1, "p50 " .. quantile(lat, 0.5))
  end)

  it("never overwrites a newer copy; rewrites it whole once past its revision", function()
    local cur = assert(cli:put("/m/older0", "0")).header.revision
    exact(server, cli, "/m/", cur)
    local newer = cur + 5
    server:get("/newer?rev=" .. newer)
    assert(cli:put("/m/older1", "1"))
    assert(cli:put("/m/older2", "2"))
    -- a second for the writer to (not) write them
    assert.are.equal("TIMEOUT\n", (server:get("/wait?rev=" .. newer .. "&t=1")))
    local rev, _, kvs = dump(server)
    assert.are.equal(newer, rev)
    assert.are.equal("x", kvs["/m/from-newer"])
    assert.is_nil(kvs["/m/older1"])
    local last
    for i = 3, 6 do last = assert(cli:put("/m/older" .. i, tostring(i))).header.revision end
    assert.is_true(last > newer)
    exact(server, cli, "/m/", last)
    assert.are.equal("2\n", (server:get("/get?k=/m/older2")):match(" (.*)$"))
  end)

  it("wakes view:wait once the copy passes a revision, and times out otherwise", function()
    local rev = dump(server)
    assert.are.equal("TIMEOUT\n", (server:get("/wait?rev=" .. rev .. "&t=0.2")))
    local finish = server:get_async("/wait?rev=" .. rev .. "&t=10")
    local res = assert(cli:put("/m/woken", "yes"))
    local got = tonumber(finish())
    assert.is_true(got >= res.header.revision, tostring(got))
  end)

  it("survives the writer's SIGKILL: the respawned worker takes over, nothing lost", function()
    local old = writer_pid(server)
    assert(old and old > 0)
    for i = 1, 20 do assert(cli:put("/m/kill" .. i, "before")) end
    sh("kill -KILL " .. old)
    -- while no one writes
    for i = 1, 20 do assert(cli:put("/m/kill" .. i, "after" .. i)) end
    assert(cli:delete("/m/k01"))
    local last = assert(cli:put("/m/kill-last", "done")).header.revision
    exact(server, cli, "/m/", last)
    visible_everywhere(server, "/m/kill20", "after20")
    local new = writer_pid(server)
    assert.are_not.equal(old, new)
    assert.is_true(server:pids()[new] ~= nil, "the writer is a child of this nginx")
    helper.wait_for(function() return connections(server, port) == 1 end, 10, "one connection")
  end)

  it("keeps updates flowing across nginx -s reload (HUP)", function()
    local old = writer_pid(server)
    local before = server:pids()
    sh("kill -HUP " .. server.pid)
    -- puts during and after the reload
    for i = 1, 30 do assert(cli:put("/m/reload" .. (i % 5), "r" .. i)) end
    helper.wait_for(function()
      local pids = server:pids()
      for pid in pairs(pids) do if pid ~= server.pid and before[pid] then return false end end
      local n = 0
      for _ in pairs(pids) do n = n + 1 end
      return n == WORKERS + 1
    end, 30, "the old workers to be replaced")
    local last = assert(cli:put("/m/reload-last", "done")).header.revision
    exact(server, cli, "/m/", last)
    visible_everywhere(server, "/m/reload-last", "done")
    visible_everywhere(server, "/m/reload0", "r30")
    assert.are_not.equal(old, writer_pid(server))
    helper.wait_for(function() return connections(server, port) == 1 end, 10, "one connection")
  end)

  -- With "cont", etcd is also restarted while the writer is stopped: its
  -- watch then ends, and is resumed from a compacted revision (the
  -- mirror's re-snapshot); with "kill", the respawned writer's snapshot
  -- replaces a copy that lacks the deletes.
  local function stopped_while_compacted(resume)
    local writer = writer_pid(server)
    local last = nginx.compacted_while_stopped { pid = writer, resume = resume == "cont" and "CONT" or "KILL",
      member = member, cli = cli, restart = resume == "cont", key = "/m/stop-last", value = resume,
      changes = function()
        for i = 1, 10 do assert(cli:put("/m/stop" .. i, "while-stopped")) end
        assert(cli:delete("/m/stop3"))
        assert(cli:delete("/m/k02"))
        assert(cli:put("/m/k04", "changed"))
      end }
    exact(server, cli, "/m/", last)
    visible_everywhere(server, "/m/k02", "<nil>")
    visible_everywhere(server, "/m/stop-last", resume)
    if resume == "cont" then assert.are.equal(writer, writer_pid(server)) end
  end

  it("is exact after changes, etcd's restart and a compaction while the writer was stopped (SIGCONT)", function()
    stopped_while_compacted("cont")
  end)

  it("is exact after changes and a compaction while the writer was stopped, then killed", function()
    stopped_while_compacted("kill")
  end)

  it("says in view:err() when etcd is unreachable, keeps the copy, and recovers", function()
    member:kill()
    local err
    helper.wait_for(function()
      local _
      _, err = dump(server)
      return err ~= "nil"
    end, 30, "view:err() to report etcd's loss")
    assert.matches("the copy may be stale", err, 1, true)
    visible_everywhere(server, "/m/k03", "v3")
    member:start()
    member:wait_healthy()
    local last
    helper.wait_for(function()
      local res = cli:put("/m/back", "again")
      last = res and res.header.revision
      return last
    end, 20, "a put after etcd's restart")
    exact(server, cli, "/m/", last)
  end)

  it("refuses bad arguments naming the function", function()
    server:refuses("/args", {
      "etcd3.ngx.mirror: unknown option 'bogus'",
      'etcd3.ngx.mirror: no lua_shared_dict named "nope" in nginx.conf',
      "etcd3.ngx.mirror: option 'prefix' must not cover the keys",
      "bad argument #1 to 'etcd3.ngx.view' (string expected, got 5)",
      "bad argument #1 to 'etcd3.view:get' (string expected, got 1)",
      "etcd3.ngx.mirror: option 'dict' (a lua_shared_dict's name) is required",
      "etcd3.ngx.mirror: call it in init_worker_by_lua*",
      "etcd3.ngx.mirror: unknown option 'namespaces'",
      "etcd3.ngx.mirror: option 'namespace': string expected, got number",
    })
  end)

  it("takes every etcd3.new option", function()
    local seen = {}
    for name, err in server:get("/client_options"):gmatch("(%S+) ([^\n]*)") do
      seen[name] = true
      assert.matches("etcd3.ngx.mirror: call it in init_worker_by_lua*", err, 1, true)
    end
    for name in pairs(require("etcd3.client").CONFIG) do assert.is_true(seen[name], name) end
    for _, name in ipairs { "namespace", "auto_sync", "max_recv_bytes", "wait" } do
      assert.is_true(seen[name], name)
    end
  end)
end)

describe("etcd3.ngx with a namespace", function()
  local member, cli, ns_cli, server

  setup(function()
    member = helper.single()
    cli = assert(etcd3.new { endpoints = member.endpoint })
    ns_cli = assert(etcd3.new { endpoints = member.endpoint, namespace = "/ns" })
    assert(cli:put("/ns/m/a", "in"))
    assert(cli:put("/m/a", "outside the namespace"))
    assert(cli:put("/m/b", "outside the namespace"))
    assert(cli:put("/ns/other", "outside the prefix"))
    -- (auto_sync and max_recv_bytes: etcd3.new fields mirror{} passes on too)
    server = nginx.start(config(member.endpoint, "1m", "/m/",
      ', namespace = "/ns", auto_sync = 5, max_recv_bytes = 1048576'))
  end)

  teardown(function() nginx.stop_all(server, ns_cli, cli, member) end)

  it("keeps the keys under the namespace, stripped of it", function()
    local last = assert(cli:put("/ns/m/c", "in too")).header.revision
    exact(server, ns_cli, "/m/", last)
    local _, _, kvs = dump(server)
    assert.are.same({ ["/m/a"] = "in", ["/m/c"] = "in too" }, kvs)
    assert.are.equal("0 in\n", (server:get("/get?k=/m/a")))
    -- a change made through a namespaced client, and one outside it
    assert(cli:put("/m/a", "still outside"))
    last = assert(ns_cli:put("/m/a", "changed")).header.revision
    exact(server, ns_cli, "/m/", last)
    assert.are.equal("0 changed\n", (server:get("/get?k=/m/a")))
    assert.are.equal("0 <nil>\n", (server:get("/get?k=/m/b")))
  end)
end)

describe("etcd3.ngx with a dict too small", function()
  local member, cli, server

  setup(function()
    member = helper.single()
    cli = assert(etcd3.new { endpoints = member.endpoint })
    local value = ("x"):rep(100)
    for i = 1, 1000 do assert(cli:put(("/big/%04d"):format(i), value)) end
    -- (a change log that fits once the keys are deleted: the default one,
    -- 10000 entries, would keep view:err() saying the dict is full)
    server = nginx.start(config(member.endpoint, "32k", "/big/", ", log_size = 16"))
  end)

  teardown(function() nginx.stop_all(server, cli, member) end)

  it("says so in view:err() and in the error log, never a silent partial copy", function()
    local err
    helper.wait_for(function()
      local _
      _, err = dump(server)
      return err and err:find("is full", 1, true)
    end, 30, "view:err() to report the full dict")
    local missing = tonumber(err:match(": (%d+) keys not stored"))
    assert.matches('the dict "etcd_cfg" is full: %d+ keys not stored', err)
    assert.is_true(missing > 500, err)
    helper.wait_for(function() return server:error_log():find("is full", 1, true) end, 10, "the log line")
    assert.matches("%[error%].-etcd3%.ngx: the dict \"etcd_cfg\" is full", server:error_log())
    -- what is stored is right, and the count is every key not stored
    local _, _, kvs = dump(server)
    local n = 0
    for k, v in pairs(kvs) do
      n = n + 1
      assert.are.equal(("x"):rep(100), v, k)
    end
    assert.are.equal(1000, n + missing)
    -- deleting most keys makes room: the copy becomes whole and the error goes
    assert(cli:delete("/big/0", { prefix = true }))
    assert(cli:delete("/big/1000"))
    local last = assert(cli:put("/big/end", "e")).header.revision
    exact(server, cli, "/big/", last)
  end)
end)
