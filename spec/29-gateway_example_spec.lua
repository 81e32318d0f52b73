-- examples/gateway under a real nginx with 4 workers: its nginx.conf and
-- routes.lua as written (only etcd's endpoint, the port, the worker count
-- and the Lua paths filled in). Every worker's route table must equal
-- etcd's routes at the table's revision, whether it got there by lists of
-- changes or, after a RESET, by reading every route again. The spec
-- process may run on either runtime: nginx runs the example under LuaJIT.
local etcd3 = require "etcd3"
local core = require "etcd3.core"
local cjson = require "cjson.safe"
local helper = require "spec.helpers.etcd"
local nginx = require "spec.helpers.nginx"

local WORKERS = 4
local ROUTES = "/gateway/routes/"

--- examples/gateway/nginx.conf made to run here, `subs` (pattern ->
-- replacement) replaced too; each pattern must occur once.
local function config(endpoint, subs)
  local f = assert(io.open("examples/gateway/nginx.conf"))
  local conf = f:read("*a")
  f:close()
  local function sub(pattern, replacement)
    local count
    conf, count = conf:gsub(pattern, replacement)
    assert(count == 1, "examples/gateway/nginx.conf has " .. pattern .. " " .. count .. " times, not once")
  end
  sub('lua_package_path%s+"[^"]*"', 'lua_package_path "${ROOT}/examples/?.lua;${LUA_PATH}"')
  sub('lua_package_cpath%s+"[^"]*"', 'lua_package_cpath "${LUA_CPATH}"')
  sub('endpoints = "127%.0%.0%.1:2379"', ('endpoints = "%s"'):format(endpoint))
  sub("listen 127%.0%.0%.1:8080", "listen 127.0.0.1:${PORT}")
  sub("worker_processes auto", "worker_processes " .. WORKERS)
  for pattern, replacement in pairs(subs or {}) do sub(pattern, replacement) end
  return conf
end

local function route(host, path, upstream)
  return cjson.encode { host = host, path = path, upstream = upstream }
end

--- etcd's routes at `revision`, as /routes prints a table: "key host path
-- upstream" lines in key order joined by "|" (values that are no route
-- left out, as the workers leave them out).
local function routes_at(cli, revision)
  local lines = {}
  for _, kv in ipairs(assert(cli:get(ROUTES, { prefix = true, revision = revision })).kvs) do
    local r = cjson.decode(kv.value)
    if type(r) == "table" then
      lines[#lines + 1] = ("%s %s %s %s"):format(kv.key, r.host or "*", r.path, r.upstream)
    end
  end
  table.sort(lines)
  return table.concat(lines, "|")
end

--- Waits until every worker's table is at `revision` (the last change
-- under the routes' prefix) and equals etcd's routes then -> { [worker
-- id] = { reloads = n, applies = n } }
local function tables_exact(server, cli, revision)
  local want, counts, answers = routes_at(cli, revision)
  local ok, err = pcall(helper.wait_for, function()
    counts, answers = {}, {}
    for id, seen in pairs(server:ask_all("/routes", 24)) do
      for answer in pairs(seen) do
        answers[#answers + 1] = id .. " " .. answer
        local rev, reloads, applies = answer:match("^rev=(%d+) reloads=(%d+) applies=(%d+)")
        if tonumber(rev) == revision and (answer:match("|(.*)$") or "") == want then
          counts[id] = { reloads = tonumber(reloads), applies = tonumber(applies) }
        end
      end
    end
    for id = 0, WORKERS - 1 do if not counts[id] then return false end end
    return true
  end, 30, "every worker's table to equal etcd's routes at revision " .. revision)
  assert(ok, tostring(err) .. "\nwanted: " .. want .. "\nthe workers said:\n" .. table.concat(answers or {}, "\n"))
  return counts
end

--- No Lua error in `server`'s log (a failed timer, a request that raised).
local function no_lua_errors(server)
  local log = server:error_log()
  for _, sign in ipairs { "runtime error", "lua entry thread aborted", "failed to run timer" } do
    assert.is_nil(log:find(sign, 1, true), "the error log has " .. sign .. ":\n" .. log)
  end
end

--- /route?host=&path= asked of every worker: each must answer `want`
-- (waits for it: the upstreams' dict follows etcd on its own).
local function routes_to(server, host, path, want)
  local seen
  local ok = pcall(helper.wait_for, function()
    seen = server:ask_all(("/route?host=%s&path=%s"):format(host, path), 24)
    for id = 0, WORKERS - 1 do
      if not seen[id] then return false end
      for answer in pairs(seen[id]) do if answer ~= want then return false end end
    end
    return true
  end, 30, "every worker to route " .. host .. path)
  if not ok then
    for id = 0, WORKERS - 1 do assert.are.same({ [want] = true }, seen[id], ("worker %d, %s%s"):format(id, host, path)) end
  end
end

describe("examples/gateway", function()
  local member, cli

  setup(function()
    member = helper.single()
    cli = assert(etcd3.new { endpoints = member.endpoint })
    assert(cli:put(ROUTES .. "k1", route("k.example", "/", "127.0.0.1:9001")))
    assert(cli:put(ROUTES .. "k2", route("k.example", "/deep/er", "127.0.0.1:9002")))
  end)

  teardown(function()
    if cli then cli:close() end
    if member then member:stop() end
  end)

  it("applies puts, deletes and a multi-key txn of routes as changes in every worker", function()
    local server = nginx.start_conf(config(member.endpoint))
    finally(function() server:stop() end)
    local start = tables_exact(server, cli, assert(cli:get(ROUTES, { prefix = true })).header.revision)
    local op = etcd3.op
    assert(cli:put("/gateway/upstreams/web", cjson.encode { nodes = { "127.0.0.1:9100", "127.0.0.1:9101" } }))
    assert(cli:put(ROUTES .. "a", route("a.example", "/api", "127.0.0.1:8081")))
    assert(cli:put(ROUTES .. "b", route("a.example", "/api/v2", "web")))
    assert(cli:put(ROUTES .. "any", route(nil, "/health", "127.0.0.1:8090")))
    assert(cli:put(ROUTES .. "bad", "{not json"))
    assert(cli:delete(ROUTES .. "k2"))
    assert(cli:txn():success(op.put(ROUTES .. "t1", route("t.example", "/one", "127.0.0.1:8101")),
      op.put(ROUTES .. "t2", route("t.example", "/two", "127.0.0.1:8102")), op.delete(ROUTES .. "a"),
      op.put("/elsewhere", "x")):commit())
    local last = assert(cli:put(ROUTES .. "a", route("a.example", "/api", "127.0.0.1:8082"))).header.revision
    assert(cli:put("/elsewhere", "not a route"))
    local counts = tables_exact(server, cli, last)
    for id = 0, WORKERS - 1 do
      -- the default log reaches back: only changes, never a full read
      assert.are.equal(start[id].reloads, counts[id].reloads, "worker " .. id .. " read every route again")
      assert.is_true(counts[id].applies > start[id].applies, "worker " .. id .. " applied no change")
    end
    -- what the tables route to: the longest path, a named upstream, a
    -- route for every host; the bad value is no route (and logged)
    routes_to(server, "a.example", "/api/users", "127.0.0.1:8082")
    routes_to(server, "a.example", "/api/v2/users", "127.0.0.1:9100")
    routes_to(server, "a.example", "/apis", "no route")
    routes_to(server, "t.example", "/two", "127.0.0.1:8102")
    routes_to(server, "k.example", "/deep/er/x", "127.0.0.1:9001")
    routes_to(server, "other.example", "/health", "127.0.0.1:8090")
    assert.matches('"/gateway/routes/bad" %(revision %d+ in the dict\'s flags%) cannot be decoded', server:error_log())
    -- the proxy location: no route, 404
    assert.matches("404", helper.capture(("curl -s -o /dev/null -w '%%{http_code}' -H 'Host: none.example' %s/x")
      :format(server.url)))
    no_lua_errors(server)
  end)

  it("wakes every worker when the routes move, and an idle one every few seconds", function()
    local server = nginx.start_conf(config(member.endpoint))
    finally(function() server:stop() end)
    tables_exact(server, cli, assert(cli:get(ROUTES, { prefix = true })).header.revision)
    local pids = {}
    for pid in helper.capture("ps -o pid= --ppid " .. server.pid):gmatch("%d+") do pids[#pids + 1] = tonumber(pid) end
    assert.are.equal(WORKERS, #pids)
    local wakes = require("spec.helpers.process").main_thread_wakes
    local before = {}
    for i, pid in ipairs(pids) do before[i] = wakes(pid) end
    local t0 = helper.now()
    core.sleep(3) -- the measurement window (nothing to wait for)
    local took = helper.now() - t0
    for i, pid in ipairs(pids) do
      -- each worker's follower waits in view:wait, woken by the writer's
      -- feed: at its heartbeat (3 to 4 s apart while nothing changes; the
      -- bound allows 4 a second, for the writer's own); polling the
      -- dict every 8 ms would be 375 wake-ups
      local n = wakes(pid) - before[i]
      io.stderr:write(("\n[gateway] idle worker %d: %d wake-ups in %.1f s"):format(pid, n, took))
      assert.is_true(n <= 4 * took, ("worker %d woke %d times in %.1f s"):format(pid, n, took))
    end
    local last
    for i = 1, 20 do
      last = assert(cli:put(ROUTES .. "w" .. i, route("w.example", "/" .. i, "127.0.0.1:8200"))).header.revision
    end
    tables_exact(server, cli, last)
    no_lua_errors(server)
  end)

  it("reads every route again where the change log no longer reaches back, still exact", function()
    local server = nginx.start_conf(config(member.endpoint, { ["log_size = 10000"] = "log_size = 3" }))
    finally(function() server:stop() end)
    local start = tables_exact(server, cli, assert(cli:get(ROUTES, { prefix = true })).header.revision)
    -- one txn of 6 keys: 6 entries in a log of 3, so every worker, which
    -- was at the revision before it, gets RESET
    local ops = {}
    for i = 1, 6 do ops[i] = etcd3.op.put(ROUTES .. "r" .. i, route("r.example", "/r" .. i, "127.0.0.1:820" .. i)) end
    ops[#ops + 1] = etcd3.op.delete(ROUTES .. "t1")
    local last = assert(cli:txn():success((table.unpack or unpack)(ops)):commit()).header.revision
    local counts = tables_exact(server, cli, last)
    for id = 0, WORKERS - 1 do
      assert.is_true(counts[id].reloads > start[id].reloads, "worker " .. id .. " did not read every route again")
    end
    routes_to(server, "r.example", "/r5/x", "127.0.0.1:8205")
    -- and one change later, a list again
    last = assert(cli:delete(ROUTES .. "r5")).header.revision
    local after = tables_exact(server, cli, last)
    for id = 0, WORKERS - 1 do
      assert.are.equal(counts[id].reloads, after[id].reloads, "worker " .. id)
      assert.is_true(after[id].applies > counts[id].applies, "worker " .. id .. " applied no change")
    end
    routes_to(server, "r.example", "/r5/x", "no route")
    no_lua_errors(server)
  end)
end)
