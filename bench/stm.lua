-- STM increments of one hot key from several processes, lua-etcd3 against
-- Go clientv3's concurrency.NewSTM (bench/README.md, "STM hot key").
--
--   lua5.4 bench/stm.lua [--n 500] [--procs 4] [--pairs 5]
--                        [--runtimes lua5.4,luajit] [--callgrind 200,1000]
--
-- (from the checkout, LUA_PATH/LUA_CPATH set to the build tree, as `make
-- bench-stm` does). One etcd member of its own (bench/harness.lua: data
-- dir on tmpfs, pinned to CPU 0); the workers pinned to CPU 1. A round is
-- --procs processes of one client, each committing --n increments of the
-- same key (read, +1, write, in the default isolation, serializable
-- snapshot, on both sides) from the same moment on: each says it is
-- ready, and the round puts the key they all wait for. Per round: commits
-- per second (all commits / the longest worker's time), conflicts retried
-- per commit, the workers' CPU per commit (getrusage of each over its
-- loop), etcd's CPU per commit, and whether the counter's final value is
-- the number of commits. Rounds run in pairs (lua-etcd3 then Go, Go then
-- lua-etcd3, ...) for each Lua runtime; the table gives the median of the
-- per-pair ratios with their min-max.
--
-- Then, unless --callgrind 0: valgrind's instructions per commit of one
-- worker alone (no conflict) of each client, the difference between two
-- runs of the two sizes given, over their difference in commits; the
-- callgrind files stay in OUT/stm-callgrind for callgrind_annotate.
local helper = require "spec.helpers.etcd"
local harness = require "bench.harness"
local etcd3 = require "etcd3"
local core = require "etcd3.core"

local now, capture, sh, q = core.now, helper.capture, helper.sh, harness.quote
local stats, fmt_ratio = harness.stats, harness.fmt_ratio

local opts = harness.options(arg, { n = 500, procs = 4, pairs = 5, runtimes = "lua5.4,luajit",
  callgrind = "200,1000", out = "build/bench" })

local ROOT = capture("pwd"):gsub("%s+$", "")
local OUT = ROOT .. "/" .. opts.out
sh("mkdir -p " .. OUT)
local function log(...) io.stderr:write(table.concat({ ... }), "\n") end

local CLIENT_CPU = "taskset -c 1 "

-- The clients -------------------------------------------------------------------

local go = { name = "go-clientv3", runtime = "go" }
local go_bin = assert(harness.build_go(OUT), "the Go driver did not build: see " .. OUT .. "/go-build.log")
function go.command(endpoint, args) return ("%s -endpoint %s %s"):format(go_bin, endpoint, args) end

local ours = {}
for lua in opts.runtimes:gmatch("[^,]+") do
  if sh(("[ -f build/%s/etcd3/core.so ]"):format(lua)) then
    ours[#ours + 1] = { name = "lua-etcd3 " .. lua, runtime = lua, command = function(endpoint, args)
      return harness.lua_driver_command(ROOT, lua, endpoint, args)
    end }
  else
    log("build/", lua, "/etcd3/core.so is missing (make LUA=", lua, "): ", lua, " left out")
  end
end
assert(#ours > 0, "no Lua runtime built")

-- One round ---------------------------------------------------------------------------

--- `procs` workers of `client` (their command behind `wrap`), `n` commits
-- each, on the key /stm/TAG; returns the round's figures.
local function round(client, etcd, cli, tag, procs, n, wrap)
  local key = "/stm/" .. tag
  local workers = {}
  for i = 1, procs do
    workers[i] = io.popen(wrap .. client.command(etcd.endpoint, ("-mode stm -n %d -prefix %s -label w%d"):format(
      n, key, i)) .. " 2>>" .. OUT .. "/stm-stderr.log")
  end
  helper.wait_for(function()
    return assert(cli:get(key .. "/ready/", { prefix = true, count_only = true })).count == procs
  end, 120, "the workers")
  local etcd_before = harness.etcd_cpu_us(etcd)
  assert(cli:put(key .. "/go", ""))
  local r = { commits = 0, runs = 0, secs = 0, cpu_ms = 0, workers = 0 }
  for _, w in ipairs(workers) do
    for line in w:read("a"):gmatch("[^\n]+") do
      if line:find("^{") then
        local res = harness.parse(line)
        r.workers = r.workers + 1
        r.commits, r.runs, r.cpu_ms = r.commits + res.commits, r.runs + res.runs, r.cpu_ms + res.cpu_ms
        r.secs = math.max(r.secs, res.secs)
      end
    end
    w:close()
  end
  local etcd_us = harness.etcd_cpu_us(etcd) - etcd_before
  if r.workers < procs then
    log(("%s: %d of %d workers reported (see %s/stm-stderr.log)"):format(client.name, r.workers, procs, OUT))
    return nil
  end
  local kv = assert(cli:get(key)).kvs[1]
  r.counter = kv and tonumber(kv.value) or 0
  r.exact = r.counter == r.commits and 1 or 0
  r.commits_per_s = r.commits / r.secs
  r.retries_per_commit = (r.runs - r.commits) / r.commits
  r.cpu_us_per_commit = r.cpu_ms * 1000 / r.commits
  r.etcd_cpu_us_per_commit = etcd_us / r.commits
  return r
end

-- Pairs ----------------------------------------------------------------------------------

local jsonl = assert(io.open(OUT .. "/stm.jsonl", "w"))
local function record(r)
  jsonl:write(harness.json(r), "\n")
  jsonl:flush()
end

local started, load_before = now(), harness.loadavg()
local pairs_of = {} -- runtime -> list of { ours = round, peer = round }
local instructions = {} -- client name -> instructions per commit
local inexact = 0
local etcd = harness.start_etcd("0")
local cli
local ok, err = pcall(function()
  cli = assert(etcd3.new { endpoints = etcd.endpoint })
  local runs = 0
  for pair = 1, opts.pairs do
    for _, lua in ipairs(ours) do
      local got = {}
      for pos, client in ipairs(pair % 2 == 1 and { lua, go } or { go, lua }) do
        runs = runs + 1
        local r = round(client, etcd, cli, tostring(runs), opts.procs, opts.n, CLIENT_CPU)
        if r then
          r.client, r.pair, r.against, r.position = client.name, pair, lua.name, pos
          record(r)
          got[client] = r
          if r.exact == 0 then
            inexact = inexact + 1
            log(("%s: the counter is %d after %d commits"):format(client.name, r.counter, r.commits))
          end
        end
      end
      if got[lua] and got[go] then
        pairs_of[lua.runtime] = pairs_of[lua.runtime] or {}
        table.insert(pairs_of[lua.runtime], { ours = got[lua], peer = got[go] })
      end
      log(("pair %d/%d %s vs %s: %s (%.0f s)"):format(pair, opts.pairs, lua.name, go.name,
        (got[lua] and got[go]) and ("%.0f vs %.0f commits/s"):format(got[lua].commits_per_s, got[go].commits_per_s)
        or "FAILED", now() - started))
    end
  end

  -- instructions per commit, one worker alone under callgrind
  local small, large = opts.callgrind:match("^(%d+),(%d+)$")
  if not small or not sh("command -v valgrind >/dev/null") then return end
  small, large = tonumber(small), tonumber(large)
  local dir = OUT .. "/stm-callgrind"
  sh("mkdir -p " .. dir)
  local clients = { go }
  for _, lua in ipairs(ours) do table.insert(clients, 1, lua) end
  for _, client in ipairs(clients) do
    -- Go's runtime reads the clock with rdtscp, which valgrind 3.19 does not
    -- know, and callgrind trips on its asynchronous preemption's signals:
    -- GODEBUG turns both off (bench/profile.sh does the same)
    local env = client == go and "GODEBUG=cpu.rdtscp=off,asyncpreemptoff=1 " or ""
    if not sh(env .. CLIENT_CPU .. "valgrind --tool=none --trace-children=yes " .. client.command(etcd.endpoint, "-mode rev")
      .. " >/dev/null 2>&1") then
      log(client.name, " does not run under valgrind: no instruction count")
      goto next_client
    end
    local counts = {}
    for _, n in ipairs { small, large } do
      runs = runs + 1
      local file = ("%s/%s.%d.out"):format(dir, client.runtime, n)
      local r = round(client, etcd, cli, tostring(runs), 1, n, env .. CLIENT_CPU .. ("valgrind --tool=callgrind "
        .. "--trace-children=yes --callgrind-out-file=%s "):format(q(file)))
      local f = r and io.open(file)
      local text = f and f:read("a") or ""
      if f then f:close() end
      counts[n] = tonumber(text:match("\nsummary: (%d+)") or text:match("\ntotals: (%d+)"))
    end
    if counts[small] and counts[large] then
      instructions[client.name] = (counts[large] - counts[small]) / (large - small)
      log(("%s: %.0f instructions per commit under callgrind"):format(client.name, instructions[client.name]))
    else
      log(client.name, ": no callgrind figure (see ", OUT, "/stm-stderr.log)")
    end
    ::next_client::
  end
end)
if cli then cli:close() end
jsonl:close()
harness.stop_etcd(etcd)
if not ok then error(err) end

-- Table ------------------------------------------------------------------------------------

local function median(list) return (stats(list)) end
local function column(list, field)
  local a, b, r = {}, {}, {}
  for i, pr in ipairs(list) do
    a[i], b[i] = pr.ours[field], pr.peer[field]
    r[i] = b[i] > 0 and a[i] / b[i] or nil
  end
  return a, b, r
end

local lines = {
  ("Machine: %s; load average (1, 5, 15 min) %s before, %s after"):format(harness.machine(), load_before,
    harness.loadavg()),
  "",
  ("Set-up: etcd on tmpfs pinned to CPU 0, the %d workers on CPU 1; %d increments per worker; %d pair(s) per "
    .. "runtime, order alternating; medians, ratios per pair (lua-etcd3 / Go): median (min–max); %.0f s in all"):format(
    opts.procs, opts.n, opts.pairs, now() - started),
  "",
  "| client | commits/s lua / Go | commits/s ratio | retries per commit lua / Go | client CPU µs/commit lua / Go "
    .. "| client CPU ratio | etcd CPU µs/commit lua / Go | etcd CPU ratio | counter exact |",
  "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
}
local failed = 0
for _, lua in ipairs(ours) do
  local list = pairs_of[lua.runtime] or {}
  if #list < opts.pairs then failed = failed + 1 end
  if #list == 0 then
    lines[#lines + 1] = ("| %s vs %s | failed |  |  |  |  |  |  |  |"):format(lua.name, go.name)
  else
    local ca, cb, cr = column(list, "commits_per_s")
    local ra, rb = column(list, "retries_per_commit")
    local ua, ub, ur = column(list, "cpu_us_per_commit")
    local ea, eb, er = column(list, "etcd_cpu_us_per_commit")
    local xa, xb = column(list, "exact")
    local function sum(t) local s = 0 for _, v in ipairs(t) do s = s + v end return s end
    lines[#lines + 1] = ("| %s vs %s | %.0f / %.0f | %s | %.2f / %.2f | %.0f / %.0f | %s | %.0f / %.0f | %s | %d/%d, %d/%d |")
      :format(lua.name, go.name, median(ca), median(cb), fmt_ratio(cr), median(ra), median(rb), median(ua),
        median(ub), fmt_ratio(ur), median(ea), median(eb), fmt_ratio(er), sum(xa), #list, sum(xb), #list)
  end
end
if next(instructions) then
  lines[#lines + 1] = ""
  local cg = {}
  for _, client in ipairs(ours) do cg[#cg + 1] = client end
  cg[#cg + 1] = go
  local small, large = opts.callgrind:match("^(%d+),(%d+)$")
  local parts = {}
  for _, client in ipairs(cg) do
    if instructions[client.name] then
      parts[#parts + 1] = ("%s %.0f"):format(client.name, instructions[client.name])
    else
      parts[#parts + 1] = client.name .. " (no figure)"
    end
  end
  lines[#lines + 1] = ("Instructions per commit, one worker alone under callgrind ((%s - %s commits) / %d, "
    .. "every thread): %s"):format(large, small, large - small, table.concat(parts, ", "))
end

harness.publish(table.concat(lines, "\n"), OUT .. "/stm.md")
if failed > 0 or inexact > 0 then os.exit(1) end
