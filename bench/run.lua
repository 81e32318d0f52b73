-- The side-by-side benchmark: lua-etcd3 against Go clientv3, python-etcd3
-- and Node etcd3 on one etcd, in one run, measured in pairs.
--
--   lua5.4 bench/run.lua [--scale N] [--pairs P] [--peers go,python,node]
--   lua5.4 bench/run.lua --from build/bench/results.jsonl   (the table again, no run)
--
-- Set-up (bench/README.md): one etcd member with its data dir on tmpfs,
-- pinned to CPU 0; the measured client pinned to CPU 1. Every workload runs
-- as pairs: lua-etcd3 and one peer back to back, `pairs` times per peer, the
-- order alternating (ours-peer, peer-ours, ...). This shared machine drifts
-- by up to 2x from one minute to the next; both halves of a pair see about
-- the same machine, so the ratio within a pair is what the table trusts: it
-- reports the median of the per-pair ratios with their min-max, besides the
-- medians of the absolute figures. `--scale 50 --pairs 1` is the smoke run
-- CI does (every workload, every client, at 1/50 size).
local helper = require "spec.helpers.etcd"
local harness = require "bench.harness"
local core = require "etcd3.core"

local now, capture, sh = core.now, helper.capture, helper.sh

local opts = harness.options(arg, { scale = 1, pairs = 7, peers = "go,python,node", out = "build/bench", from = "" })

local ROOT = capture("pwd"):gsub("%s+$", "")
local OUT = ROOT .. "/" .. opts.out
sh("mkdir -p " .. OUT)

local function log(...) io.stderr:write(table.concat({ ... }), "\n") end

-- Peers ---------------------------------------------------------------------

local function build_go() return harness.build_go(OUT) end

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
  command = function(endpoint, args) return harness.lua_driver_command(ROOT, "lua5.4", endpoint, args) end,
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

local function start_etcd() return harness.start_etcd("0") end
local stop_etcd = harness.stop_etcd

-- JSON lines (flat objects of numbers and strings) -----------------------------

local parse = harness.parse

local function run_json(cmd)
  local out = capture(cmd .. " 2>>" .. OUT .. "/stderr.log")
  for line in out:gmatch("[^\n]+") do
    if line:find("^{") then return parse(line) end
  end
  log("no result from: ", cmd, "\n", out)
  return nil
end

-- Workloads ---------------------------------------------------------------------
--
-- Sizes are those of the full run; `--scale` divides them. They were
-- shortened from the first harness (A-C 5000, D and E 20000, F 10 starts) so
-- that 7 pairs per peer (42 runs of each workload) stay under 15 minutes
-- even with the machine's load average near 12 (18 minutes with A-C 2000,
-- D and E 6000, F 5 starts).

local function scaled(n) return math.max(1, math.floor(n / opts.scale)) end

local CLIENT_CPU = "taskset -c 1 "
local WRITER_CPU = "taskset -c 0 "

local SIZES = { A = 1500, B = 1500, C = 1500, D = 4000, E = 4000, F = 3, G = 1000 }
local NAMES = {
  A = "A serial put", B = "B serial get (linearizable)", C = "C serial get (serializable)",
  D = "D 64 puts in flight", E = ("E watch %d puts (per event)"):format(scaled(SIZES.E)),
  F = "F cold start (ms)", G = ("G %d watchers (RSS growth, MB)"):format(scaled(SIZES.G)),
}

-- Every workload: run(peer, etcd, tag) -> one result table or nil. `tag` is
-- unique to the run, so no two runs share keys. `value` is the field the
-- table compares; `higher` tells whether more of it is better.
local workloads = {}

local etcd_cpu_us = harness.etcd_cpu_us

-- A-D also record etcd's CPU per operation: what serving this client cost
-- the server (bench/README.md, "Why serial throughput stops at parity").
local function simple(id, mode, extra)
  workloads[#workloads + 1] = { id = id, value = "ops", higher = true, run = function(peer, etcd, tag)
    local n = scaled(SIZES[id])
    local args = ("-mode %s -n %d -prefix %s %s"):format(mode, n, id:lower() .. tag .. "/", extra or "")
    local before = etcd_cpu_us(etcd)
    local r = run_json(CLIENT_CPU .. peer.command(etcd.endpoint, args))
    if r then r.etcd_cpu_us_per_op = (etcd_cpu_us(etcd) - before) / n end
    return r
  end }
end

simple("A", "put")
simple("B", "get")
simple("C", "getser")
simple("D", "cput", "-c 64")

-- E: one prefix watcher (the measured client) while the Go driver writes as
-- fast as it can from CPU 0; kept up = the watcher's last event within 1 s
-- of the writer's end.
workloads[#workloads + 1] = { id = "E", value = "ops", higher = true, run = function(peer, etcd, tag)
  local n = scaled(SIZES.E)
  local prefix = "e" .. tag .. "/"
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
  local write_args = ("-mode write -n %d -c 16 -prefix %s"):format(n, prefix)
  local writer_cmd = PEERS.go.bin and PEERS.go.command(etcd.endpoint, write_args)
    or PEERS.lua.command(etcd.endpoint, write_args)
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

-- F: cold start: process start + connect + one get; the median of a few.
workloads[#workloads + 1] = { id = "F", value = "ms", higher = false, run = function(peer, etcd)
  local times = {}
  for i = 1, scaled(SIZES.F) < 2 and 2 or SIZES.F do
    local t0 = now()
    local ok = sh(CLIENT_CPU .. peer.command(etcd.endpoint, "-mode get1") .. " >/dev/null 2>&1")
    if not ok then return nil end
    times[i] = (now() - t0) * 1000
  end
  table.sort(times)
  return { workload = "F_cold_start", ms = times[math.floor((#times + 1) / 2)] }
end }

-- G: RSS growth of one process for its watchers.
workloads[#workloads + 1] = { id = "G", value = "rss_growth_mb", higher = false, run = function(peer, etcd, tag)
  local res = run_json(CLIENT_CPU .. peer.command(etcd.endpoint,
    ("-mode watchers -n %d -prefix %s"):format(scaled(SIZES.G), "g" .. tag .. "/")))
  if res then res.rss_growth_mb = (res.rss_kb - res.rss_base_kb) / 1024 end
  return res
end }

-- Run -------------------------------------------------------------------------------

local machine, loadavg = harness.machine, harness.loadavg
local ours = PEERS.lua
local peers = {}
-- pairs[workload id][peer name] = list of { ours = result, peer = result }
local pairs_of = {}
local header

-- Runs every workload in pairs; records every measurement in results.jsonl.
local function run_all()
  assert(ours.available(), "build/lua5.4/etcd3/core.so is missing: run make LUA=lua5.4 first")
  for name in opts.peers:gmatch("[^,]+") do
    local p = assert(PEERS[name], "unknown peer " .. name)
    if p == ours then
      log("lua-etcd3 is in every pair: --peers names the others only")
    elseif p.available() then
      peers[#peers + 1] = p
    else
      log("peer ", p.name, " is not available: left out")
    end
  end
  -- E's writer is the Go driver even when Go is not among the peers measured.
  if not PEERS.go.bin then PEERS.go.bin = build_go() end

  local jsonl = assert(io.open(OUT .. "/results.jsonl", "w"))
  local function record(r)
    jsonl:write(harness.json(r), "\n")
    jsonl:flush()
  end

  local started, load_before = now(), loadavg()
  local etcd = start_etcd()
  local ok, err = pcall(function()
    local runs = 0
    for _, w in ipairs(workloads) do
      pairs_of[w.id] = {}
      for pair = 1, opts.pairs do
        for _, p in ipairs(peers) do
          -- ours-peer on odd pairs, peer-ours on even ones: whatever a
          -- client gains from going first or second (warm caches, etcd's
          -- compaction, a neighbour's load) cancels out over the pairs.
          local order = pair % 2 == 1 and { ours, p } or { p, ours }
          local got = {}
          for pos, client in ipairs(order) do
            runs = runs + 1
            local r = w.run(client, etcd, tostring(runs))
            if r then
              r.id, r.peer, r.pair, r.against, r.position = w.id, client.name, pair, p.name, pos
              record(r)
              got[client] = r
            else
              log(("%s pair %d %-13s FAILED"):format(w.id, pair, client.name))
            end
          end
          if got[ours] and got[p] then
            local list = (pairs_of[w.id] or {})[p.name] or {}
            list[#list + 1] = { ours = got[ours], peer = got[p] }
            pairs_of[w.id][p.name] = list
          end
          log(("%s pair %d/%d vs %-13s %s (%.0f s)"):format(w.id, pair, opts.pairs, p.name,
            (got[ours] and got[p]) and "done" or "FAILED", now() - started))
        end
      end
    end
  end)
  jsonl:close()
  stop_etcd(etcd)
  if not ok then error(err) end
  header = {
    ("Machine: %s; load average (1, 5, 15 min) %s before, %s after"):format(machine(), load_before, loadavg()),
    ("Set-up: etcd on tmpfs pinned to CPU 0, client on CPU 1; %d pair(s) per peer, order alternating; "
      .. "medians, ratios are per pair (lua-etcd3 / peer): median (min–max); scale 1/%d; %.0f s in all"):format(
      opts.pairs, opts.scale, now() - started),
  }
end

-- Reads the pairs back from a results.jsonl (--from): the table again.
local function read_results(path)
  local by_pair = {}
  local names = {}
  for line in io.lines(path) do
    local r = parse(line)
    local id = r.id or (r.workload or ""):sub(1, 1) -- runs recorded before `id` was
    local key = id .. "\0" .. r.against .. "\0" .. r.pair
    local pr = by_pair[key] or { id = id, against = r.against, pair = r.pair }
    by_pair[key] = pr
    if r.peer == ours.name then pr.ours = r else pr.peer = r end
    names[r.against] = true
  end
  for _, name in ipairs { "go", "python", "node" } do
    if names[PEERS[name].name] then peers[#peers + 1] = PEERS[name] end
  end
  local keys = {}
  for k in pairs(by_pair) do keys[#keys + 1] = k end
  table.sort(keys, function(a, b)
    local x, y = by_pair[a], by_pair[b]
    if x.id ~= y.id then return x.id < y.id end
    if x.against ~= y.against then return x.against < y.against end
    return x.pair < y.pair
  end)
  local most = 0
  for _, k in ipairs(keys) do
    local pr = by_pair[k]
    if pr.ours and pr.peer then
      pairs_of[pr.id] = pairs_of[pr.id] or {}
      local list = pairs_of[pr.id][pr.against] or {}
      list[#list + 1] = pr
      pairs_of[pr.id][pr.against] = list
      if #list > most then most = #list end
    end
  end
  opts.pairs = most
  header = { ("From %s: %d pair(s) per peer; ratios are per pair (lua-etcd3 / peer): median (min–max)"):format(
    path, most) }
end

if opts.from ~= "" then read_results(opts.from) else run_all() end

-- Table ---------------------------------------------------------------------------

local stats = harness.stats
local function median(list) return (stats(list)) end

-- The values of one field over a list of pairs: ours, the peer's, and the
-- per-pair ratios ours / peer's.
local function column(list, field)
  local a, b, r = {}, {}, {}
  for _, pr in ipairs(list) do
    local x, y = pr.ours[field], pr.peer[field]
    if x and y then
      a[#a + 1], b[#b + 1] = x, y
      if y > 0 then r[#r + 1] = x / y end
    end
  end
  return a, b, r
end

local function fmt_num(v, digits)
  if not v then return "" end
  return ("%." .. (digits or 0) .. "f"):format(v)
end

local fmt_ratio = harness.fmt_ratio

local lines = {}
local function out(s) lines[#lines + 1] = s end
for i, h in ipairs(header) do
  if i > 1 then out("") end
  out(h)
end
out("")
out("| workload | peer | lua-etcd3 ops/s | peer ops/s | ops/s ratio | lua-etcd3 CPU µs/op | peer CPU µs/op "
  .. "| CPU/op ratio | p50 ms lua / peer | notes |")
out("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
local failed = 0
for _, w in ipairs(workloads) do
  for _, p in ipairs(peers) do
    local list = (pairs_of[w.id] or {})[p.name] or {}
    if #list < opts.pairs then failed = failed + 1 end
    if #list == 0 then
      out(("| %s | %s | — | — | — | — | — | — | — | failed |"):format(NAMES[w.id], p.name))
    elseif w.id == "F" or w.id == "G" then
      local a, b, r = column(list, w.value)
      local unit = w.id == "F" and " ms" or " MB"
      out(("| %s | %s | | | | | | | | lua-etcd3 %s%s, peer %s%s, ratio %s%s |"):format(NAMES[w.id], p.name,
        fmt_num(median(a), 1), unit, fmt_num(median(b), 1), unit, fmt_ratio(r),
        #list < opts.pairs and (", %d/%d pairs"):format(#list, opts.pairs) or ""))
    else
      local a, b, r = column(list, "ops")
      local ca, cb, cr = column(list, "cpu_us_per_op")
      local pa, pb = column(list, "p50_ms")
      local note = {}
      if #list < opts.pairs then note[#note + 1] = ("%d/%d pairs"):format(#list, opts.pairs) end
      local ea, eb, er = column(list, "etcd_cpu_us_per_op")
      if #er > 0 then
        note[#note + 1] = ("etcd CPU µs/op %.0f vs %.0f, ratio %s"):format(median(ea), median(eb), fmt_ratio(er))
      end
      if w.id == "E" then
        local kept = { 0, 0 }
        for _, pr in ipairs(list) do
          kept[1], kept[2] = kept[1] + (pr.ours.kept_up or 0), kept[2] + (pr.peer.kept_up or 0)
        end
        local la, lb = column(list, "lag_ms")
        note[#note + 1] = ("kept up %d/%d vs %d/%d, lag %.0f vs %.0f ms"):format(kept[1], #list, kept[2], #list,
          median(la) or 0, median(lb) or 0)
      end
      out(("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |"):format(NAMES[w.id], p.name,
        fmt_num(median(a)), fmt_num(median(b)), fmt_ratio(r), fmt_num(median(ca), 1), fmt_num(median(cb), 1),
        fmt_ratio(cr), #pa > 0 and ("%.3f / %.3f"):format(median(pa), median(pb)) or "", table.concat(note, "; ")))
    end
  end
end

-- The drift the pairs are there for: how far each client's own figure moved
-- from run to run (max / min over all its runs of the workload), for the
-- throughput (or F's time, G's RSS) and for the CPU per operation.
out("")
out("Run-to-run spread of the absolute figures (max / min over each client's runs; "
  .. "lua-etcd3 ran in every pair): ops/s, then CPU/op:")
out("")
out("| workload | " .. ours.name)
for _, p in ipairs(peers) do lines[#lines] = lines[#lines] .. " | " .. p.name end
lines[#lines] = lines[#lines] .. " |"
out("|---|" .. ("---:|"):rep(#peers + 1))
local function spread(list)
  local _, lo, hi = stats(list)
  if not lo or lo <= 0 then return nil end
  return ("%.2f×"):format(hi / lo)
end
for _, w in ipairs(workloads) do
  local fields = w.value == "ops" and { "ops", "cpu_us_per_op" } or { w.value }
  local function cell(lists)
    local parts = {}
    for i, field in ipairs(fields) do
      local all = {}
      for _, list in ipairs(lists) do
        local a, b = column(list.pairs, field)
        for _, v in ipairs(list.ours and a or b) do all[#all + 1] = v end
      end
      parts[i] = spread(all) or "—"
    end
    return table.concat(parts, " / ")
  end
  local row = { NAMES[w.id] }
  local mine = {}
  for _, p in ipairs(peers) do mine[#mine + 1] = { pairs = (pairs_of[w.id] or {})[p.name] or {}, ours = true } end
  row[#row + 1] = cell(mine)
  for _, p in ipairs(peers) do row[#row + 1] = cell { { pairs = (pairs_of[w.id] or {})[p.name] or {} } } end
  out("| " .. table.concat(row, " | ") .. " |")
end

harness.publish(table.concat(lines, "\n"), OUT .. "/table.md")
if failed > 0 then os.exit(1) end
