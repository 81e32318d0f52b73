-- Network faults, on a 3-member cluster whose peer links run through fault
-- proxies (spec/helpers/faults.lua): a member cut off from both others
-- while its client port still answers (it has no leader, cannot commit,
-- and serves stale serializable reads), a connection that stays open and
-- carries nothing (black-holed: no RST, no FIN), and a slow member.
--
-- Figures the bounds come from (etcd 3.4 defaults, this client's):
--   - an isolated member loses its leader after the election timeout (1 s);
--     etcd then ends the streams that asked for a leader ("hasleader":
--     watches) after three of its 1 s checks find none: about 4-5 s;
--   - a black-holed connection is noticed by gRPC keepalive: a ping after
--     keepalive_time (5 s here, 10 s by default) with no answer within the
--     keepalive timeout (5 s) closes the connection: at most 10 s here.
local etcd3 = require "etcd3"
local core = require "etcd3.core"
local helper = require "spec.helpers.etcd"
local faults = require "spec.helpers.faults"
local proxy = require "spec.helpers.proxy"

local KEEPALIVE_TIME, KEEPALIVE_TIMEOUT = 5, 5

-- ETCD3_SPEC_FIGURES=1: the times measured, on stderr
local function figure(fmt, ...)
  if os.getenv("ETCD3_SPEC_FIGURES") then io.stderr:write(fmt:format(...), "\n") end
end

-- Everything the watcher delivers until `stop()` says so, as
-- { key, at } in order; fails after `timeout` seconds.
local function drain(w, seen, timeout)
  while true do
    local ev, err = w:next(timeout)
    if not ev then
      assert(err.code == "TIMEOUT", tostring(err))
      return
    end
    seen[#seen + 1] = { key = ev.kv.key, type = ev.type, at = core.now() }
    timeout = 0
  end
end

-- The keys of `seen`, to compare with what was written.
local function keys(seen)
  local out = {}
  for i, s in ipairs(seen) do out[i] = s.key end
  return out
end

-- Pairs of key=value under `prefix`, as etcdctl reads them from `member`
-- (linearizable).
local function etcdctl_pairs(member, prefix)
  local out = member:etcdctl("get --prefix " .. prefix)
  local lines = {}
  for line in out:gmatch("[^\n]+") do lines[#lines + 1] = line end
  assert(#lines % 2 == 0, out)
  local pairs_ = {}
  for i = 1, #lines, 2 do pairs_[#pairs_ + 1] = lines[i] .. "=" .. lines[i + 1] end
  return pairs_
end

describe("network faults", function()
  local c, long
  local others -- endpoints of the members but one

  -- The index of a follower, a client whose calls and streams start on it
  -- (its endpoint first, then the others'; dial_timeout = 0: no race to
  -- the member answering first), and a client to the others only (for the
  -- writes made meanwhile).
  local function client_on_follower(opts)
    local f, endpoints = helper.follower_first(c)
    local config = { endpoints = endpoints, dial_timeout = 0 }
    for k, v in pairs(opts or {}) do config[k] = v end
    others = { endpoints[2], endpoints[3] }
    return f, assert(etcd3.new(config)), assert(etcd3.new { endpoints = others })
  end

  local function heal_and_wait()
    c.heal()
    for _, m in ipairs(c.members) do m:wait_healthy(30) end
    helper.leader_index(c)
  end

  setup(function()
    c = faults.cluster(3)
    -- one client through every fault, never re-created: the last test
    -- compares what it reads with what etcdctl reads
    local _, endpoints = helper.follower_first(c)
    long = assert(etcd3.new { endpoints = endpoints, keepalive_time = KEEPALIVE_TIME })
    assert(long:put("/faults/long/start", "0"))
  end)
  teardown(function()
    if long then long:close() end
    if c then c.stop() end
  end)

  it("moves a watch off an isolated member and delivers every change exactly once", function()
    local f, cli, writer = client_on_follower()
    finally(function()
      cli:close()
      writer:close()
      heal_and_wait()
    end)
    local w = assert(cli:watch("/faults/w/", { prefix = true }))
    local seen, written, put_at = {}, {}, {}
    local function put(key)
      assert(writer:put(key, "v", { timeout = 10 }))
      written[#written + 1], put_at[key] = key, core.now()
    end
    put("/faults/w/before")
    drain(w, seen, 5)
    assert.are.same({ "/faults/w/before" }, keys(seen))

    c.isolate(f)
    -- changes during 8 s of isolation, one about every half second
    local i, heal_at = 0, core.now() + 8
    while core.now() < heal_at do
      i = i + 1
      put(("/faults/w/during-%02d"):format(i))
      long:put(("/faults/long/w-%02d"):format(i), "x", { timeout = 1 }) -- may fail: its member may be the isolated one
      drain(w, seen, 0.5)
    end
    c.heal()
    for j = 1, 5 do
      put(("/faults/w/after-%02d"):format(j))
      drain(w, seen, 0.5)
    end
    local last = written[#written]
    helper.wait_for(function()
      drain(w, seen, 0.5)
      return #seen >= #written
    end, 15, "every change")
    drain(w, seen, 1)
    assert.are.same(written, keys(seen)) -- every one, once, in order
    local slowest = 0
    for _, s in ipairs(seen) do
      slowest = math.max(slowest, s.at - put_at[s.key])
      assert.is_true(s.at - put_at[s.key] < 10, ("%s delivered %.1f s after its put"):format(s.key, s.at - put_at[s.key]))
    end
    figure("watch off an isolated member: %d changes, the slowest delivered %.2f s after its put", #seen, slowest)
    assert.are.equal(last, seen[#seen].key)
    assert.is_nil(w.err)
    w:cancel()
  end)

  it("returns every put within its deadline while the client's member is isolated", function()
    local f, cli, writer = client_on_follower()
    writer:close()
    finally(function()
      cli:close()
      heal_and_wait()
    end)
    assert(cli:put("/faults/p/warm", "0")) -- connected to the follower
    c.isolate(f)
    local isolated = core.now()
    local DEADLINE, succeeded, failed, errs = 2, {}, 0, {}
    -- 8 s of puts, and on until one went through another member (the two
    -- others elect a leader first when the isolated one led; on a loaded
    -- machine that can take a few election rounds)
    local stop, give_up = core.now() + 8, core.now() + 30
    local i = 0
    while core.now() < stop or (#succeeded == 0 and core.now() < give_up) do
      i = i + 1
      local key = ("/faults/p/%03d"):format(i)
      local t0 = core.now()
      local ok, err = cli:put(key, tostring(i), { timeout = DEADLINE })
      local took = core.now() - t0
      -- the deadline, and what returning from a call takes on a loaded machine
      assert.is_true(took < DEADLINE + 1, ("put %d took %.2f s"):format(i, took))
      if ok then
        succeeded[#succeeded + 1] = key
      else
        assert.is_string(err.code)
        failed = failed + 1
        errs[#errs + 1] = ("%.1f s: %s"):format(core.now() - isolated, tostring(err))
      end
      long:get("/faults/p/warm", { timeout = 1 }) -- through the fault too (may fail)
    end
    assert.is_true(#succeeded > 0, "no put went through another member: " .. table.concat(errs, "; "))
    heal_and_wait()
    local stored = {}
    for _, kv in ipairs(etcdctl_pairs(c.members[f], "/faults/p/")) do stored[kv] = true end
    for _, key in ipairs(succeeded) do
      local kv = key .. "=" .. key:match("(%d+)$"):gsub("^0+", "")
      assert.is_true(stored[kv], kv .. " is not in the store")
    end
    figure("puts while isolated: %d succeeded, %d failed (deadline %d s)", #succeeded, failed, DEADLINE)
  end)

  it("keeps a lease (TTL 6) alive through 10 s of its keepalive member's isolation", function()
    local f, cli, checker = client_on_follower()
    finally(function()
      cli:close()
      checker:close()
      heal_and_wait()
    end)
    local lease = assert(cli:grant(6))
    assert(lease:keepalive())
    local long_lease = assert(long:grant(6))
    assert(long_lease:keepalive())
    c.isolate(f)
    local lost, why = lease:wait_lost(10)
    assert.is_nil(lost, "the lease was lost: " .. tostring(why))
    assert.is_true(long_lease:alive(), "the long client's lease was lost")
    local ttl = assert(checker:time_to_live(lease.id, { timeout = 5 }))
    assert.is_true(ttl.ttl > 0)
    c.heal()
    assert.is_true(lease:alive())
    assert.is_true(long_lease:alive())
    -- The member back from isolation has a term ahead of the others' (etcd
    -- 3.4 runs without pre-vote) and deposes their leader: a revoke
    -- proposed meanwhile is dropped and waits out etcd's request timeout.
    -- So the revokes wait for a settled cluster, and one that timed out but
    -- took effect is retried into NOT_FOUND.
    heal_and_wait()
    for _, l in ipairs({ lease, long_lease }) do
      helper.wait_for(function()
        local ok, err = l:revoke({ timeout = 3 })
        return ok or err.code == "NOT_FOUND"
      end, 30, "the revoke of " .. l.id)
    end
    assert.is_false(lease:alive())
  end)

  it("notices a black-holed connection within keepalive_time + the keepalive timeout", function()
    local f, endpoints = helper.follower_first(c)
    local p = proxy.start(endpoints[1])
    endpoints[1] = p.endpoint
    local cli = assert(etcd3.new { endpoints = endpoints, keepalive_time = KEEPALIVE_TIME, dial_timeout = 0 })
    local writer = assert(etcd3.new { endpoints = { endpoints[2], endpoints[3] } })
    finally(function()
      cli:close()
      writer:close()
      p:stop()
    end)
    assert.is_truthy(f)
    local w = assert(cli:watch("/faults/h/", { prefix = true }))
    local seen = {}
    assert(writer:put("/faults/h/before", "0"))
    drain(w, seen, 5)
    assert.are.same({ "/faults/h/before" }, keys(seen))
    assert.is_true(p:connections() > 0)

    p:blackhole()
    local t0 = core.now()
    assert(writer:put("/faults/h/during", "1"))
    -- a call made meanwhile returns within its deadline
    local t1 = core.now()
    local _, err = cli:get("/faults/h/before", { timeout = 2 })
    assert.is_true(core.now() - t1 < 3, ("the get took %.2f s"):format(core.now() - t1))
    if err then assert.is_string(err.code) end
    -- the watch moves and resumes: the change made meanwhile, once
    helper.wait_for(function()
      drain(w, seen, 0.5)
      return #seen >= 2
    end, KEEPALIVE_TIME + KEEPALIVE_TIMEOUT + 5, "the watch to resume")
    local noticed = seen[2].at - t0
    figure("black hole: the watch resumed %.2f s after it began", noticed)
    assert.is_true(noticed < KEEPALIVE_TIME + KEEPALIVE_TIMEOUT + 5, ("resumed after %.1f s"):format(noticed))
    -- the client goes on on another member
    assert(cli:put("/faults/h/after", "2", { timeout = 5 }))
    drain(w, seen, 5)
    drain(w, seen, 1)
    assert.are.same({ "/faults/h/before", "/faults/h/during", "/faults/h/after" }, keys(seen))
    assert.is_nil(w.err)
    w:cancel()
  end)

  it("meets a 2 s timeout on linearizable gets from a member delayed by 200 ms each way", function()
    local f = helper.follower_first(c)
    local member = c.members[f]
    local p = proxy.start(member.endpoint)
    p:set_delay(0.2, 0.2)
    member.peer_proxy:set_delay(0.2, 0.2)
    local cli = assert(etcd3.new { endpoints = p.endpoint })
    finally(function()
      cli:close()
      p:stop()
      heal_and_wait()
    end)
    assert(cli:put("/faults/d/k", "v", { timeout = 10 })) -- connects (HTTP/2's handshake takes round trips)
    local slowest = 0
    for _ = 1, 10 do
      local t0 = core.now()
      local res = assert(cli:get("/faults/d/k", { timeout = 2 }))
      slowest = math.max(slowest, core.now() - t0)
      assert.are.equal("v", res.kvs[1].value)
    end
    figure("200 ms each way: the slowest of 10 linearizable gets took %.2f s", slowest)
    -- a round trip to the member and one between it and the leader
    assert.is_true(slowest >= 0.4, ("a get took %.2f s: was it delayed?"):format(slowest))
  end)

  it("reads, with the client that lived through every fault, what etcdctl reads", function()
    heal_and_wait()
    assert(long:put("/faults/long/end", "1", { timeout = 10 }))
    local res = assert(long:get("/faults/", { prefix = true, timeout = 10 }))
    local mine = {}
    for i, kv in ipairs(res.kvs) do mine[i] = kv.key .. "=" .. kv.value end
    for _, m in ipairs(c.members) do
      assert.are.same(etcdctl_pairs(m, "/faults/"), mine)
    end
    -- serializable reads from every member agree too, once healed
    for _, m in ipairs(c.members) do
      local one = assert(etcd3.new { endpoints = m.endpoint })
      local rev = res.header.revision
      helper.wait_for(function()
        local r = assert(one:get("/faults/", { prefix = true, serializable = true }))
        return r.header.revision >= rev
      end, 10, "member " .. m.name .. " to catch up")
      local r = assert(one:get("/faults/", { prefix = true, serializable = true, revision = rev }))
      local theirs = {}
      for i, kv in ipairs(r.kvs) do theirs[i] = kv.key .. "=" .. kv.value end
      one:close()
      assert.are.same(mine, theirs)
    end
  end)
end)
