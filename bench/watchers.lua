-- Watchers at scale on one client: creating, delivering one event to,
-- cancelling, and collecting N watchers must cost the same per watcher at
-- 1k, 10k and 100k. Prints one line per N with the per-watcher figures
-- (wall µs and process CPU µs per watcher for each step), the CPU the
-- client burns in the 2 s after the cancels returned (a cancel path that
-- grows with N^2 shows there), and RSS.
--
--   lua5.4 tools/with-etcd.lua lua5.4 bench/watchers.lua 1000 10000 100000
-- (from the checkout, with LUA_PATH/LUA_CPATH set to the build tree).
local etcd3 = require "etcd3"
local core = require "etcd3.core"

local now, cpu, sleep = core.now, core.cpu_time, core.sleep
local endpoint = os.getenv("ETCDCTL_ENDPOINTS") or "127.0.0.1:2379"

local function rss_kb()
  local f = assert(io.open("/proc/self/status"))
  local v = tonumber(f:read("*a"):match("VmRSS:%s*(%d+)"))
  f:close()
  return v
end

-- Runs f(); returns wall and CPU seconds it took.
local function timed(f)
  local w0, c0 = now(), cpu()
  f()
  return now() - w0, cpu() - c0
end

local function per(us_total, n) return us_total * 1e6 / n end

local function run(n)
  local cli = assert(etcd3.new { endpoints = endpoint, timeout = 60 })
  local prefix = ("/scale/%d/"):format(n)
  local watchers = {}
  local rss0 = rss_kb()
  local cw, cc = timed(function()
    for i = 1, n do watchers[i] = assert(cli:watch(prefix, { prefix = true })) end
  end)
  local rss1 = rss_kb()
  local dw, dc = timed(function()
    assert(cli:put(prefix .. "k", "v"))
    for i = 1, n do
      local ev = assert(watchers[i]:next(30))
      assert(ev.kv.value == "v")
    end
  end)
  local xw, xc = timed(function()
    for i = 1, n do watchers[i]:cancel() end
  end)
  -- after the cancels returned: what the engine still burns while etcd
  -- confirms them
  local _, after = timed(function() sleep(2) end)
  local gw, gc = timed(function()
    watchers = nil -- luacheck: ignore
    collectgarbage()
    collectgarbage()
  end)
  assert(cli:get(prefix .. "k")) -- the client still works
  cli:close()
  io.write(("watchers %6d  create %6.1f us wall %6.1f us cpu | deliver %6.1f / %6.1f | "
    .. "cancel %6.1f / %6.1f | collect %6.1f / %6.1f | cpu in the 2 s after the cancels %4.0f %% | "
    .. "RSS %+.1f kB per watcher\n"):format(n, per(cw, n), per(cc, n), per(dw, n), per(dc, n),
    per(xw, n), per(xc, n), per(gw, n), per(gc, n), after / 2 * 100, (rss1 - rss0) / n))
  io.flush()
end

local sizes = {}
for i = 1, #arg do sizes[i] = assert(tonumber(arg[i]), "sizes expected") end
if #sizes == 0 then sizes = { 1000, 10000 } end
for _, n in ipairs(sizes) do run(n) end
