-- Figures of the recipes, on one throwaway etcd member:
--   lock hand-over latency between two processes (p50, p90),
--   mirror memory per 10 000 keys (Lua heap), update() CPU per change.
--
--   LUA_PATH="lua/?.lua;lua/?/init.lua;./?.lua;;" LUA_CPATH="build/lua5.4/?.so;;" \
--     lua5.4 bench/recipes.lua [--handovers N] [--keys N]
local helper = require "spec.helpers.etcd"
local etcd3 = require "etcd3"
local core = require "etcd3.core"

local opts = { handovers = 200, keys = 10000 }
for i = 1, #arg, 2 do
  local k = arg[i]:match("^%-%-(.+)$")
  if not k or opts[k] == nil then error("unknown argument " .. tostring(arg[i])) end
  opts[k] = assert(tonumber(arg[i + 1]))
end

local function percentile(list, p)
  table.sort(list)
  return list[math.max(1, math.ceil(#list * p))]
end

--- Two processes take turns on one lock; each prints when it acquired and
-- when it was about to release (core.now is CLOCK_MONOTONIC, shared by
-- the processes). A hand-over is a release by one followed by the other's
-- acquisition.
local function handover(member)
  local script = [[
    local etcd3 = require "etcd3"
    local now = require("etcd3.core").now
    local cli = assert(etcd3.new { endpoints = "]] .. member.endpoint .. [[" })
    local s = assert(cli:session { ttl = 10 })
    local m = s:mutex("/bench/lock")
    -- start together: both ready, then the go the parent puts
    local go = assert(cli:watch("/bench/go"))
    assert(cli:put("/bench/ready/" .. s:lease_id(), ""))
    assert(go:next(60))
    go:cancel()
    local out = {}
    for _ = 1, ]] .. opts.handovers .. [[ do
      assert(m:lock(60))
      out[#out + 1] = ("A %.6f"):format(now())
      out[#out + 1] = ("R %.6f"):format(now())
      assert(m:unlock())
    end
    s:close()
    print(table.concat(out, "\n"))
  ]]
  local pipes = { io.popen(helper.lua_command(script)), io.popen(helper.lua_command(script)) }
  local cli = assert(etcd3.new { endpoints = member.endpoint })
  helper.wait_for(function()
    return assert(cli:get("/bench/ready/", { prefix = true, count_only = true })).count == 2
  end, 60, "both processes")
  assert(cli:put("/bench/go", ""))
  cli:close()
  local events = {}
  for who, p in ipairs(pipes) do
    for line in p:lines() do
      local kind, t = line:match("^([AR]) (%S+)$")
      if kind then events[#events + 1] = { t = tonumber(t), kind = kind, who = who } end
    end
    p:close()
  end
  table.sort(events, function(a, b) return a.t < b.t end)
  local latencies, released = {}, nil
  for _, ev in ipairs(events) do
    if ev.kind == "R" then
      released = ev
    elseif released and released.who ~= ev.who then
      latencies[#latencies + 1] = (ev.t - released.t) * 1000
    end
  end
  return percentile(latencies, 0.5), percentile(latencies, 0.9), #latencies
end

local function mirror_figures(member)
  local cli = assert(etcd3.new { endpoints = member.endpoint })
  local value = ("v"):rep(64)
  for i = 1, opts.keys do assert(cli:put(("/bench/mirror/%06d"):format(i), value)) end
  collectgarbage("collect")
  local before = collectgarbage("count")
  local m = assert(cli:mirror("/bench/mirror/"))
  collectgarbage("collect")
  local kb = collectgarbage("count") - before
  assert(m:count() == opts.keys)

  -- update(): changes written by another process, all queued before
  -- update() runs, so its CPU is what applying them costs in Lua (the
  -- decoding of events into tables included).
  local writer = [[
    local etcd3 = require "etcd3"
    local cli = assert(etcd3.new { endpoints = "]] .. member.endpoint .. [[" })
    for i = 1, ]] .. opts.keys .. [[ do
      assert(cli:put(("/bench/mirror/%06d"):format(i), "changed " .. i))
    end
  ]]
  local p = io.popen(helper.lua_command(writer))
  p:read("*a")
  p:close()
  core.sleep(1) -- (a figure, not a test: let the last events arrive)
  local applied, clock = 0, os.clock()
  while applied < opts.keys do
    applied = applied + #assert(m:update(5))
  end
  local us = (os.clock() - clock) * 1e6 / applied
  m:close()
  cli:close()
  return kb, us
end

-- The data dir on tmpfs, as bench/run.lua does: the figures are the
-- client's, not the disk's fsync latency (the later --data-dir wins).
local shm = helper.capture("mktemp -d /dev/shm/etcd3-bench.XXXXXX"):gsub("%s+$", "")
local member = helper.single { extra = { "--data-dir", shm } }
local ok, err = pcall(function()
  local p50, p90, n = handover(member)
  print(("lock hand-over between two processes: p50 %.2f ms, p90 %.2f ms (%d hand-overs)"):format(p50, p90, n))
  local kb, us = mirror_figures(member)
  print(("mirror of %d keys (64-byte values): %.0f KiB of Lua heap, %.0f bytes per key"):format(
    opts.keys, kb, kb * 1024 / opts.keys))
  print(("mirror:update(): %.1f us CPU per change"):format(us))
end)
member:stop()
helper.sh("rm -rf '" .. shm .. "'")
assert(ok, err)
