-- Leases: grant, keepalive from the engine thread, liveness, by-ID calls.
local etcd3 = require "etcd3"
local helper = require "spec.helpers.etcd"
local proxy = require "spec.helpers.proxy"
local core = require "etcd3.core"

-- Freezes `member` until `lease` is lost (at most `within` seconds): lost,
-- and how long after the freeze.
local function freeze_until_lost(member, lease, within)
  member:signal("STOP")
  local stopped = core.now()
  local lost = lease:wait_lost(within)
  local took = core.now() - stopped
  member:signal("CONT")
  return lost, took
end

local function busy(seconds)
  local stop, n = core.now() + seconds, 0
  while core.now() < stop do n = n + 1 end
  return n
end

describe("lease", function()
  local member, cli
  local start_member, stop_member = helper.member_and_client(function(m, c) member, cli = m, c end)
  setup(start_member)
  teardown(stop_member)

  it("grants with hex IDs, and etcdctl agrees on time_to_live", function()
    local lease = assert(cli:grant(60))
    assert.matches("^%x%x%x%x%x%x%x%x%x%x%x%x%x%x%x%x$", lease.id)
    assert.are.equal(60, lease.ttl)
    assert.is_true(lease:alive())
    assert.is_true(lease:remaining() > 59 and lease:remaining() <= 60)
    assert(cli:put("/lease/a", "1", { lease = lease.id }))
    local ttl = assert(lease:time_to_live { keys = true })
    assert.are.equal(lease.id, ttl.id)
    assert.are.equal(60, ttl.granted_ttl)
    assert.is_true(ttl.ttl > 55 and ttl.ttl <= 60)
    assert.are.same({ "/lease/a" }, ttl.keys)
    local out = member:etcdctl("lease timetolive " .. lease.id .. " --keys")
    assert.matches("lease " .. lease.id .. " granted with TTL%(60s%)", out) -- etcdctl prints %016x too
    assert.matches("attached keys%(%[/lease/a%]%)", out)
    local remaining = tonumber(out:match("remaining%((%d+)s%)"))
    assert.is_true(math.abs(remaining - ttl.ttl) <= 1)
    local by_id = assert(cli:time_to_live(lease.id))
    assert.are.equal(60, by_id.granted_ttl)
    assert.is_true(by_id.keys == nil or #by_id.keys == 0)
    assert(lease:revoke())
  end)

  it("grants with a chosen ID and lists leases", function()
    local lease = assert(cli:grant(30, { id = "00000000000abc12" }))
    assert.are.equal("00000000000abc12", lease.id)
    local found = false
    for _, id in ipairs(assert(cli:leases()).ids) do found = found or id == lease.id end
    assert.is_true(found)
    local _, err = cli:grant(30, { id = "abc12" })
    assert.are.equal("etcdserver: lease already exists", err.message)
    assert.is_true(assert(cli:revoke("abc12")))
    assert.are.equal(-1, assert(cli:time_to_live("abc12")).ttl)
  end)

  it("keeps a key alive through 6 s of a busy Lua CPU loop", function()
    local lease = assert(cli:grant(2))
    assert.is_true(lease:keepalive())
    assert(cli:put("/lease/busy", "x", { lease = lease.id }))
    busy(6)
    assert.is_true(lease:alive())
    assert.are.equal(1, assert(cli:get("/lease/busy")).count)
    -- after close no one renews: gone within TTL + 1 s
    lease:close()
    local closed_at = core.now()
    helper.wait_for(function() return assert(cli:get("/lease/busy")).count == 0 end, 2 + 1 + 1.5, "the key to expire")
    assert.is_true(core.now() - closed_at <= 3 + 1, "took " .. (core.now() - closed_at))
  end)

  it("keeps a key alive while Lua blocks in os.execute", function()
    local lease = assert(cli:grant(2))
    lease:keepalive()
    assert(cli:put("/lease/sleep", "x", { lease = lease.id }))
    os.execute("sleep 5")
    assert.is_true(lease:alive())
    assert.are.equal(1, assert(cli:get("/lease/sleep")).count)
    assert(lease:revoke())
  end)

  it("revoke deletes the attached keys and ends liveness", function()
    local lease = assert(cli:grant(60))
    lease:keepalive()
    assert(cli:put("/lease/r1", "x", { lease = lease.id }))
    assert(cli:put("/lease/r2", "x", { lease = lease.id }))
    assert.is_true(assert(lease:revoke()))
    assert.are.equal(0, assert(cli:get("/lease/r", { prefix = true })).count)
    local alive, why = lease:alive()
    assert.is_false(alive)
    assert.matches("revoked", why)
    assert.are.equal(0, lease:remaining())
    local _, err = lease:revoke()
    assert.are.equal("NOT_FOUND", err.code)
    assert.are.equal("etcdserver: requested lease not found", err.message)
  end)

  it("notices a lease revoked elsewhere (etcd answers ttl <= 0)", function()
    local lease = assert(cli:grant(3))
    lease:keepalive()
    member:etcdctl("lease revoke " .. lease.id)
    local lost, why = lease:wait_lost(5)
    assert.is_true(lost)
    assert.matches("etcd says", why)
  end)

  it("a revoke by ID from the same client ends its lease objects' liveness at once", function()
    local lease = assert(cli:grant(600))
    lease:keepalive()
    local taken = assert(cli:keepalive(lease.id)) -- a second object, same lease
    local other = assert(cli:grant(600))
    -- the ID as a user may write it: no leading zeros, upper case
    assert.is_true(assert(cli:revoke(lease.id:gsub("^0+", ""):upper())))
    -- no renewal is due for minutes: only the revoke can have ended them
    for _, l in ipairs { lease, taken } do
      local alive, why = l:alive()
      assert.is_false(alive)
      assert.matches("revoked", why)
      assert.is_true((l:wait_lost(0)))
    end
    assert.is_true(other:alive())
    assert(other:revoke())
  end)

  it("keepalive_once renews, by lease and by ID", function()
    local lease = assert(cli:grant(10))
    local res = assert(lease:keepalive_once())
    assert.are.equal(10, res.ttl)
    assert.are.equal(lease.id, res.id)
    assert.are.equal(10, assert(cli:keepalive_once(lease.id)).ttl)
    assert(lease:revoke())
    local _, err = lease:keepalive_once()
    assert.are.equal("NOT_FOUND", err.code)
    assert.is_false(lease:alive())
    local _, err2 = cli:keepalive_once(lease.id)
    assert.are.equal("NOT_FOUND", err2.code)
  end)

  it("takes over a lease by ID with client:keepalive", function()
    local lease = assert(cli:grant(2))
    local other = assert(etcd3.new { endpoints = member.endpoint })
    local taken = assert(other:keepalive(lease.id))
    assert.are.equal(lease.id, taken.id)
    assert(cli:put("/lease/taken", "x", { lease = lease.id }))
    core.sleep(4)
    assert.is_true(taken:alive())
    assert.are.equal(1, assert(cli:get("/lease/taken")).count)
    other:close()
    -- nobody renews it any more: it runs out within its TTL
    assert.is_true(taken:wait_lost(3))
    assert.is_false(taken:alive())
  end)

  it("wait_lost times out on a live lease", function()
    local lease = assert(cli:grant(30))
    lease:keepalive()
    local ok, err = lease:wait_lost(0.2)
    assert.is_nil(ok)
    assert.are.equal("TIMEOUT", err.code)
    lease:revoke()
  end)

  it("raises on bad arguments", function()
    assert.has_error(function() cli:grant("10") end)
    assert.has_error(function() cli:grant(10, { ttl = 1 }) end, "etcd3.grant: unknown option 'ttl'")
    assert.has_error(function() cli:revoke("xyz!") end)
    local lease = assert(cli:grant(5))
    assert.has_error(function() lease:time_to_live { key = true } end)
    assert.has_error(function() lease.alive() end)
    lease:revoke()
  end)
end)

describe("lease liveness with a frozen member", function()
  local member
  setup(function() member = helper.single() end)
  teardown(function() if member then member:stop() end end)

  it("turns false within TTL + 1 s of the last renewal", function()
    local cli = assert(etcd3.new { endpoints = member.endpoint })
    local lease = assert(cli:grant(2))
    lease:keepalive()
    core.sleep(1)
    assert.is_true(lease:alive())
    local lost, took = freeze_until_lost(member, lease, 4)
    assert.is_true(lost)
    -- the last renewal left at most ttl/3 before the stop
    assert.is_true(took <= 2 + 1, "took " .. took)
    cli:close()
  end)
end)

-- etcd's answers reach the client 2.5 s late (a proxy holds them), longer
-- than a renewal interval: each renewal leaves before the one before it is
-- answered, so an answer must be counted from its own request's departure.
-- Counted from a later request's, which etcd may never see, the lease would
-- outlast etcd's by up to an interval.
describe("lease renewals answered late", function()
  local member, p, cli
  setup(function()
    member = helper.single()
    p = proxy.start(member.endpoint, { delay = 2.5 })
    cli = assert(etcd3.new { endpoints = p.endpoint })
    assert(cli:get("/late")) -- connected
  end)
  teardown(function()
    if cli then cli:close() end
    if p then p:stop() end
    if member then member:stop() end
  end)

  -- b's renewals and a's share the stream while a is off the list (close)
  -- and its answer still comes; after keepalive again, each answer for a
  -- counts from the renewal it answers: 15 s - 2.5 s after it, the lease
  -- has 12.5 s left (one answer behind, it would be 9.5 s at the most).
  it("stay in step for a lease closed and kept alive again", function()
    local a, b = assert(cli:grant(15)), assert(cli:grant(15)) -- 2.5 s each
    assert.is_true(a:keepalive())
    assert.is_true(b:keepalive())
    a:close() -- its first renewal is under way
    local _, err = b:wait_lost(3) -- a's answer comes meanwhile
    assert.are.equal("TIMEOUT", err.code)
    assert.is_true(a:keepalive())
    helper.wait_for(function() return a:remaining() > 11 end, 6, "a renewal counted from its own departure")
    assert.is_true(b:alive())
    assert(a:revoke())
    assert(b:revoke())
  end)

  -- TTL 6 s, a renewal every 2 s. The member freezes half a second after
  -- a renewal left: that renewal was made, the next one never reaches etcd,
  -- and the late answer to the first comes after the second left. etcd's
  -- lease runs out at most a TTL after the freeze: the client must say
  -- lost by then (5.5 s here; counted from the later request, 7.5 s).
  it("never outlast etcd's lease", function()
    local lease = assert(cli:grant(6))
    lease:keepalive()
    local _, err = lease:wait_lost(4.5)
    assert.are.equal("TIMEOUT", err.code)
    local lost, took = freeze_until_lost(member, lease, 10)
    assert.is_true(lost)
    assert.is_true(took <= 6 + 0.5, "took " .. took)
  end)
end)

describe("lease keepalive across a member kill in a 3-member cluster", function()
  local cluster
  setup(function() cluster = helper.cluster(3) end)
  teardown(function() if cluster then cluster.stop() end end)

  -- Kills member `victim` while a lease under keepalive carries a key; the
  -- keepalive stream starts on `endpoints[1]`. The lease must stay alive
  -- for TTL + 2 s (so a renewal after the kill was answered), and the key
  -- with it; then the member comes back if `restart`.
  local function survives(victim, endpoints, ttl, restart)
    local cli = assert(etcd3.new { endpoints = endpoints })
    local lease = assert(cli:grant(ttl))
    lease:keepalive()
    assert(cli:put("/ka/node", "up", { lease = lease.id }))
    local member = cluster.members[victim]
    member:kill()
    if restart then finally(function() member:start():wait_healthy() end) end
    local lost, err = lease:wait_lost(ttl + 2)
    assert.is_nil(lost, "lost: " .. tostring(err))
    assert.are.equal("TIMEOUT", err.code)
    assert.is_true(lease:alive())
    local res = assert(cli:get("/ka/node"))
    assert.are.equal(1, res.count)
    lease:revoke()
    cli:close()
  end

  it("stays alive when the member carrying its stream dies", function()
    local follower, endpoints = helper.follower_first(cluster)
    survives(follower, endpoints, 3, true)
  end)

  -- With no leader, no member can renew: etcd's election takes one to two
  -- election timeouts (1 s by default) after the last heartbeat, and the
  -- new leader extends every lease. A lease whose TTL covers that keeps
  -- its key, and this client keeps calling it alive.
  it("stays alive through the leader's death", function()
    survives(helper.leader_index(cluster), cluster.endpoints, 6)
  end)
end)
