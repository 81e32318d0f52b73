-- Queues, priority queues, barriers, double barriers and rwmutexes: the key
-- layouts of etcd's contrib/recipes, shared with other Lua processes and
-- with Go's recipes.
local helper = require "spec.helpers.etcd"
local process = require "spec.helpers.process"
local keys_under, raises = process.keys_under, process.raises
local gopeer = require "spec.helpers.gopeer"

--- Steps every task until all have finished; their first results in order.
local function finish_all(tasks, timeout)
  local done = {}
  helper.wait_for(function()
    local all = true
    for i, task in ipairs(tasks) do
      done[i] = task.step()
      all = all and done[i]
    end
    return all
  end, timeout or 60, "the tasks")
  local results = {}
  for i, task in ipairs(tasks) do results[i] = task.results[1] end
  return results
end

--- A Lua child dequeuing from `prefix` until it gets "stop"; prints
-- "item <value>" for each.
local function lua_consumer(member, prefix)
  return process.lua(([[
    local etcd3 = require "etcd3"
    local q = assert(etcd3.new { endpoints = %q }):queue(%q)
    while true do
      local v = assert(q:dequeue(120))
      if v == "stop" then break end
      print("item " .. v)
    end
    print("done")
  ]]):format(member.endpoint, prefix))
end

local function items_of(out, got)
  for v in out:gmatch("item ([^\n]+)") do got[#got + 1] = v end
  return got
end

--- Waits for the Lua consumers to finish; adds what they took to `got`.
local function lua_items(children, got)
  for _, child in ipairs(children) do
    local out = child:read("*a")
    child:close()
    assert.matches("done\nexit=0", out)
    items_of(out, got)
  end
  return got
end

local function sorted(list)
  table.sort(list)
  return list
end

describe("more recipes", function()
  local member, cli
  local start_member, stop_member = helper.member_and_client(function(m, c) member, cli = m, c end)
  setup(start_member)
  teardown(stop_member)

  describe("queue", function()
    it("is FIFO; dequeue waits for an enqueue; a TIMEOUT takes nothing", function()
      local q = cli:queue("/fifo")
      for _, v in ipairs { "one", "two", "three" } do assert.is_true(q:enqueue(v)) end
      assert.matches("^/fifo/%d+$", keys_under(cli, "/fifo/")[1]) -- Go's layout: prefix/nanoseconds
      assert.are.same({ "one", "two", "three" }, { q:dequeue(), q:dequeue(), q:dequeue() })
      local _, err = q:dequeue(0.3)
      assert.are.equal("TIMEOUT", err.code)
      local coop = process.cooperative_client(member.endpoint)
      local waiting = process.task(function() return coop:queue("/fifo"):dequeue(60) end)
      waiting.until_(function() return true end, 5)
      assert.is_true(q:enqueue("late"))
      assert.are.equal("late", waiting.finish(30))
      assert.are.same({}, keys_under(cli, "/fifo/"))
      coop:close()
    end)

    it("hands each item to exactly one of three competing Lua processes", function()
      local q = cli:queue("/compete")
      local consumers = {}
      for i = 1, 3 do consumers[i] = lua_consumer(member, "/compete") end
      local want = {}
      for i = 1, 60 do
        want[i] = ("item-%02d"):format(i)
        assert(q:enqueue(want[i]))
      end
      for _ = 1, 3 do assert(q:enqueue("stop")) end
      local got = lua_items(consumers, {})
      assert.are.same(want, sorted(got))
      assert.are.same({}, keys_under(cli, "/compete/"))
    end)
  end)

  it("priority queue: lowest number first, FIFO within one", function()
    local q = cli:priority_queue("/prio")
    for _, item in ipairs { { "c1", 3 }, { "a1", 1 }, { "c2", 3 }, { "a2", 1 }, { "z", 65535 }, { "zero", 0 } } do
      assert.is_true(q:enqueue(item[1], item[2]))
    end
    -- Go's layout: prefix/%05d priority/%016d sequence
    local keys = sorted(keys_under(cli, "/prio/"))
    assert.are.same({ "/prio/00000/0000000000000000", "/prio/00001/0000000000000000",
      "/prio/00001/0000000000000001" }, { keys[1], keys[2], keys[3] })
    local got = {}
    for i = 1, 6 do got[i] = q:dequeue(5) end
    assert.are.same({ "zero", "a1", "a2", "c1", "c2", "z" }, got)
    local _, err = q:dequeue(0.2)
    assert.are.equal("TIMEOUT", err.code)
  end)

  it("barrier: wait returns at once when not held, and releases every waiter together", function()
    local b = cli:barrier("/barrier")
    assert.is_true(b:wait(0))
    assert.is_true(b:hold())
    local _, held = b:hold()
    assert.are.equal("ALREADY_EXISTS", held.code)
    local _, err = b:wait(0.3)
    assert.are.equal("TIMEOUT", err.code)
    local coop = process.cooperative_client(member.endpoint)
    local waiters = {}
    for i = 1, 3 do waiters[i] = process.task(function() return coop:barrier("/barrier"):wait(60) end) end
    for _, w in ipairs(waiters) do w.until_(function() return true end, 5) end
    -- still waiting a moment later
    for _ = 1, 20 do
      for _, w in ipairs(waiters) do assert.is_false(w.step()) end
    end
    assert.is_true(b:release())
    assert.are.same({ true, true, true }, finish_all(waiters, 30))
    coop:close()
  end)

  it("double barrier: enter returns once count entered, leave once all left", function()
    local coop = process.cooperative_client(member.endpoint)
    local barriers = {}
    for i = 1, 3 do barriers[i] = assert(coop:session { ttl = 10 }):double_barrier("/double", 3) end
    local entering = {}
    for i = 1, 2 do entering[i] = process.task(function() return barriers[i]:enter(60) end) end
    for _, t in ipairs(entering) do
      t.until_(function() return #keys_under(cli, "/double/waiters/") >= 1 end, 20, "the waiters")
    end
    helper.wait_for(function()
      for _, t in ipairs(entering) do assert.is_false(t.step()) end
      return #keys_under(cli, "/double/waiters/") == 2
    end, 20, "two waiters")
    assert.are.same({}, keys_under(cli, "/double/ready"))
    entering[3] = process.task(function() return barriers[3]:enter(60) end)
    assert.are.same({ true, true, true }, finish_all(entering, 30))
    -- leaving: nobody returns before the last one leaves
    local leaving = { process.task(function() return barriers[1]:leave(60) end),
      process.task(function() return barriers[2]:leave(60) end) }
    for _ = 1, 50 do
      for _, t in ipairs(leaving) do assert.is_false(t.step()) end
    end
    leaving[3] = process.task(function() return barriers[3]:leave(60) end)
    assert.are.same({ true, true, true }, finish_all(leaving, 30))
    assert.are.same({}, keys_under(cli, "/double/"))
    -- a fourth participant is refused; enter(timeout) leaves nothing
    local s = assert(cli:session { ttl = 10 })
    local lone = s:double_barrier("/double2", 2)
    local _, err = lone:enter(0.3)
    assert.are.equal("TIMEOUT", err.code)
    assert.are.same({}, keys_under(cli, "/double2/"))
    s:close()
    coop:close()
  end)

  it("rwmutex: readers share, a writer excludes everyone, in arrival order; TIMEOUT leaves nothing", function()
    local s1, s2, s3 = assert(cli:session { ttl = 10 }), assert(cli:session { ttl = 10 }), assert(cli:session { ttl = 10 })
    local r1, r2, w = s1:rwmutex("/rw"), s2:rwmutex("/rw"), s3:rwmutex("/rw")
    assert.is_true(r1:rlock(5))
    assert.is_true(r2:rlock(5))
    assert.matches("^/rw/read/%d+$", r1:key()) -- Go's layout
    local _, err = w:lock(0.3)
    assert.are.equal("TIMEOUT", err.code)
    assert.are.equal(2, #keys_under(cli, "/rw/"))
    assert.is_true(r2:runlock())
    -- a writer waiting blocks the readers that come after it
    local coop = process.cooperative_client(member.endpoint)
    local cw = assert(coop:session { ttl = 10 }):rwmutex("/rw")
    local writer = process.task(function() return cw:lock(60) end)
    writer.until_(function() return #keys_under(cli, "/rw/write/") == 1 end, 20, "the writer's key")
    local _, rerr = r2:rlock(0.3)
    assert.are.equal("TIMEOUT", rerr.code)
    assert.is_true(r1:runlock())
    assert.is_true(writer.finish(30))
    local _, werr = w:lock(0.3)
    assert.are.equal("TIMEOUT", werr.code)
    assert.is_true(cw:unlock())
    assert.is_true(w:lock(5))
    assert.is_true(w:unlock())
    assert.are.same({}, keys_under(cli, "/rw/"))
    s1:close(); s2:close(); s3:close()
    coop:close()
  end)

  it("raises on bad arguments", function()
    local s = assert(cli:session { ttl = 10 })
    raises("bad argument #1 to 'etcd3%.queue' %(string expected", cli.queue, cli, 1)
    raises("bad argument #1 to 'etcd3%.queue:enqueue' %(string expected", function() cli:queue("/q"):enqueue(1) end)
    raises("bad argument #1 to 'etcd3%.queue:dequeue' %(number expected", function() cli:queue("/q"):dequeue("1") end)
    raises("bad argument #2 to 'etcd3%.priority_queue:enqueue' %(integer expected",
      function() cli:priority_queue("/q"):enqueue("v", 1.5) end)
    raises("etcd3%.priority_queue:enqueue: priority 65536 out of 0%-65535",
      function() cli:priority_queue("/q"):enqueue("v", 65536) end)
    raises("bad argument #1 to 'etcd3%.barrier' %(string expected", cli.barrier, cli)
    raises("bad argument #1 to 'etcd3%.barrier:wait' %(number expected", function() cli:barrier("/b"):wait("x") end)
    raises("bad argument #2 to 'etcd3%.session:double_barrier' %(integer expected",
      function() s:double_barrier("/d", "3") end)
    raises("etcd3%.session:double_barrier: count must be >= 1", function() s:double_barrier("/d", 0) end)
    raises("bad argument #1 to 'etcd3%.session:rwmutex' %(string expected", function() s:rwmutex() end)
    raises("bad argument #1 to 'etcd3%.rwmutex:lock' %(number expected", function() s:rwmutex("/r"):lock("x") end)
    raises("etcd3%.rwmutex:rlock: called without an object", s:rwmutex("/r").rlock)
    s:close()
    raises("etcd3%.session:rwmutex: the session was closed", function() s:rwmutex("/r") end)
  end)

  describe("with Go's contrib/recipes", function()
    local bin, why = gopeer.build()
    local it_go = bin and it or function(name) pending(name .. ": " .. why) end

    it_go("queue: each item goes to exactly one of Lua and Go consumers; Go reads Lua's items", function()
      local gos = { gopeer.start(member, "dequeue", "/mixed"), gopeer.start(member, "dequeue", "/mixed") }
      local luas = { lua_consumer(member, "/mixed"), lua_consumer(member, "/mixed") }
      local want = {}
      local q = cli:queue("/mixed")
      for i = 1, 30 do
        want[i] = ("lua-%02d"):format(i)
        assert(q:enqueue(want[i]))
      end
      local producer = gopeer.start(member, "enqueue", "/mixed", "go-1", "go-2", "go-3", "go-4", "go-5")
      helper.wait_for(function() return not process.running(producer.pid) end, 60, "the Go producer")
      assert.matches("done\n$", process.stop(producer))
      for i = 1, 5 do want[#want + 1] = "go-" .. i end
      for _ = 1, 4 do assert(q:enqueue("stop")) end
      local got = lua_items(luas, {})
      for _, go in ipairs(gos) do
        helper.wait_for(function() return not process.running(go.pid) end, 60, "a Go consumer")
        local out = process.stop(go)
        assert.matches("done\n$", out)
        items_of(out, got)
      end
      assert.are.same(sorted(want), sorted(got))
      assert.are.same({}, keys_under(cli, "/mixed/"))
    end)

    it_go("priority queue: one order across Lua and Go producers and consumers", function()
      local q = cli:priority_queue("/gprio")
      assert(q:enqueue("lua-5", 5))
      local go = gopeer.start(member, "pq-enqueue", "/gprio", "2", "go-2a", "go-2b")
      helper.wait_for(function() return not process.running(go.pid) end, 60, "the Go producer")
      assert.matches("done\n$", process.stop(go))
      assert(q:enqueue("lua-2", 2))
      assert(q:enqueue("lua-0", 0))
      assert.are.equal("lua-0", q:dequeue(5))
      local consumer = gopeer.start(member, "pq-dequeue", "/gprio", "3")
      helper.wait_for(function() return not process.running(consumer.pid) end, 60, "the Go consumer")
      assert.are.equal("item go-2a\nitem go-2b\nitem lua-2\ndone\n", process.stop(consumer))
      assert.are.equal("lua-5", q:dequeue(5))
    end)

    it_go("double barrier: Lua and Go participants enter and leave together", function()
      local go = gopeer.start(member, "double-barrier", "/gdouble", "3")
      helper.wait_for(function() return #keys_under(cli, "/gdouble/waiters/") == 1 end, 60, "the Go participant")
      local coop = process.cooperative_client(member.endpoint)
      local barriers = {}
      for i = 1, 2 do barriers[i] = assert(coop:session { ttl = 10 }):double_barrier("/gdouble", 3) end
      local first = process.task(function() return barriers[1]:enter(60) end)
      first.until_(function() return #keys_under(cli, "/gdouble/waiters/") == 2 end, 20, "the first Lua participant")
      assert.is_nil(process.output(go):find("entered", 1, true))
      local second = process.task(function() return barriers[2]:enter(60) end)
      assert.are.same({ true, true }, finish_all({ first, second }, 30))
      helper.wait_for(function() return process.output(go):find("entered\n", 1, true) end, 30, "Go to enter")
      assert.is_nil(process.output(go):find("left", 1, true))
      local leaving = { process.task(function() return barriers[1]:leave(60) end) }
      for _ = 1, 30 do assert.is_false(leaving[1].step()) end
      leaving[2] = process.task(function() return barriers[2]:leave(60) end)
      assert.are.same({ true, true }, finish_all(leaving, 30))
      helper.wait_for(function() return not process.running(go.pid) end, 30, "Go to leave")
      assert.are.equal("entered\nleft\ndone\n", process.stop(go))
      assert.are.same({}, keys_under(cli, "/gdouble/"))
      coop:close()
    end)

    it_go("rwmutex: a Go writer excludes Lua, a Lua writer excludes Go, Go readers share with Lua", function()
      local s = assert(cli:session { ttl = 10 })
      local rw = s:rwmutex("/grw")
      -- Go writes: Lua can neither read nor write until it unlocks
      local go = gopeer.start(member, "rwlock", "/grw", "write", "3")
      helper.wait_for(function() return process.output(go):find("locked\n", 1, true) end, 60, "the Go writer")
      local _, err = rw:rlock(0.3)
      assert.are.equal("TIMEOUT", err.code)
      assert.is_true(rw:lock(60))
      assert.matches("unlocking\n", process.output(go))
      -- Lua writes: a Go reader waits until it unlocks
      local reader = gopeer.start(member, "rwlock", "/grw", "read", "0")
      helper.wait_for(function() return #keys_under(cli, "/grw/read/") == 1 end, 60, "the Go reader's key")
      assert.is_nil(process.output(reader):find("locked", 1, true))
      assert.is_true(rw:unlock())
      helper.wait_for(function() return not process.running(reader.pid) end, 60, "the Go reader")
      assert.matches("^locked\nunlocking\ndone\n$", process.stop(reader))
      helper.wait_for(function() return not process.running(go.pid) end, 60, "the Go writer")
      process.stop(go)
      -- a Go reader and a Lua reader hold it together
      local shared = gopeer.start(member, "rwlock", "/grw", "read", "3")
      helper.wait_for(function() return process.output(shared):find("locked\n", 1, true) end, 60, "the Go reader")
      assert.is_true(rw:rlock(1))
      assert.is_nil(process.output(shared):find("unlocking", 1, true))
      assert.is_true(rw:runlock())
      process.stop(shared)
      s:close()
    end)
  end)
end)
