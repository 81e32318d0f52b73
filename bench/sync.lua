-- Linearizable reads two ways (`make bench-sync`, bench/README.md
-- "Mirror sync"): a linearizable `get` of one key (workload B), against
-- `m:sync()` then `m:get()` on a mirror of the key's prefix, in pairs of
-- rounds (get, sync, get, sync, ...), serially on one client.
--
-- Two cases:
-- - quiet: nothing else writes, so sync's one count-only read of the
--   prefix key finds the copy current;
-- - moved: before each read the same client puts a key outside the prefix
--   (not timed), so etcd's revision is always ahead of the copy and every
--   sync also reads the prefix at that revision, sorted by modification,
--   one key returned (its cost grows with --keys).
--
-- Per round: the reads' latency (p50, p99), the client's CPU per read (the
-- whole loop: in "moved" it includes the put) and etcd's CPU per read (from
-- /proc/PID/stat). Prints each round, then the median of the per-pair
-- ratios (sync / get) with their spread, and checks every read returned
-- the value last written.
--
--   lua5.4 bench/sync.lua [--keys 1000] [--reads 2000] [--pairs 5]
-- (from the checkout, with LUA_PATH/LUA_CPATH set to the build tree, as
-- `make bench-sync` does). Starts and stops its own etcd member.
local core = require "etcd3.core"
local etcd3 = require "etcd3"
local harness = require "bench.harness"

local now, cpu = core.now, core.cpu_time
local opts = harness.options(arg, { keys = 1000, reads = 2000, pairs = 5 })
local PREFIX, KEY = "/bench/sync/", "/bench/sync/k0001"

--- etcd's CPU seconds so far (utime + stime of its PID).
local function etcd_cpu(pid)
  local f = assert(io.open("/proc/" .. pid .. "/stat"))
  local stat = f:read("*a")
  f:close()
  local fields = {}
  for x in stat:match("%) (.*)$"):gmatch("%S+") do fields[#fields + 1] = x end
  -- (fields from the state on: utime and stime are the 12th and 13th)
  return (tonumber(fields[12]) + tonumber(fields[13])) / 100
end

local function percentile(sorted, p)
  return sorted[math.max(1, math.ceil(#sorted * p))]
end

local function median(list)
  local s = {}
  for i, v in ipairs(list) do s[i] = v end
  table.sort(s)
  local n = #s
  if n % 2 == 1 then return s[(n + 1) / 2] end
  return (s[n / 2] + s[n / 2 + 1]) / 2
end

--- One round of `reads` reads: "get" or "sync"; `moved` puts outside the
-- prefix before each. Returns { p50, p99, cpu, etcd } (seconds per read).
local function round(cli, m, etcd_pid, how, moved, reads)
  local lat = {}
  local cpu0, etcd0 = cpu(), etcd_cpu(etcd_pid)
  for i = 1, reads do
    if moved then assert(cli:put("/bench/outside", tostring(i))) end
    local t0 = now()
    local value
    if how == "get" then
      value = assert(cli:get(KEY)).kvs[1].value
    else
      assert(m:sync())
      value = m:get(KEY)
    end
    lat[i] = now() - t0
    assert(value == "v0", "read " .. i .. " returned " .. tostring(value))
  end
  assert(m:update()) -- (the copy reports nothing: nothing changed under the prefix)
  table.sort(lat)
  return {
    p50 = percentile(lat, 0.5), p99 = percentile(lat, 0.99),
    cpu = (cpu() - cpu0) / reads, etcd = (etcd_cpu(etcd_pid) - etcd0) / reads,
  }
end

local etcd = harness.start_etcd()
local ok, err = pcall(function()
  local cli = assert(etcd3.new { endpoints = etcd.endpoint, timeout = 10 })
  local value = ("x"):rep(256)
  for i = 1, opts.keys do assert(cli:put(("%sk%04d"):format(PREFIX, i), i == 1 and "v0" or value)) end
  local m = assert(cli:mirror(PREFIX))
  local f = io.open("/proc/cpuinfo")
  local model = f and f:read("*a"):match("model name%s*:%s*([^\n]+)") or "?"
  if f then f:close() end
  print(("machine: %s, kernel %s; %d keys of 256 B under the prefix, %d serial reads per round")
    :format(model, (io.popen("uname -r"):read("*l")), opts.keys, opts.reads))
  for _, moved in ipairs { false, true } do
    local case = moved and "moved" or "quiet"
    local ratios = { p50 = {}, p99 = {}, cpu = {}, etcd = {} }
    for pair = 1, opts.pairs do
      local g = round(cli, m, etcd.pid, "get", moved, opts.reads)
      local s = round(cli, m, etcd.pid, "sync", moved, opts.reads)
      for k in pairs(ratios) do ratios[k][pair] = s[k] / g[k] end
      print(("%s pair %d: get p50 %.0f us p99 %.0f us cpu %.0f us etcd %.0f us | "
        .. "sync+get p50 %.0f us p99 %.0f us cpu %.0f us etcd %.0f us"):format(case, pair,
        g.p50 * 1e6, g.p99 * 1e6, g.cpu * 1e6, g.etcd * 1e6, s.p50 * 1e6, s.p99 * 1e6, s.cpu * 1e6, s.etcd * 1e6))
    end
    local line = {}
    for _, k in ipairs { "p50", "p99", "cpu", "etcd" } do
      local r = ratios[k]
      line[#line + 1] = ("%s %.2fx (%.2f-%.2f)"):format(k, median(r), math.min(table.unpack(r)),
        math.max(table.unpack(r)))
    end
    print(("%s: sync+local read / linearizable get, median of %d pairs: %s"):format(case, opts.pairs,
      table.concat(line, ", ")))
  end
  m:close()
  cli:close()
end)
harness.stop_etcd(etcd)
if not ok then
  io.stderr:write(tostring(err), "\n")
  os.exit(1)
end
