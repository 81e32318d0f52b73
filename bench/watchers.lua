-- Watchers at scale on one client: creating, delivering one event to,
-- cancelling, and collecting N watchers must cost the same per watcher at
-- 1k, 10k and 100k, both as N etcd watches (each watcher its own range:
-- "watchers" lines) and as N watchers of one key sharing one etcd watch
-- ("shared" lines). Prints one line per N and kind with the per-watcher figures
-- (wall µs and process CPU µs per watcher for each step), the CPU the
-- client burns in the 2 s after the cancels returned (a cancel path that
-- grows with N^2 shows there), and RSS.
--
--   lua5.4 tools/with-etcd.lua lua5.4 bench/watchers.lua [--flat] 1000 10000 100000
-- --flat fails the run when a per-watcher CPU figure of the largest size
-- is more than FLAT times that of the smallest (plus SLACK µs, for the
-- small figures' noise), or the client still burns over half a core after
-- its cancels: what a cost growing with N^2 looks like (the quadratic
-- cancel path cost 2.5 s of a core at 10k and nothing at 1k). A scaling
-- check, not a speed one: the factor is loose enough for a noisy machine.
-- (from the checkout, with LUA_PATH/LUA_CPATH set to the build tree).
local etcd3 = require "etcd3"
local core = require "etcd3.core"

local now, cpu, sleep = core.now, core.cpu_time, core.sleep
local endpoint = os.getenv("ETCDCTL_ENDPOINTS") or "127.0.0.1:2379"

local rss_kb = require("bench.harness").rss_kb

-- Runs f(); returns wall and CPU seconds it took.
local function timed(f)
  local w0, c0 = now(), cpu()
  f()
  return now() - w0, cpu() - c0
end

local function per(us_total, n) return us_total * 1e6 / n end

local FLAT, SLACK = 4, 15

local function run(n, shared)
  local cli = assert(etcd3.new { endpoints = endpoint, timeout = 60 })
  local prefix = ("/scale/%d/%s/"):format(n, shared and "shared" or "own")
  local watchers = {}
  local rss0 = rss_kb()
  local cw, cc = timed(function()
    for i = 1, n do
      -- each range [prefix.."k", prefix.."l"..i) holds the key put below
      local opts = shared and { prefix = true } or { range_end = prefix .. "l" .. i }
      watchers[i] = assert(cli:watch(shared and prefix or prefix .. "k", opts))
    end
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
  io.write(("%-8s %6d  create %6.1f us wall %6.1f us cpu | deliver %6.1f / %6.1f | "
    .. "cancel %6.1f / %6.1f | collect %6.1f / %6.1f | cpu in the 2 s after the cancels %4.0f %% | "
    .. "RSS %+.1f kB per watcher\n"):format(shared and "shared" or "watchers", n, per(cw, n), per(cc, n), per(dw, n), per(dc, n),
    per(xw, n), per(xc, n), per(gw, n), per(gc, n), after / 2 * 100, (rss1 - rss0) / n))
  io.flush()
  return { create = per(cc, n), deliver = per(dc, n), cancel = per(xc, n), collect = per(gc, n),
    after = after / 2 }
end

local sizes, flat = {}, false
for i = 1, #arg do
  if arg[i] == "--flat" then flat = true else sizes[#sizes + 1] = assert(tonumber(arg[i]), "sizes expected") end
end
if #sizes == 0 then sizes = { 1000, 10000 } end
local first, last = {}, {}
for _, n in ipairs(sizes) do
  for _, kind in ipairs { "own", "shared" } do
    last[kind] = run(n, kind == "shared")
    first[kind] = first[kind] or last[kind]
  end
end
if flat then
  local bad = {}
  for _, kind in ipairs { "own", "shared" } do
    for _, step in ipairs { "create", "deliver", "cancel", "collect" } do
      if last[kind][step] > FLAT * first[kind][step] + SLACK then
        bad[#bad + 1] = ("%s (%s) %.1f us cpu per watcher at %d against %.1f at %d"):format(step, kind,
          last[kind][step], sizes[#sizes], first[kind][step], sizes[1])
      end
    end
    if last[kind].after > 0.5 then
      bad[#bad + 1] = ("%.0f %% of a core after the cancels (%s)"):format(last[kind].after * 100, kind)
    end
  end
  if #bad > 0 then
    io.stderr:write("not flat: ", table.concat(bad, "; "), "\n")
    os.exit(1)
  end
  print(("flat: every per-watcher CPU figure at %d within %dx (+%d us) of %d's"):format(sizes[#sizes], FLAT, SLACK,
    sizes[1]))
end
