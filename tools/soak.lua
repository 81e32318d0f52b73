-- usage: lua tools/soak.lua [minutes]   (`make soak SOAK_MINUTES=10`)
--
-- Mixed load on one client for the given minutes against a 3-member etcd
-- cluster on 127.0.0.1: gets, puts, transactions, 200 watchers coming and
-- going, leases granted (some kept alive) and revoked, other clients
-- created and closed, and one member killed and started again every
-- minute. Every 10 s it samples the process's RSS, fds and threads; after
-- the warm-up, the growth of each must stay under its bound (below), or
-- the run fails. The series is printed either way.
local etcd3 = require "etcd3"
local helper = require "spec.helpers.etcd"

local MINUTES = tonumber(arg[1] or os.getenv("SOAK_MINUTES") or "10")
local DURATION = MINUTES * 60
local SAMPLE_EVERY = 10
local RESTART_EVERY = 60
-- Warm-up: gRPC's pools, glibc's arenas and Lua's heap reach their working
-- size in the first seconds, and the first member restart brings the
-- reconnection machinery in; growth is measured from the sample after it.
local WARMUP = math.min(40, DURATION / 2)
local WATCHERS = 200

-- Bounds on growth after warm-up, whatever the duration (a leak grows with
-- the work done, and at the rates below a leak of 100 bytes per operation
-- or one fd per client created crosses them within the first minute):
--  - RSS 16 MB: the working set is settled after warm-up; what remains is
--    allocator noise (glibc keeps freed arenas; gRPC's slab caches grow by
--    a few MB while a member restarts and calls pile up on reconnect).
--  - fds 12: each endpoint may hold a connection that gRPC is still
--    handshaking (up to 20 s after its channel is gone, see
--    spec/17-wrong_peers_spec.lua), plus a client being created at the
--    moment of the sample.
--  - threads 4: gRPC's executor and event engine grow a thread or two
--    under load and reap them later; one client's engine thread is alive
--    during a sample.
local BOUND = { rss_kb = 16 * 1024, fds = 12, threads = 4 }

local pid = io.open("/proc/self/stat"):read("*l"):match("^%d+")

local function status(field)
  local f = assert(io.open("/proc/self/status"))
  local v = f:read("*a"):match(field .. ":%s*(%d+)")
  f:close()
  return tonumber(v)
end

local function sample(t)
  return {
    t = t, rss_kb = status("VmRSS"), threads = status("Threads"),
    fds = tonumber(helper.capture("ls /proc/" .. pid .. "/fd | wc -l")),
    lua_kb = math.floor(collectgarbage("count")),
  }
end

local cluster = helper.cluster(3)
local cli = assert(etcd3.new { endpoints = cluster.endpoints, timeout = 3 })
local ok_runs, run_err = pcall(function()
  local t0 = helper.now()
  local function elapsed() return helper.now() - t0 end
  local errors, counts = {}, { ops = 0, watchers = 0, leases = 0, clients = 0, events = 0, restarts = 0 }
  local function note(res, err)
    counts.ops = counts.ops + 1
    if not res and err then
      local code = type(err) == "table" and err.code or tostring(err)
      errors[code] = (errors[code] or 0) + 1
    end
    return res
  end

  local watchers, next_drain = {}, 1
  local function add_watcher(i)
    local w, err = cli:watch("/soak/k/" .. (i % 1000))
    if note(w, err) then
      watchers[#watchers + 1] = w
      counts.watchers = counts.watchers + 1
    end
  end
  local function drop_watcher()
    if #watchers == 0 then return end
    local i = math.random(#watchers)
    watchers[i]:cancel()
    watchers[i] = watchers[#watchers]
    watchers[#watchers] = nil
  end

  local samples = { sample(0) }
  local next_sample, next_restart, restart_pending = SAMPLE_EVERY, RESTART_EVERY / 2, nil
  local victim = 0
  local i = 0
  io.write(("soak: %g min, 3 members, %d watchers\n"):format(MINUTES, WATCHERS))
  while elapsed() < DURATION do
    i = i + 1
    local key = "/soak/k/" .. (i % 1000)
    note(cli:put(key, ("v%d"):format(i)))
    note(cli:get(key))
    note(cli:get("/soak/k/", { prefix = true, limit = 10 }))
    note(cli:txn():when(etcd3.compare.version(key):gt(0))
      :success(etcd3.op.put(key, "t" .. i), etcd3.op.get(key))
      :failure(etcd3.op.get(key)):commit())
    -- watchers come and go; a few are read each round
    if #watchers < WATCHERS then add_watcher(i) end
    if i % 2 == 0 and #watchers >= WATCHERS then
      drop_watcher()
      add_watcher(i + 7)
    end
    for _ = 1, 10 do
      local w = watchers[next_drain]
      if w then
        while true do
          local ev = w:next(0)
          if not ev then break end
          counts.events = counts.events + 1
        end
      end
      next_drain = next_drain % math.max(#watchers, 1) + 1
    end
    -- leases: granted, used, kept alive for a while or revoked at once
    if i % 10 == 0 then
      local lease, err = cli:grant(5)
      if note(lease, err) then
        counts.leases = counts.leases + 1
        note(cli:put("/soak/lease/" .. i, "x", { lease = lease.id }))
        if i % 20 == 0 then
          lease:keepalive()
          note(lease:keepalive_once())
        end
        note(lease:revoke())
      end
    end
    -- other clients, created and closed
    if i % 25 == 0 then
      local other, err = etcd3.new { endpoints = cluster.endpoints, dial_timeout = 3, timeout = 3 }
      if note(other, err) then
        counts.clients = counts.clients + 1
        note(other:get(key))
        other:close()
      end
    end
    -- a member restarted every minute: killed now, started 5 s later
    local now = elapsed()
    if now >= next_restart and not restart_pending then
      victim = victim % 3 + 1
      cluster.members[victim]:kill()
      restart_pending = now + 5
      next_restart = next_restart + RESTART_EVERY
    elseif restart_pending and now >= restart_pending then
      cluster.members[victim]:start()
      restart_pending = nil
      counts.restarts = counts.restarts + 1
    end
    if now >= next_sample then
      collectgarbage()
      samples[#samples + 1] = sample(math.floor(now))
      local s = samples[#samples]
      io.write(("  t=%4ds rss=%6d kB fds=%3d threads=%2d lua=%6d kB ops=%d\n"):format(
        s.t, s.rss_kb, s.fds, s.threads, s.lua_kb, counts.ops))
      io.flush()
      next_sample = next_sample + SAMPLE_EVERY
    end
  end
  if restart_pending then cluster.members[victim]:start() end
  for _, w in ipairs(watchers) do w:cancel() end

  -- the client still works once every member is back
  for _, m in ipairs(cluster.members) do m:wait_healthy(30) end
  helper.wait_for(function() return cli:put("/soak/final", "ok") end, 30, "a put after the run")

  local t = elapsed()
  io.write(("soak: %d ops in %.0f s (%.0f/s), %d watchers created, %d events, %d leases, %d clients, %d restarts\n"):format(
    counts.ops, t, counts.ops / t, counts.watchers, counts.events, counts.leases, counts.clients, counts.restarts))
  local codes = {}
  for code, n in pairs(errors) do codes[#codes + 1] = code .. "=" .. n end
  table.sort(codes)
  io.write("soak: errors returned (restarts make some): " .. (#codes > 0 and table.concat(codes, " ") or "none") .. "\n")

  -- growth after warm-up: the largest value after it minus the first
  local base
  for _, s in ipairs(samples) do
    if s.t >= WARMUP then base = base or s end
  end
  assert(base, "no sample after warm-up")
  local failed = {}
  for what, bound in pairs(BOUND) do
    local top = base[what]
    for _, s in ipairs(samples) do
      if s.t >= base.t and s[what] > top then top = s[what] end
    end
    local growth = top - base[what]
    io.write(("soak: %-8s growth after warm-up %6d (bound %d)\n"):format(what, growth, bound))
    if growth > bound and not (what == "rss_kb" and helper.sanitized) then
      failed[#failed + 1] = what
    end
  end
  assert(#failed == 0, "grew past its bound: " .. table.concat(failed, ", "))
end)
cli:close()
cluster.stop()
if not ok_runs then
  io.stderr:write("soak FAILED: " .. tostring(run_err) .. "\n")
  os.exit(1)
end
io.write("soak: ok\n")
