-- lua-etcd3 driver for the peer workloads A-G and bench/stm.lua's hot key,
-- with the Go driver's CLI:
--   lua5.4 bench/lua_driver.lua -endpoint 127.0.0.1:23791 -mode put -n 5000
-- Prints one JSON line per measurement (as bench/peers/* do).
local etcd3 = require "etcd3"
local core = require "etcd3.core"

local opt = { endpoint = "127.0.0.1:23791", mode = "put", n = 5000, c = 64, prefix = "a/",
  rev = 0, timeout = 120, label = "" }
local i = 1
while i <= #arg do
  local k = arg[i]:gsub("^%-+", "")
  local v = arg[i + 1]
  if opt[k] == nil then io.stderr:write("unknown flag -", k, "\n") os.exit(2) end
  opt[k] = type(opt[k]) == "number" and tonumber((v:gsub("s$", ""))) or v
  i = i + 2
end

local GETKEY = "b/getkey00000000"
local VALUE = ("v"):rep(64)
local now, cpu = core.now, core.cpu_time

local function key(p, n) return ("%s%0" .. (16 - #p) .. "d"):format(p, n) end

local function emit(t)
  t.peer = "lua-etcd3"
  if opt.label ~= "" then t.label = opt.label end
  local parts = {}
  for k, v in pairs(t) do
    parts[#parts + 1] = ("%q:%s"):format(k, type(v) == "number" and ("%.6g"):format(v) or ("%q"):format(v))
  end
  table.sort(parts)
  io.write("{", table.concat(parts, ","), "}\n")
  io.flush()
end

local function pct(lat, p)
  table.sort(lat)
  local idx = math.floor(p * #lat + 0.5)
  if idx < 1 then idx = 1 end
  if idx > #lat then idx = #lat end
  return lat[idx] * 1000
end

local function rss_kb()
  local f = assert(io.open("/proc/self/status"))
  local v = tonumber(f:read("*a"):match("VmRSS:%s*(%d+)"))
  f:close()
  return v
end

-- The smallest scheduler a user would write: coroutines park in the wait
-- function; the loop polls the client's pollfd and resumes whose op is ready.
local waiting = {}
local function coroutine_wait(_, _, op)
  waiting[coroutine.running()] = op
  coroutine.yield()
end

local cli = assert(etcd3.new { endpoints = opt.endpoint, dial_timeout = 0,
  wait = (opt.mode == "cput" or opt.mode == "write") and coroutine_wait or nil })

local function serial(workload, op)
  local lat = {}
  local c0, t0 = cpu(), now()
  for n = 1, opt.n do
    local s = now()
    op(n)
    lat[n] = now() - s
  end
  local secs, cpu_ms = now() - t0, (cpu() - c0) * 1000
  emit { workload = workload, n = opt.n, secs = secs, ops = opt.n / secs, p50_ms = pct(lat, 0.5),
    p99_ms = pct(lat, 0.99), cpu_ms = cpu_ms, cpu_us_per_op = cpu_ms * 1000 / opt.n }
end

local function concurrent(workload)
  local nxt = 0
  local c0, t0 = cpu(), now()
  for _ = 1, opt.c do
    local co = coroutine.create(function()
      while true do
        local n = nxt
        nxt = nxt + 1
        if n >= opt.n then return end
        assert(cli:put(key(opt.prefix, n), VALUE))
      end
    end)
    assert(coroutine.resume(co))
  end
  local handle = cli._core
  while next(waiting) do
    handle:wait(1) -- poll(2) on the pollfd
    for co, op in pairs(waiting) do
      if op:ready() then
        waiting[co] = nil
        assert(coroutine.resume(co))
      end
    end
  end
  local secs, cpu_ms = now() - t0, (cpu() - c0) * 1000
  emit { workload = workload, n = opt.n, c = opt.c, secs = secs, ops = opt.n / secs,
    cpu_ms = cpu_ms, cpu_us_per_op = cpu_ms * 1000 / opt.n }
end

local mode = opt.mode
if mode == "put" then
  serial("A_serial_put", function(n) assert(cli:put(key(opt.prefix, n), VALUE)) end)
elseif mode == "get" or mode == "getser" then
  assert(cli:put(GETKEY, VALUE))
  local o = mode == "getser" and { serializable = true } or nil
  serial(mode == "get" and "B_serial_get_linearizable" or "C_serial_get_serializable", function()
    assert(#assert(cli:get(GETKEY, o)).kvs == 1, "missing key")
  end)
elseif mode == "cput" then
  concurrent("D_concurrent_put")
elseif mode == "write" then
  concurrent("E_writer")
elseif mode == "rev" then
  print(assert(cli:get(GETKEY)).header.revision)
elseif mode == "get1" then
  local kv = assert(cli:get(GETKEY)).kvs[1]
  if not kv then os.exit(1) end
  print(#kv.value)
elseif mode == "watch" then
  local w = assert(cli:watch(opt.prefix, { prefix = true, start_revision = opt.rev > 0 and opt.rev or nil }))
  local c0 = cpu()
  io.stderr:write("READY\n")
  io.stderr:flush()
  local got, first, last = 0, nil, nil
  local deadline = now() + opt.timeout
  while got < opt.n and now() < deadline do
    local ev, err = w:next(1)
    if ev then
      last = now()
      first = first or last
      got = got + 1
    elseif err.code ~= "TIMEOUT" then
      io.stderr:write("watch err: ", tostring(err), "\n")
      break
    end
  end
  local secs = first and (last - first) or 0
  local cpu_ms = (cpu() - c0) * 1000
  emit { workload = opt.rev > 0 and "E2_watch_replay" or "E_watch_live", n = opt.n, received = got,
    secs = secs, ops = secs > 0 and got / secs or 0, cpu_ms = cpu_ms,
    cpu_us_per_op = cpu_ms * 1000 / math.max(got, 1) }
elseif mode == "stm" then
  -- bench/stm.lua's worker: says it is ready (puts KEY/ready/LABEL), waits
  -- for KEY/go, then commits n STM increments of KEY (the default
  -- isolation, serializable snapshot, as Go's), counting the runs of the
  -- function (a run more than the commits is a conflict retried).
  local hot = opt.prefix
  local ready = assert(cli:put(hot .. "/ready/" .. opt.label, ""))
  local go = assert(cli:watch(hot .. "/go", { start_revision = ready.header.revision + 1 }))
  assert(go:next(60))
  go:cancel()
  local runs = 0
  local function increment(stm)
    runs = runs + 1
    stm:put(hot, tostring((tonumber(stm:get(hot)) or 0) + 1))
  end
  local c0, t0 = cpu(), now()
  for _ = 1, opt.n do assert(cli:stm(increment)) end
  local secs, cpu_ms = now() - t0, (cpu() - c0) * 1000
  emit { workload = "stm_hot_key", n = opt.n, commits = opt.n, runs = runs, secs = secs,
    cpu_ms = cpu_ms, cpu_us_per_op = cpu_ms * 1000 / opt.n }
elseif mode == "watchers" then
  collectgarbage()
  local base = rss_kb()
  local ws = {}
  for n = 1, opt.n do ws[n] = assert(cli:watch(key(opt.prefix, n - 1))) end
  core.sleep(2)
  emit { workload = "G_1000_watchers_rss", n = #ws, rss_base_kb = base, rss_kb = rss_kb() }
else
  io.stderr:write("unknown mode ", mode, "\n")
  os.exit(2)
end
cli:close()
