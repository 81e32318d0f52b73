-- The side-by-side benchmark: lua-etcd3 against Go clientv3, python-etcd3
-- and Node etcd3 on one etcd, in one run, clients interleaved.
--
--   lua5.4 bench/run.lua [--scale N] [--rounds R] [--peers lua,go,python,node]
--
-- Set-up (bench/README.md): one etcd member with its data dir on tmpfs,
-- pinned to CPU 0; the measured client pinned to CPU 1; every workload run
-- `rounds` times with the clients interleaved; medians reported, with the
-- ratio to Go clientv3. `--scale 50` runs each workload at 1/50 size (the
-- smoke run CI does).
local helper = require "spec.helpers.etcd"
local core = require "etcd3.core"

local now, capture, sh = core.now, helper.capture, helper.sh

local opts = { scale = 1, rounds = 3, peers = "lua,go,python,node", out = "build/bench" }
do
  local i = 1
  while i <= #arg do
    local k = arg[i]:match("^%-%-(.+)$")
    if not k or opts[k] == nil then error("unknown argument " .. tostring(arg[i])) end
    opts[k] = type(opts[k]) == "number" and assert(tonumber(arg[i + 1])) or arg[i + 1]
    i = i + 2
  end
end

local ROOT = capture("pwd"):gsub("%s+$", "")
local OUT = ROOT .. "/" .. opts.out
sh("mkdir -p " .. OUT)

local function log(...) io.stderr:write(table.concat({ ... }), "\n") end

local function q(s) return "'" .. s:gsub("'", "'\\''") .. "'" end

-- Peers ---------------------------------------------------------------------

local function build_go()
  local bin = OUT .. "/peersbench-go"
  local src = OUT .. "/gopath/src/peersbench"
  sh("mkdir -p " .. src .. " && cp bench/peers/peersbench.go " .. src .. "/main.go")
  if sh(("[ %s -nt bench/peers/peersbench.go ]"):format(bin)) then return bin end
  log("building the Go clientv3 driver (GOPATH mode, Debian's golang-etcd-server-dev)")
  local ok = sh(("cd %s && GO111MODULE=off GOPROXY=off GOFLAGS= GOPATH=%s/gopath:/usr/share/gocode "
    .. "GOCACHE=%s/gocache go build -o %s . >%s/go-build.log 2>&1"):format(src, OUT, OUT, bin, OUT))
  return ok and bin or nil
end

local function install_node()
  local dir = OUT .. "/node"
  if sh("[ -d " .. dir .. "/node_modules/etcd3 ]") then return dir end
  log("installing Node etcd3 from npm into " .. dir)
  sh("mkdir -p " .. dir)
  local ok = sh(("cd %s && npm install --no-audit --no-fund --silent etcd3 >%s/npm.log 2>&1"):format(dir, OUT))
  return ok and dir or nil
end

-- Each peer: how to run a mode against an endpoint (host:port).
local PEERS = {}

PEERS.lua = {
  name = "lua-etcd3",
  available = function() return sh("[ -f build/lua5.4/etcd3/core.so ]") end,
  command = function(endpoint, args)
    return ("env LUA_PATH=%s LUA_CPATH=%s lua5.4 bench/lua_driver.lua -endpoint %s %s"):format(
      q(ROOT .. "/lua/?.lua;" .. ROOT .. "/lua/?/init.lua"), q(ROOT .. "/build/lua5.4/?.so"), endpoint, args)
  end,
}

PEERS.go = {
  name = "go-clientv3",
  available = function()
    PEERS.go.bin = build_go()
    return PEERS.go.bin ~= nil
  end,
  command = function(endpoint, args)
    args = args:gsub("%-timeout (%d+)", "-timeout %1s") -- a Go duration
    return ("%s -endpoint %s %s"):format(PEERS.go.bin, endpoint, args)
  end,
}

PEERS.python = {
  name = "python-etcd3",
  available = function() return sh("/usr/bin/python3 -c 'import etcd3' 2>/dev/null") end,
  command = function(endpoint, args)
    local host, port = endpoint:match("^(.*):(%d+)$")
    args = args:gsub("%-mode", "--mode"):gsub("%-prefix", "--prefix"):gsub("%-rev", "--rev"):gsub("%-timeout", "--timeout")
    return ("/usr/bin/python3 bench/peers/peersbench.py --host %s --port %s %s"):format(host, port, args)
  end,
}

PEERS.node = {
  name = "node-etcd3",
  available = function()
    PEERS.node.dir = install_node()
    return PEERS.node.dir ~= nil
  end,
  command = function(endpoint, args)
    return ("env NODE_PATH=%s/node_modules node bench/peers/peersbench.js --endpoint http://%s %s"):format(
      PEERS.node.dir, endpoint, args)
  end,
}

-- etcd on tmpfs, pinned to CPU 0 ----------------------------------------------

local function start_etcd()
  local dir = capture("mktemp -d /dev/shm/etcd3-bench.XXXXXX"):gsub("%s+$", "")
  local port, peer = helper.free_port(), helper.free_port()
  local ep = "127.0.0.1:" .. port
  local pid = tonumber(capture(("taskset -c 0 etcd --name bench --data-dir %s/data "
    .. "--listen-client-urls http://%s --advertise-client-urls http://%s "
    .. "--listen-peer-urls http://127.0.0.1:%d --initial-advertise-peer-urls http://127.0.0.1:%d "
    .. "--initial-cluster bench=http://127.0.0.1:%d >%s/etcd.log 2>&1 & echo $!"):format(
      dir, ep, ep, peer, peer, peer, dir)))
  helper.wait_for(function()
    return sh("ETCDCTL_API=3 etcdctl --endpoints=" .. ep .. " endpoint health >/dev/null 2>&1")
  end, 20, "etcd")
  return { endpoint = ep, pid = pid, dir = dir }
end

local function stop_etcd(e)
  sh("kill " .. e.pid .. " 2>/dev/null")
  helper.wait_for(function() return not sh("kill -0 " .. e.pid .. " 2>/dev/null") end, 10, "etcd to stop")
  sh("rm -rf " .. q(e.dir))
end

-- JSON lines (flat objects of numbers and strings) -----------------------------

local function parse(line)
  local t = {}
  for k, v in line:gmatch('"([%w_]+)"%s*:%s*("?[^,}]*)') do
    if v:sub(1, 1) == '"' then t[k] = v:sub(2, -2) else t[k] = tonumber(v) end
  end
  return t
end

local function run_json(cmd)
  local out = capture(cmd .. " 2>>" .. OUT .. "/stderr.log")
  for line in out:gmatch("[^\n]+") do
    if line:find("^{") then return parse(line) end
  end
  log("no result from: ", cmd, "\n", out)
  return nil
end

-- Workloads ---------------------------------------------------------------------

local function scaled(n) return math.max(1, math.floor(n / opts.scale)) end

local CLIENT_CPU = "taskset -c 1 "
local WRITER_CPU = "taskset -c 0 "

local workloads = {}

local function simple(id, mode, n, extra)
  workloads[#workloads + 1] = { id = id, run = function(peer, etcd, round)
    local args = ("-mode %s -n %d -prefix %s %s"):format(mode, scaled(n), id:lower() .. round .. "/", extra or "")
    return run_json(CLIENT_CPU .. peer.command(etcd.endpoint, args))
  end }
end

simple("A", "put", 5000)
simple("B", "get", 5000)
simple("C", "getser", 5000)
simple("D", "cput", 20000, "-c 64")

-- E: one prefix watcher (the peer) while the Go driver writes as fast as it
-- can from CPU 0; kept up = the watcher's last event within 1 s of the
-- writer's end.
workloads[#workloads + 1] = { id = "E", run = function(peer, etcd, round)
  local n = scaled(20000)
  local prefix = "e" .. round .. peer.name:sub(1, 2) .. "/"
  local errfile = OUT .. "/watcher.err"
  sh("rm -f " .. errfile)
  local watcher = io.popen(CLIENT_CPU .. peer.command(etcd.endpoint,
    ("-mode watch -n %d -prefix %s -timeout 120"):format(n, prefix)) .. " 2>" .. errfile)
  helper.wait_for(function()
    local f = io.open(errfile)
    local text = f and f:read("*a") or ""
    if f then f:close() end
    return text:find("READY")
  end, 30, "the watcher")
  local writer_cmd = PEERS.go.bin and PEERS.go.command(etcd.endpoint, ("-mode write -n %d -c 16 -prefix %s"):format(n, prefix))
    or PEERS.lua.command(etcd.endpoint, ("-mode write -n %d -c 16 -prefix %s"):format(n, prefix))
  local writer = run_json(WRITER_CPU .. writer_cmd)
  local writer_done = now()
  local out = watcher:read("*a")
  local watcher_done = now()
  watcher:close()
  local res
  for line in out:gmatch("[^\n]+") do if line:find("^{") then res = parse(line) end end
  if not res then return nil end
  res.writer_ops = writer and writer.ops
  res.lag_ms = (watcher_done - writer_done) * 1000
  res.kept_up = res.received == n and res.lag_ms < 1000 and 1 or 0
  return res
end }

-- F: cold start: process start + connect + one get, median of 10.
workloads[#workloads + 1] = { id = "F", run = function(peer, etcd)
  local times = {}
  for i = 1, opts.scale > 1 and 2 or 10 do
    local t0 = now()
    local ok = sh(CLIENT_CPU .. peer.command(etcd.endpoint, "-mode get1") .. " >/dev/null 2>&1")
    times[i] = ok and (now() - t0) * 1000 or math.huge
  end
  table.sort(times)
  return { workload = "F_cold_start", ms = times[math.floor((#times + 1) / 2)] }
end }

-- G: RSS of one process holding 1000 watchers.
workloads[#workloads + 1] = { id = "G", run = function(peer, etcd, round)
  local res = run_json(CLIENT_CPU .. peer.command(etcd.endpoint,
    ("-mode watchers -n %d -prefix %s"):format(scaled(1000), "g" .. round .. "/")))
  if res then res.rss_growth_mb = (res.rss_kb - res.rss_base_kb) / 1024 end
  return res
end }

-- Run -------------------------------------------------------------------------------

local function median(list)
  table.sort(list)
  if #list == 0 then return nil end
  return list[math.floor((#list + 1) / 2)]
end

local function machine()
  local cpu = capture("grep -m1 'model name' /proc/cpuinfo"):match(":%s*(.-)%s*$") or "?"
  return ("%s, %s cores, %s, etcd %s, %s"):format(cpu, capture("nproc"):gsub("%s", ""),
    capture("uname -sr"):gsub("%s+$", ""), (capture("etcd --version"):match("etcd Version: (%S+)") or "?"),
    os.date("!%Y-%m-%d %H:%M UTC"))
end

local peer_order = {}
for name in opts.peers:gmatch("[^,]+") do
  local p = assert(PEERS[name], "unknown peer " .. name)
  if p.available() then
    peer_order[#peer_order + 1] = p
  else
    log("peer ", p.name, " is not available: left out")
  end
end

local etcd = start_etcd()
local results = {} -- results[workload id][peer name] = { runs }
local jsonl = assert(io.open(OUT .. "/results.jsonl", "w"))
local ok, err = pcall(function()
  for _, w in ipairs(workloads) do
    results[w.id] = {}
    for round = 1, opts.rounds do
      for _, p in ipairs(peer_order) do
        local r = w.run(p, etcd, round)
        if r then
          r.peer, r.round = p.name, round
          local list = results[w.id][p.name] or {}
          list[#list + 1] = r
          results[w.id][p.name] = list
          local parts = {}
          for k, v in pairs(r) do parts[#parts + 1] = ("%q:%s"):format(k, type(v) == "number" and v or ("%q"):format(v)) end
          jsonl:write("{", table.concat(parts, ","), "}\n")
          log(("%s round %d %-13s done"):format(w.id, round, p.name))
        else
          log(("%s round %d %-13s FAILED"):format(w.id, round, p.name))
        end
      end
    end
  end
end)
jsonl:close()
stop_etcd(etcd)
if not ok then error(err) end

-- Table ---------------------------------------------------------------------------

local function med(id, peer, field)
  local list = {}
  for _, r in ipairs((results[id] or {})[peer] or {}) do
    if r[field] then list[#list + 1] = r[field] end
  end
  return median(list)
end

local lines = {}
local function out(s) lines[#lines + 1] = s end
out(("Machine: %s"):format(machine()))
out(("Set-up: etcd on tmpfs pinned to CPU 0, client on CPU 1, %d round(s) interleaved, medians; scale 1/%d"):format(
  opts.rounds, opts.scale))
out("")
out("| workload | client | ops/s | p50 ms | client CPU µs/op | ops ratio to Go | CPU ratio to Go | notes |")
out("|---|---|---:|---:|---:|---:|---:|---|")
local names = {
  A = "A serial put", B = "B serial get (linearizable)", C = "C serial get (serializable)",
  D = "D 64 puts in flight", E = "E watch 20000 puts (per event)", F = "F cold start", G = "G 1000 watchers",
}
local failed = 0
for _, w in ipairs(workloads) do
  local go_ops, go_cpu = med(w.id, "go-clientv3", "ops"), med(w.id, "go-clientv3", "cpu_us_per_op")
  local go_ms, go_rss = med(w.id, "go-clientv3", "ms"), med(w.id, "go-clientv3", "rss_growth_mb")
  for _, p in ipairs(peer_order) do
    local runs = (results[w.id] or {})[p.name]
    if not runs then
      failed = failed + 1
      out(("| %s | %s | — | — | — | — | — | failed |"):format(names[w.id], p.name))
    elseif w.id == "F" then
      local ms = med(w.id, p.name, "ms")
      out(("| %s | %s | | | | | | %.1f ms%s |"):format(names[w.id], p.name, ms,
        go_ms and (" (%.2f× Go's time)"):format(ms / go_ms) or ""))
    elseif w.id == "G" then
      local mb = med(w.id, p.name, "rss_growth_mb")
      out(("| %s | %s | | | | | | +%.1f MB RSS%s |"):format(names[w.id], p.name, mb,
        go_rss and (" (Go +%.1f MB)"):format(go_rss) or ""))
    else
      local ops, cpu, p50 = med(w.id, p.name, "ops"), med(w.id, p.name, "cpu_us_per_op"), med(w.id, p.name, "p50_ms")
      local note = ""
      if w.id == "E" then
        note = ("received %d, kept up %d/%d, lag %.0f ms"):format(med(w.id, p.name, "received") or 0,
          #(function() local k = {} for _, r in ipairs(runs) do if r.kept_up == 1 then k[#k + 1] = r end end return k end)(),
          #runs, med(w.id, p.name, "lag_ms") or 0)
      end
      out(("| %s | %s | %.0f | %s | %.1f | %s | %s | %s |"):format(names[w.id], p.name, ops or 0,
        p50 and ("%.3f"):format(p50) or "", cpu or 0,
        go_ops and ("%.2f×"):format(ops / go_ops) or "", go_cpu and ("%.2f×"):format(cpu / go_cpu) or "", note))
    end
  end
end
local table_text = table.concat(lines, "\n")
print(table_text)
local f = assert(io.open(OUT .. "/table.md", "w"))
f:write(table_text, "\n")
f:close()
if failed > 0 then os.exit(1) end
