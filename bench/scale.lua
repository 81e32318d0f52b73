-- Game-server scale (`make scale`): registrant processes keep --procs x
-- --per keys registered (client:register, TTL --ttl), --observers processes
-- follow the prefix the way examples/game_node.lua does (cli:mirror +
-- update loop). Then a tenth of the registrant processes (at least one) is
-- killed with SIGKILL at once: every observer must see exactly their keys
-- leave, each within TTL + 1 s of the kill, and no other change; they are
-- started again: every observer must see exactly those keys join. Last, one
-- process keeps --leases leases alive (grant + keepalive, TTL --lease-ttl)
-- and measures its own CPU while idle for --idle seconds.
--
-- Prints etcd's CPU per registration per second, the registrants' CPU and
-- RSS per registration, the observers' RSS per observed node and the time
-- they take to load the prefix, and the idle CPU of the lease keeper.
-- Exits non-zero when a check fails. Only the processes it started are
-- signalled, by their PIDs; its own etcd has its data dir on /dev/shm.
--
--   lua5.4 bench/scale.lua [--procs 20] [--per 50] [--observers 10] [--ttl 5]
--                          [--window 20] [--leases 1000] [--lease-ttl 10] [--idle 30]
-- (from the checkout, with LUA_PATH/LUA_CPATH set to the build tree, as
-- `make scale` and tools/env.sh do). The same file is the child processes:
--   bench/scale.lua registrant ENDPOINT PREFIX ID PER TTL
--   bench/scale.lua observer ENDPOINT PREFIX
--   bench/scale.lua leases ENDPOINT COUNT TTL SECONDS
local core = require "etcd3.core"
local harness = require "bench.harness"

local now, cpu, sleep, rss_kb = core.now, core.cpu_time, core.sleep, harness.rss_kb
local PREFIX = "/game/nodes/"

local function say(...)
  io.stdout:write(table.concat({ ... }, " "), "\n")
  io.stdout:flush()
end

-- Child processes --------------------------------------------------------------

local child = {}

-- Registers PER keys PREFIX.."pID-n" on one client, says "ready" with its
-- RSS before and after, then stays until killed.
function child.registrant(endpoint, prefix, id, per, ttl)
  local etcd3 = require "etcd3"
  local cli = assert(etcd3.new { endpoints = endpoint, timeout = 30 })
  assert(cli:get(prefix .. "none"))
  local rss0 = rss_kb()
  local regs = {}
  for n = 1, tonumber(per) do
    regs[n] = assert(cli:register(("%sp%03d-%04d"):format(prefix, tonumber(id), n), "127.0.0.1:7000 0",
      { ttl = tonumber(ttl) }))
  end
  say("ready", rss0, rss_kb())
  while #regs > 0 do sleep(3600) end -- (keeps them)
end

-- Loads the mirror of PREFIX (says "loaded" with the count, the seconds it
-- took and the RSS before and after), then says "join KEY TIME" and "leave
-- KEY TIME" (monotonic seconds, the clock of every process here) for each
-- change update() returns, until killed.
function child.observer(endpoint, prefix)
  local etcd3 = require "etcd3"
  local cli = assert(etcd3.new { endpoints = endpoint, timeout = 30 })
  assert(cli:get(prefix .. "none"))
  collectgarbage()
  local rss0, t0 = rss_kb(), now()
  local nodes = assert(cli:mirror(prefix))
  local took = now() - t0
  collectgarbage()
  say("loaded", nodes:count(), ("%.4f"):format(took), rss0, rss_kb())
  while true do
    local changes = assert(nodes:update(1))
    local at = now()
    for _, change in ipairs(changes) do
      if change.type == "DELETE" then
        say("leave", change.key, ("%.3f"):format(at))
      elseif not change.prev_value then
        say("join", change.key, ("%.3f"):format(at))
      else
        say("changed", change.key, ("%.3f"):format(at))
      end
    end
  end
end

-- Keeps COUNT leases alive, lets one renewal round pass, then says "idle"
-- with the CPU seconds the whole process used over SECONDS of idling and
-- how many leases are still alive.
function child.leases(endpoint, count, ttl, seconds)
  local etcd3 = require "etcd3"
  local cli = assert(etcd3.new { endpoints = endpoint, timeout = 30 })
  local leases = {}
  for i = 1, tonumber(count) do
    leases[i] = assert(cli:grant(tonumber(ttl)))
    leases[i]:keepalive()
  end
  say("ready", rss_kb())
  sleep(tonumber(ttl) / 3 + 1)
  local c0, w0 = cpu(), now()
  sleep(tonumber(seconds))
  local used, wall = cpu() - c0, now() - w0
  local alive = 0
  for i = 1, #leases do if leases[i]:alive() then alive = alive + 1 end end
  say("idle", ("%.6f"):format(used), ("%.3f"):format(wall), alive)
  for i = 1, #leases do leases[i]:revoke() end
  cli:close()
end

if child[arg[1]] then
  local unpack = table.unpack or unpack -- luacheck: ignore unpack
  child[arg[1]](unpack(arg, 2))
  os.exit(0)
end

-- The coordinator ----------------------------------------------------------------

local helper = require "spec.helpers.etcd"

local capture, sh, q = helper.capture, helper.sh, harness.quote
local opts = harness.options(arg, { procs = 20, per = 50, observers = 10, ttl = 5, window = 20,
  leases = 1000, ["lease-ttl"] = 10, idle = 30 })
local LUA = os.getenv("ETCD3_LUA") or arg[-1]
local SCRIPT = arg[0]
local TICKS = tonumber(capture("getconf CLK_TCK")) or 100
local dir = capture("mktemp -d /tmp/etcd3-scale.XXXXXX"):gsub("%s+$", "")

local function log(...) io.stderr:write(table.concat({ ... }), "\n"); io.stderr:flush() end

-- A child process: its PID and the lines it printed so far.
local Process = {}
Process.__index = Process
local started = {}

local function spawn(name, ...)
  local args = { q(LUA), q(SCRIPT) }
  for i, a in ipairs { ... } do args[i + 2] = q(tostring(a)) end
  local out = dir .. "/" .. name .. ".out"
  local pid = tonumber(capture(table.concat(args, " ") .. " >" .. q(out) .. " 2>&1 & echo $!"))
  assert(pid, "cannot start " .. name)
  local p = setmetatable({ name = name, pid = pid, out = out, lines = {}, partial = "" }, Process)
  started[#started + 1] = p
  return p
end

-- Reads what the process printed since last time; returns its lines.
function Process:read()
  local f = io.open(self.out)
  if not f then return self.lines end
  f:seek("set", self.offset or 0)
  local text = f:read("*a")
  self.offset = f:seek()
  f:close()
  text = self.partial .. text
  local complete = text:match("^.*\n") or ""
  self.partial = text:sub(#complete + 1)
  for line in complete:gmatch("([^\n]*)\n") do self.lines[#self.lines + 1] = line end
  return self.lines
end

-- The first line starting with `word`, split into fields, or nil.
function Process:said(word)
  for _, line in ipairs(self:read()) do
    if line:match("^" .. word .. "%f[%s%z]") then
      local fields = {}
      for field in line:gmatch("%S+") do fields[#fields + 1] = field end
      return fields
    end
  end
end

function Process:alive() return sh("kill -0 " .. self.pid .. " 2>/dev/null") end

-- Waits until every process said `word` (or one died); returns their fields.
local function wait_said(processes, word, timeout)
  local deadline = now() + timeout
  local fields = {}
  for i, p in ipairs(processes) do
    while true do
      fields[i] = p:said(word)
      if fields[i] then break end
      if not p:alive() then
        error(("%s exited before saying %q:\n%s"):format(p.name, word, table.concat(p:read(), "\n") .. p.partial))
      end
      if now() > deadline then error(("%s did not say %q within %d s"):format(p.name, word, timeout)) end
      sleep(0.05)
    end
  end
  return fields
end

-- CPU seconds (user + system, all threads) a process used so far.
local function cpu_of(pid)
  local f = io.open("/proc/" .. pid .. "/stat")
  if not f then return 0 end
  local stat = f:read("*a")
  f:close()
  -- the fields after the command name (which may hold spaces)
  local rest = stat:match("^.*%) (.*)$")
  local fields = {}
  for field in rest:gmatch("%S+") do fields[#fields + 1] = field end
  return (tonumber(fields[12]) + tonumber(fields[13])) / TICKS -- utime, stime
end

local function sum_cpu(processes)
  local total = 0
  for _, p in ipairs(processes) do total = total + cpu_of(p.pid) end
  return total
end

local function median(list)
  local s = {}
  for i, v in ipairs(list) do s[i] = v end
  table.sort(s)
  if #s == 0 then return 0 end
  return #s % 2 == 1 and s[(#s + 1) / 2] or (s[#s / 2] + s[#s / 2 + 1]) / 2
end

local function key_of(id, n) return ("%sp%03d-%04d"):format(PREFIX, id, n) end

-- Every observer's events of `kind` since line `from` must be exactly the
-- keys of `expected`, each once, at a time within [t0, t1]; any other line
-- is a failure. Returns the failures (strings) and the latest time seen.
local function check_events(observers, from, kind, expected, t0, t1)
  local failures, latest = {}, 0
  for i, o in ipairs(observers) do
    local seen = {}
    local lines = o:read()
    for j = from[i] + 1, #lines do
      local what, key, at = lines[j]:match("^(%a+) (%S+) (%S+)$")
      at = tonumber(at)
      if what ~= kind or not expected[key] then
        failures[#failures + 1] = ("%s: unexpected %q"):format(o.name, lines[j])
      elseif seen[key] then
        failures[#failures + 1] = ("%s: %s %s twice"):format(o.name, kind, key)
      elseif at < t0 or at > t1 then
        failures[#failures + 1] = ("%s: %s %s %.2f s after the %s, outside [0, %.2f]"):format(
          o.name, kind, key, at - t0, kind == "leave" and "kill" or "restart", t1 - t0)
        seen[key] = true
      else
        seen[key] = true
        if at - t0 > latest then latest = at - t0 end
      end
    end
    for key in pairs(expected) do
      if not seen[key] then failures[#failures + 1] = ("%s: never saw %s %s"):format(o.name, key, kind) end
    end
  end
  return failures, latest
end

-- Waits until every observer printed `count` lines after `from`, or the deadline.
local function wait_lines(observers, from, count, deadline)
  while now() < deadline do
    local all = true
    for i, o in ipairs(observers) do
      if #o:read() - from[i] < count then all = false; break end
    end
    if all then return end
    sleep(0.1)
  end
end

local function line_counts(observers)
  local counts = {}
  for i, o in ipairs(observers) do counts[i] = #o:read() end
  return counts
end

io.stdout:setvbuf("line")
local etcd
local function run()
  local total = opts.procs * opts.per
  etcd = harness.start_etcd()
  log(("scale: %d registrant processes x %d keys (%d), %d observers, TTL %d s, etcd %s (pid %d)"):format(
    opts.procs, opts.per, total, opts.observers, opts.ttl, etcd.endpoint, etcd.pid))

  -- registrants, all at once
  local t0 = now()
  local registrants = {}
  for id = 1, opts.procs do
    registrants[id] = spawn(("registrant-%03d"):format(id), "registrant", etcd.endpoint, PREFIX, id, opts.per, opts.ttl)
  end
  local ready = wait_said(registrants, "ready", 60 + total / 20)
  local rss_per_reg = {}
  for id, f in ipairs(ready) do rss_per_reg[id] = (tonumber(f[3]) - tonumber(f[2])) / opts.per end
  log(("registered %d keys in %.1f s"):format(total, now() - t0))

  -- observers
  local observers = {}
  for i = 1, opts.observers do observers[i] = spawn(("observer-%02d"):format(i), "observer", etcd.endpoint, PREFIX) end
  local loaded = wait_said(observers, "loaded", 60)
  local load_times, rss_per_node = {}, {}
  for i, f in ipairs(loaded) do
    if tonumber(f[2]) ~= total then error(("%s loaded %s nodes, not %d"):format(observers[i].name, f[2], total)) end
    load_times[i] = tonumber(f[3])
    rss_per_node[i] = (tonumber(f[5]) - tonumber(f[4])) / total
  end

  -- the steady state: etcd and the clients idle but for renewals
  local lines0 = line_counts(observers)
  local e0, r0, o0, w0 = cpu_of(etcd.pid), sum_cpu(registrants), sum_cpu(observers), now()
  sleep(opts.window)
  local wall = now() - w0
  local etcd_cpu = cpu_of(etcd.pid) - e0
  local registrant_cpu, observer_cpu = sum_cpu(registrants) - r0, sum_cpu(observers) - o0
  local quiet = check_events(observers, lines0, "none", {}, 0, 0)
  for _, f in ipairs(quiet) do log("!! during the steady state: ", f) end

  -- kill a tenth of the registrant processes at once, by PID
  local victims, expected, pids = {}, {}, {}
  local n_kill = math.max(1, math.floor(opts.procs / 10 + 0.5))
  for k = 1, n_kill do
    local id = math.floor((k - 1) * opts.procs / n_kill) + 1
    victims[#victims + 1] = id
    pids[#pids + 1] = registrants[id].pid
    for n = 1, opts.per do expected[key_of(id, n)] = true end
  end
  local before_kill = line_counts(observers)
  local t_kill = now()
  sh("kill -9 " .. table.concat(pids, " "))
  local bound = opts.ttl + 1
  wait_lines(observers, before_kill, n_kill * opts.per, t_kill + bound + 2)
  sleep(1) -- anything else that would come
  local kill_failures, latest_leave = check_events(observers, before_kill, "leave", expected, t_kill, t_kill + bound)
  log(("killed %d processes (%d keys): every observer saw them leave within %.2f s (bound %d s), %d failures"):format(
    n_kill, n_kill * opts.per, latest_leave, bound, #kill_failures))

  -- start them again
  local before_restart = line_counts(observers)
  local t_restart = now()
  local restarted = {}
  for _, id in ipairs(victims) do
    restarted[#restarted + 1] = spawn(("registrant-%03d-again"):format(id), "registrant", etcd.endpoint, PREFIX, id,
      opts.per, opts.ttl)
  end
  wait_said(restarted, "ready", 60)
  wait_lines(observers, before_restart, n_kill * opts.per, now() + 10)
  sleep(1)
  local join_failures, latest_join = check_events(observers, before_restart, "join", expected, t_restart, now())
  log(("restarted them: every observer saw them join within %.2f s, %d failures"):format(latest_join, #join_failures))

  -- stop the registrants and observers (by PID) before the lease keeper
  for _, p in ipairs(started) do sh("kill -9 " .. p.pid .. " 2>/dev/null") end

  local idle_pct, idle_alive = 0, 0
  if opts.leases > 0 then
    local keeper = spawn("leases", "leases", etcd.endpoint, opts.leases, opts["lease-ttl"], opts.idle)
    local f = wait_said({ keeper }, "idle", 60 + opts.leases / 50 + opts["lease-ttl"] + opts.idle)[1]
    idle_pct = 100 * tonumber(f[2]) / tonumber(f[3])
    idle_alive = tonumber(f[4])
  end

  local failures = {}
  for _, list in ipairs { quiet, kill_failures, join_failures } do
    for _, f in ipairs(list) do failures[#failures + 1] = f end
  end
  if opts.leases > 0 and idle_alive ~= opts.leases then
    failures[#failures + 1] = ("the lease keeper lost %d of its %d leases"):format(opts.leases - idle_alive, opts.leases)
  end

  local machine = capture("lscpu | sed -n 's/^Model name: *//p' | head -n 1"):gsub("%s+$", "")
  print(("\n## %s, %s, %s CPUs, kernel %s, etcd %s, %s"):format(os.date("%Y-%m-%d %H:%M"), machine,
    capture("nproc"):gsub("%s+$", ""), capture("uname -r"):gsub("%s+$", ""),
    capture("etcd --version"):match("etcd Version: (%S+)") or "?", LUA))
  print(("%d registrations (%d processes x %d, TTL %d s), %d observers, steady state %.0f s\n"):format(
    total, opts.procs, opts.per, opts.ttl, opts.observers, wall))
  print("| figure | value |")
  print("|---|---|")
  local function row(what, fmt, ...) print(("| %s | " .. fmt .. " |"):format(what, ...)) end
  row("etcd CPU per registration per second", "%.1f µs (%.1f %% of a core in all)",
    etcd_cpu / total / wall * 1e6, 100 * etcd_cpu / wall)
  row("registrant CPU per registration per second", "%.1f µs (%.2f %% of a core per process of %d)",
    registrant_cpu / total / wall * 1e6, 100 * registrant_cpu / wall / opts.procs, opts.per)
  row("registrant RSS per registration", "%.1f KiB (median of %d processes)", median(rss_per_reg), opts.procs)
  row("observer RSS per observed node", "%.2f KiB (median of %d)", median(rss_per_node), opts.observers)
  local slowest = 0
  for _, t in ipairs(load_times) do slowest = math.max(slowest, t) end
  row(("observer load time, %d nodes"):format(total), "%.1f ms (median of %d; max %.1f)",
    median(load_times) * 1e3, opts.observers, slowest * 1e3)
  row("observer CPU per observed node per second", "%.2f µs", observer_cpu / total / opts.observers / wall * 1e6)
  row(("kill -9 of %d processes: last leave seen"):format(n_kill), "%.2f s after the kill (bound %d s)",
    latest_leave, bound)
  row("restart: last join seen", "%.2f s after the restart", latest_join)
  if opts.leases > 0 then
    row(("idle CPU, %d leases kept alive (TTL %d s)"):format(opts.leases, opts["lease-ttl"]),
      "%.2f %% of a core over %d s", idle_pct, opts.idle)
  end
  print()
  for _, f in ipairs(failures) do print("FAILED: " .. f) end
  return #failures == 0
end

local ok, result = pcall(run)
for _, p in ipairs(started) do sh("kill -9 " .. p.pid .. " 2>/dev/null") end
if etcd then harness.stop_etcd(etcd) end
if not ok then log("scale: ", tostring(result)) end
if ok and result then sh("rm -rf " .. q(dir)) else log("scale: the processes' output is in ", dir) end
os.exit(ok and result and 0 or 1)
