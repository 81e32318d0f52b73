-- Watch: events, every option, resume across a member kill, compaction,
-- many watchers on one stream, bounded memory.
local etcd3 = require "etcd3"
local helper = require "spec.helpers.etcd"
local core = require "etcd3.core"
local process = require "spec.helpers.process"

local function collect(w, n, timeout)
  local out = {}
  for _ = 1, n do
    local ev, err = w:next(timeout or 5)
    if not ev then error("event " .. (#out + 1) .. " of " .. n .. ": " .. tostring(err), 2) end
    out[#out + 1] = ev
  end
  return out
end

local function summary(events)
  local out = {}
  for i, ev in ipairs(events) do
    out[i] = ev.type .. " " .. ev.kv.key .. (ev.type == "PUT" and ("=" .. ev.kv.value) or "")
  end
  return out
end

local function watcher_count(member)
  local out = helper.capture("curl -s http://" .. member.endpoint .. "/metrics")
  return tonumber(out:match("\netcd_debugging_mvcc_watcher_total (%d+)"))
end

describe("watch", function()
  local member, cli
  local start_member, stop_member = helper.member_and_client(function(m, c) member, cli = m, c end)
  setup(start_member)
  teardown(stop_member)

  it("delivers events written by etcdctl in another process", function()
    local w = assert(cli:watch("/e/k"))
    member:etcdctl("put /e/k one")
    member:etcdctl("put /e/other x")
    member:etcdctl("del /e/k")
    local events = collect(w, 2)
    assert.are.same({ "PUT /e/k=one", "DELETE /e/k" }, summary(events))
    local put = events[1]
    assert.are.equal(1, put.kv.version)
    assert.are.equal(put.kv.create_revision, put.kv.mod_revision)
    assert.is_nil(put.prev_kv)
    assert.are.equal(0, events[2].kv.version)
    assert.are.equal(events[2].kv.mod_revision, w:revision())
    local ev, err = w:next(0)
    assert.is_nil(ev)
    assert.are.equal("TIMEOUT", err.code)
    w:cancel()
  end)

  it("prefix, range_end, from_key", function()
    local p = assert(cli:watch("/r/", { prefix = true }))
    local r = assert(cli:watch("/r/b", { range_end = "/r/d" }))
    local f = assert(cli:watch("/r/c", { from_key = true }))
    for _, k in ipairs { "/r/a", "/r/b", "/r/c", "/r/d", "/s" } do assert(cli:put(k, "v")) end
    assert.are.same({ "PUT /r/a=v", "PUT /r/b=v", "PUT /r/c=v", "PUT /r/d=v" }, summary(collect(p, 4)))
    assert.are.same({ "PUT /r/b=v", "PUT /r/c=v" }, summary(collect(r, 2)))
    assert.are.same({ "PUT /r/c=v", "PUT /r/d=v", "PUT /s=v" }, summary(collect(f, 3)))
    assert.are.equal("TIMEOUT", select(2, r:next(0.2)).code)
    p:cancel() r:cancel() f:cancel()
  end)

  it("prev_kv and filters", function()
    local w = assert(cli:watch("/pk", { prev_kv = true }))
    local noput = assert(cli:watch("/pk", { filters = { "noput" } }))
    local nodel = assert(cli:watch("/pk", { filters = { "nodelete" } }))
    assert(cli:put("/pk", "1"))
    assert(cli:put("/pk", "2"))
    assert(cli:delete("/pk"))
    local events = collect(w, 3)
    assert.is_nil(events[1].prev_kv)
    assert.are.equal("1", events[2].prev_kv.value)
    assert.are.equal("2", events[3].prev_kv.value)
    assert.are.same({ "DELETE /pk" }, summary(collect(noput, 1)))
    assert.are.same({ "PUT /pk=1", "PUT /pk=2" }, summary(collect(nodel, 2)))
    assert.are.equal("TIMEOUT", select(2, noput:next(0.2)).code)
    assert.are.equal("TIMEOUT", select(2, nodel:next(0.2)).code)
    assert.has_error(function() cli:watch("/pk", { filters = { "noget" } }) end)
  end)

  it("replays from start_revision in order", function()
    local first = assert(cli:put("/replay/a", "1")).header.revision
    assert(cli:put("/replay/b", "2"))
    assert(cli:put("/replay/a", "3"))
    local w = assert(cli:watch("/replay/", { prefix = true, start_revision = first }))
    local events = collect(w, 3)
    assert.are.same({ "PUT /replay/a=1", "PUT /replay/b=2", "PUT /replay/a=3" }, summary(events))
    for i, ev in ipairs(events) do assert.are.equal(first + i - 1, ev.kv.mod_revision) end
    assert(cli:put("/replay/c", "4"))
    assert.are.same({ "PUT /replay/c=4" }, summary(collect(w, 1)))
    w:cancel()
  end)

  it("progress: notifications and request_progress move revision()", function()
    local w = assert(cli:watch("/quiet/", { prefix = true, progress_notify = true }))
    local start = w:revision()
    assert(cli:put("/elsewhere", "x"))
    local target = assert(cli:get("/elsewhere")).header.revision
    assert.is_true(w:request_progress())
    helper.wait_for(function()
      local ev = w:next(0.1)
      assert.is_nil(ev)
      return w:revision() >= target
    end, 10, "a progress notification")
    assert.is_true(w:revision() > start)
    w:cancel()
  end)

  it("loses no event to request_progress answers while events flow", function()
    -- etcd 3.4 may send a progress answer ahead of events already queued
    -- for the stream; those events must still be delivered, once
    local w = assert(cli:watch("/flow/", { prefix = true }))
    local children = {}
    for c = 1, 3 do
      children[c] = process.lua([[
        local etcd3 = require "etcd3"
        local cli = assert(etcd3.new { endpoints = "]] .. member.endpoint .. [[" })
        for i = 1, 1000 do assert(cli:put("/flow/]] .. c .. [[-" .. (i % 50), tostring(i))) end
      ]])
    end
    local seen, last, asked = 0, 0, 0
    helper.wait_for(function()
      local ev = w:next(0.05)
      while ev do
        assert.is_true(ev.kv.mod_revision > last, "revision order")
        last = ev.kv.mod_revision
        seen = seen + 1
        if seen % 3 == 0 then
          w:request_progress()
          asked = asked + 1
        end
        ev = w:next(0)
      end
      return seen >= 3000
    end, 60, "3000 events")
    for _, child in ipairs(children) do
      assert.matches("exit=0", child:read("*a"))
      child:close()
    end
    assert.are.equal(3000, seen)
    assert.is_nil(w:next(0.2))
    assert.is_true(asked > 0)
    w:cancel()
  end)

  it("cancel ends events() with err nil; events() iterates until then", function()
    local w = assert(cli:watch("/c/", { prefix = true }))
    assert(cli:put("/c/1", "a"))
    assert(cli:put("/c/2", "b"))
    local seen = {}
    for ev in w:events() do
      seen[#seen + 1] = ev.kv.key
      if #seen == 2 then w:cancel() end
    end
    assert.are.same({ "/c/1", "/c/2" }, seen)
    assert.is_nil(w.err)
    local ev, err = w:next(0)
    assert.is_nil(ev)
    assert.are.equal("CANCELLED", err.code)
    w:cancel() -- idempotent
  end)

  it("ends with COMPACTED and the compact revision for a compacted start", function()
    local rev = assert(cli:put("/cmp", "1")).header.revision
    assert(cli:put("/cmp", "2"))
    local compact_to = assert(cli:put("/cmp", "3")).header.revision
    assert(cli:compact(compact_to))
    local w = assert(cli:watch("/cmp", { start_revision = rev }))
    local ev, err = w:next(5)
    assert.is_nil(ev)
    assert.are.equal("COMPACTED", err.code)
    assert.are.equal(compact_to, err.compact_revision)
    assert.are.equal(err, w.err)
    for _ in w:events() do error("no event expected") end
  end)

  it("gives 1000 watchers on one client each their own event", function()
    local function rss()
      local f = assert(io.open("/proc/self/status"))
      local v = tonumber(f:read("*a"):match("VmRSS:%s*(%d+)"))
      f:close()
      return v
    end
    collectgarbage() collectgarbage()
    local before = rss()
    local ws = {}
    for i = 1, 1000 do ws[i] = assert(cli:watch("/many/" .. i)) end
    local after = rss()
    io.stderr:write(("\n[1000 watchers] RSS +%d kB (%.1f kB per watcher)\n"):format(after - before, (after - before) / 1000))
    for i = 1, 1000, 100 do
      local ops = {}
      for j = i, i + 99 do ops[#ops + 1] = etcd3.op.put("/many/" .. j, "v" .. j) end
      assert(cli:txn { success = ops })
    end
    for i = 1, 1000 do
      local ev = assert(ws[i]:next(5))
      assert.are.equal("/many/" .. i, ev.kv.key)
      assert.are.equal("v" .. i, ev.kv.value)
      assert.are.equal("TIMEOUT", select(2, ws[i]:next(0)).code)
    end
    for i = 1, 1000 do ws[i]:cancel() end
  end)

  -- the server's watcher count after earlier specs' cancels settle
  local function settled_watcher_count()
    local base
    helper.wait_for(function()
      local a = watcher_count(member)
      core.sleep(0.3)
      base = watcher_count(member)
      return a == base
    end, 10, "a stable watcher count")
    return base
  end

  it("identical watchers share one etcd watch; it is cancelled with the last", function()
    local base = settled_watcher_count()
    local ws = {}
    for i = 1, 50 do ws[i] = assert(cli:watch("/shared/k")) end
    local other = assert(cli:watch("/shared/k", { prev_kv = true })) -- other options: its own
    helper.wait_for(function() return watcher_count(member) == base + 2 end, 10, "two watches on the server")
    local put = assert(cli:put("/shared/k", "v1"))
    for i = 1, 50 do
      local ev = assert(ws[i]:next(5))
      assert.are.equal("v1", ev.kv.value)
      assert.are.equal(put.header.revision, ev.kv.mod_revision)
      assert.are.equal("TIMEOUT", select(2, ws[i]:next(0)).code)
      assert.are.equal(put.header.revision, ws[i]:revision())
    end
    assert.is_nil(assert(other:next(5)).prev_kv)
    for i = 1, 49 do ws[i]:cancel() end
    assert(cli:put("/shared/k", "v2"))
    assert.are.equal("v2", assert(ws[50]:next(5)).kv.value)
    assert.are.equal(base + 2, watcher_count(member))
    ws[50]:cancel()
    other:cancel()
    helper.wait_for(function() return watcher_count(member) == base end, 10, "the watches to be cancelled")
  end)

  it("a watcher that joins a shared watch gets exactly the changes after it", function()
    local first = assert(cli:watch("/join/k"))
    local ws, revs = {}, {}
    for i = 1, 30 do
      -- the put's event may not have reached the shared watch yet: the
      -- joiner must not get it (this client saw its revision)
      revs[i] = assert(cli:put("/join/k", "v" .. i)).header.revision
      ws[i] = assert(cli:watch("/join/k"))
    end
    local last = assert(cli:put("/join/k", "end")).header.revision
    for i = 1, 30 do
      local ev = assert(ws[i]:next(5))
      assert.are.equal(i < 30 and "v" .. (i + 1) or "end", ev.kv.value)
      for j = i + 2, 30 do assert.are.equal("v" .. j, assert(ws[i]:next(5)).kv.value) end
      if i < 30 then assert.are.equal("end", assert(ws[i]:next(5)).kv.value) end
      assert.are.equal("TIMEOUT", select(2, ws[i]:next(0)).code)
      assert.are.equal(last, ws[i]:revision())
      ws[i]:cancel()
    end
    local got = collect(first, 31)
    assert.are.equal(revs[1], got[1].kv.mod_revision)
    assert.are.equal(last, got[31].kv.mod_revision)
    -- start_revision: a past one replays history on a watch of its own; a
    -- future one shares and starts there
    local past = assert(cli:watch("/join/k", { start_revision = revs[29] }))
    assert.are.same({ "PUT /join/k=v29", "PUT /join/k=v30", "PUT /join/k=end" }, summary(collect(past, 3)))
    local future = assert(cli:watch("/join/k", { start_revision = last + 2 }))
    assert(cli:put("/join/k", "skipped"))
    assert(cli:put("/join/k", "wanted"))
    assert.are.equal("wanted", assert(future:next(5)).kv.value)
    assert.are.equal("skipped", assert(first:next(5)).kv.value)
    past:cancel() future:cancel() first:cancel()
  end)

  it("ends a slow consumer's watcher with a clear error; others go on; dropped ones are cancelled", function()
    -- earlier specs' cancels are confirmed asynchronously: wait for quiet
    local base = settled_watcher_count()
    assert.is_number(base)
    local slow = assert(cli:watch("/slow/", { prefix = true, max_queued = 50 }))
    local fine = assert(cli:watch("/slow/", { prefix = true }))
    for i = 1, 100 do assert(cli:put("/slow/" .. i, "x")) end
    local got = collect(fine, 100)
    assert.are.equal(100, #got)
    local ev, err
    repeat ev, err = slow:next(5) until not ev
    assert.are.equal("RESOURCE_EXHAUSTED", err.code)
    assert.matches("fell more than 50 events behind", err.message)
    assert.are.equal(err, slow.err)
    assert(cli:put("/slow/after", "y"))
    assert.are.equal("/slow/after", assert(fine:next(5)).kv.key)
    fine:cancel()
    -- drop watchers without cancel: collection cancels them on the server
    local dropped = {}
    for i = 1, 20 do dropped[i] = assert(cli:watch("/drop/" .. i)) end
    helper.wait_for(function() return watcher_count(member) >= base + 20 end, 10, "watchers on the server")
    assert.are.equal(20, #dropped)
    dropped = nil -- luacheck: ignore 311 (dropping the last reference is the point)
    collectgarbage() collectgarbage()
    helper.wait_for(function() return watcher_count(member) == base end, 10, "the server's watcher count to return to " .. base)
  end)

  -- regression: a stream batch started after close aborted the process in
  -- gRPC (assertion grpc_cq_begin_op) about one run in two
  it("closes while streams are busy, again and again", function()
    for i = 1, 30 do
      local other = assert(etcd3.new { endpoints = member.endpoint })
      local lease = assert(other:grant(5))
      lease:keepalive()
      local w = assert(other:watch("/busy/", { prefix = true }))
      for j = 1, 5 do assert(cli:put("/busy/" .. j, tostring(i))) end
      if i % 2 == 0 then assert(w:next(5)) end
      other:close()
      local ev, err = w:next(1)
      while ev do ev, err = w:next(1) end
      assert.are.equal("CLOSED", err.code)
    end
  end)

  it("raises on bad arguments and after close", function()
    assert.has_error(function() cli:watch(5) end)
    assert.has_error(function() cli:watch("/k", { revision = 5 }) end, "etcd3.watch: unknown option 'revision'")
    assert.has_error(function() cli:watch("/k", { prefix = true, range_end = "x" }) end)
    local other = assert(etcd3.new { endpoints = member.endpoint })
    local w = assert(other:watch("/closing"))
    other:close()
    local ev, err = w:next(1)
    assert.is_nil(ev)
    assert.are.equal("CLOSED", err.code)
    assert.has_error(function() other:watch("/k") end)
  end)
end)

describe("watch across a member kill in a 3-member cluster", function()
  local cluster
  setup(function() cluster = helper.cluster(3) end)
  teardown(function() if cluster then cluster.stop() end end)

  -- The member killed is a follower that carries the watch stream (the
  -- client's first endpoint): the lease under keepalive beside the watch
  -- must then move on without waiting for an election, whose length on a
  -- loaded machine no TTL bounds (spec/05 covers the leader's death).
  it("delivers every one of 2000 revisions exactly once, in order", function()
    local victim, endpoints = helper.follower_first(cluster)
    local cli = assert(etcd3.new { endpoints = endpoints })
    local lease = assert(cli:grant(5))
    lease:keepalive()
    local w = assert(cli:watch("/kill/", { prefix = true }))
    local twin = assert(cli:watch("/kill/", { prefix = true })) -- shares w's etcd watch
    local start = w:revision()
    -- the writer talks to the members that stay up
    local writer = [[
      local etcd3 = require "etcd3"
      local cli = assert(etcd3.new { endpoints = { "]] .. endpoints[2] .. [[", "]] ..
      endpoints[3] .. [[" } })
      for i = 1, 2000 do
        local deadline = os.time() + 20
        while not cli:put("/kill/" .. i, tostring(i)) do assert(os.time() < deadline, "put " .. i) end
      end
    ]]
    local pipe = io.popen(helper.lua_command(writer) .. " 2>&1; echo exit=$?")
    local got, last = {}, start
    local killed = false
    local deadline = core.now() + 90
    while #got < 2000 and core.now() < deadline do
      local ev, err = w:next(1)
      if ev then
        -- every revision exactly once and in order (only the writer writes)
        assert.are.equal(last + 1, ev.kv.mod_revision)
        last = ev.kv.mod_revision
        got[#got + 1] = tonumber(ev.kv.value)
        if #got == 600 and not killed then
          cluster.members[victim]:kill() -- the member carrying the watch stream
          killed = true
        end
      else
        assert.are.equal("TIMEOUT", err.code)
      end
    end
    local out = pipe:read("*a")
    pipe:close()
    assert.matches("exit=0", out)
    assert.is_true(killed)
    assert.are.equal(2000, #got)
    -- puts retried after an UNAVAILABLE may land twice: values never go back
    for i = 2, #got do assert.is_true(got[i] >= got[i - 1]) end
    assert.are.equal(2000, got[#got])
    assert.are.equal("TIMEOUT", select(2, w:next(0.5)).code)
    -- the twin got the same events, each once, in order
    last = start
    for _ = 1, 2000 do
      local ev = assert(twin:next(5))
      assert.are.equal(last + 1, ev.kv.mod_revision)
      last = ev.kv.mod_revision
    end
    assert.are.equal("TIMEOUT", select(2, twin:next(0)).code)
    assert.is_true(lease:alive())
    cli:close()
  end)
end)
