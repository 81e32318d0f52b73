-- Overload and scale on one client, each step printing time, process CPU
-- and RSS (the limits met must be clear errors, never crashes):
--   calls     N coroutines with a put each in flight at once (default 10 000)
--   range     a range read of M MiB (default 100: 100 values of 1 MiB)
--   leases    L leases kept alive by the engine for 3 TTLs (default 1000)
-- Watchers at scale: bench/watchers.lua. Exits non-zero when a step did
-- not complete (`make overload`; `make test` runs it at a small size).
--
--   lua5.4 tools/with-etcd.lua lua5.4 bench/overload.lua [N M L]
-- (from the checkout, with LUA_PATH/LUA_CPATH set to the build tree).
local etcd3 = require "etcd3"
local core = require "etcd3.core"

local now, cpu = core.now, core.cpu_time
local endpoint = os.getenv("ETCDCTL_ENDPOINTS") or "127.0.0.1:2379"
local N = tonumber(arg[1]) or 10000
local M = tonumber(arg[2]) or 100
local L = tonumber(arg[3]) or 1000

local function rss_mb()
  local f = assert(io.open("/proc/self/status"))
  local v = tonumber(f:read("*a"):match("VmRSS:%s*(%d+)"))
  f:close()
  return v / 1024
end

local function report(what, w0, c0)
  io.write(("%-44s %8.2f s wall %8.2f s cpu   RSS %7.1f MB\n"):format(what, now() - w0, cpu() - c0, rss_mb()))
  io.flush()
end

-- N coroutines, each with one put in flight, on one client: the smallest
-- scheduler of README "Waiting", waking on the pollfd.
do
  local waiting = {}
  local cli = assert(etcd3.new { endpoints = endpoint, timeout = 120, dial_timeout = 0, wait = function(_, _, op)
    waiting[coroutine.running()] = op
    coroutine.yield()
  end })
  local core_client = cli:_handle("overload")
  local w0, c0 = now(), cpu()
  local done, failed = 0, 0
  for i = 1, N do
    local co = coroutine.create(function()
      local ok, err = cli:put(("/overload/%06d"):format(i), "v")
      if ok then done = done + 1 else failed = failed + 1; io.stderr:write(tostring(err), "\n") end
    end)
    assert(coroutine.resume(co))
  end
  local in_flight = 0
  for _ in pairs(waiting) do in_flight = in_flight + 1 end
  while next(waiting) do
    core_client:wait(0.1) -- the pollfd
    for co, op in pairs(waiting) do
      if op:ready() then waiting[co] = nil; assert(coroutine.resume(co)) end
    end
  end
  report(("calls: %d coroutines (%d in flight at once), %d ok, %d failed"):format(N, in_flight, done, failed), w0, c0)
  assert(failed == 0 and done == N, "calls failed")
  cli:close()
end

-- One range read of M MiB.
do
  local cli = assert(etcd3.new { endpoints = endpoint, timeout = 120 })
  local value = ("x"):rep(1024 * 1024)
  for i = 1, M do assert(cli:put(("/big/%04d"):format(i), value)) end
  collectgarbage()
  local w0, c0 = now(), cpu()
  local res = assert(cli:get("/big/", { prefix = true }))
  local bytes = 0
  for _, kv in ipairs(res.kvs) do bytes = bytes + #kv.value end
  assert(#res.kvs == M and bytes == M * 1024 * 1024, "range incomplete")
  report(("range: %d MiB in one response (%d keys)"):format(math.floor(bytes / (1024 * 1024)), #res.kvs), w0, c0)
  res = nil -- luacheck: ignore
  assert(cli:delete("/big/", { prefix = true }))
  cli:close()
  collectgarbage()
end

-- L leases kept alive by one client for 3 TTLs.
do
  local cli = assert(etcd3.new { endpoints = endpoint, timeout = 60 })
  local ttl = 5
  local leases = {}
  local w0, c0 = now(), cpu()
  for i = 1, L do
    leases[i] = assert(cli:grant(ttl))
    leases[i]:keepalive()
  end
  report(("leases: %d granted and under keepalive"):format(L), w0, c0)
  w0, c0 = now(), cpu()
  local stop = now() + 3 * ttl
  while now() < stop do core.sleep(0.5) end
  local alive = 0
  for i = 1, L do if leases[i]:alive() then alive = alive + 1 end end
  report(("leases: %d of %d alive after 3 TTLs (%d s)"):format(alive, L, 3 * ttl), w0, c0)
  assert(alive == L, "leases lost")
  for i = 1, L do leases[i]:revoke() end
  cli:close()
end
