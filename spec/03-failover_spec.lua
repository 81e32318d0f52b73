-- Members that freeze, die and come back; clusters with a member down.
local etcd3 = require "etcd3"
local helper = require "spec.helpers.etcd"

describe("a frozen member", function()
  local member
  setup(function() member = helper.single() end)
  teardown(function() if member then member:stop() end end)

  it("gives DEADLINE_EXCEEDED within timeout + 0.5 s; the client works after SIGCONT", function()
    local cli = assert(etcd3.new { endpoints = member.endpoint, timeout = 1 })
    assert(cli:put("/frozen", "1"))
    member:signal("STOP")
    local t0 = helper.now()
    local res, err = cli:get("/frozen")
    local took = helper.now() - t0
    member:signal("CONT")
    assert.is_nil(res)
    assert.are.equal("DEADLINE_EXCEEDED", err.code)
    assert.is_true(took >= 0.9 and took < 1.5, "took " .. took)
    helper.wait_for(function() return cli:get("/frozen") end, 10, "the client to work again")
    assert.are.equal("1", assert(cli:get("/frozen")).kvs[1].value)
    cli:close()
  end)
end)

describe("a member killed and restarted on the same port", function()
  local member
  setup(function() member = helper.single() end)
  teardown(function() if member then member:stop() end end)

  it("is used again by the same client within 2 s", function()
    local cli = assert(etcd3.new { endpoints = member.endpoint, timeout = 1 })
    assert(cli:put("/restart", "before"))
    member:kill()
    local res, err = cli:get("/restart")
    assert.is_nil(res)
    assert.are.equal("UNAVAILABLE", err.code)
    -- stay down long enough for gRPC's reconnect backoff to grow
    local down = helper.now() + 3
    while helper.now() < down do
      assert.is_nil(cli:get("/restart"))
      require("etcd3.core").sleep(0.2)
    end
    member:start()
    member:wait_healthy()
    local t0 = helper.now()
    helper.wait_for(function() return cli:get("/restart") end, 2, "the same client to work again")
    io.stderr:write(("\n[restart] client back %.3f s after the member was healthy\n"):format(helper.now() - t0))
    assert.are.equal("before", assert(cli:get("/restart")).kvs[1].value)
    assert(cli:put("/restart", "after"))
    cli:close()
  end)
end)

describe("a 3-member cluster with one member killed", function()
  local cluster
  setup(function() cluster = helper.cluster(3) end)
  teardown(function() if cluster then cluster.stop() end end)

  it("still serves reads and writes", function()
    -- (the timeout allows for an election when member 1 led: on a loaded
    -- machine one takes more than 2 s)
    local cli = assert(etcd3.new { endpoints = cluster.endpoints, timeout = 10 })
    assert(cli:put("/cluster/k", "v"))
    cluster.members[1]:kill()
    for i = 1, 20 do
      local res, err = cli:get("/cluster/k")
      assert.is_truthy(res, "read " .. i .. " failed: " .. tostring(err))
      assert.are.equal("v", res.kvs[1].value)
      assert.is_truthy(cli:get("/cluster/k", { serializable = true }))
    end
    -- a write goes to a live member (the failed one is known to be down)
    helper.wait_for(function() return cli:put("/cluster/k", "w") end, 5, "a write to succeed")
    assert.are.equal("w", assert(cli:get("/cluster/k")).kvs[1].value)
    cli:close()
  end)

  it("reads succeed even when the first endpoint is the dead one", function()
    local eps = { cluster.endpoints[1], cluster.endpoints[2], cluster.endpoints[3] }
    local cli = assert(etcd3.new { endpoints = eps, timeout = 2 })
    for _ = 1, 10 do assert(cli:get("/cluster/k")) end
    cli:close()
  end)
end)

describe("a 3-member cluster whose members all went down", function()
  local cluster
  setup(function() cluster = helper.cluster(3) end)
  teardown(function() if cluster then cluster.stop() end end)

  it("retries a read in rounds, pausing between them, until two are back", function()
    local started = false
    local cli = assert(etcd3.new {
      endpoints = cluster.endpoints, dial_timeout = 0, timeout = 30,
      -- the first pause between two rounds restarts two members (a
      -- rolling restart): the read must ride it out
      wait = function(_, timeout, op)
        if op.polling and not started then
          started = true
          cluster.members[1]:start()
          cluster.members[2]:start()
        end
        op:wait(math.min(timeout, 0.05))
      end,
    })
    finally(function() cli:close() end)
    assert(cli:put("/down/k", "v"))
    for _, m in ipairs(cluster.members) do m:kill() end
    local res, err = cli:get("/down/k")
    assert.is_truthy(res, tostring(err))
    assert.is_true(started)
    assert.are.equal("v", res.kvs[1].value)
    -- a single endpoint still fails at once: it has nowhere else to go
    local one = assert(etcd3.new { endpoints = cluster.endpoints[3], dial_timeout = 0, timeout = 30 })
    local t0 = helper.now()
    local none, one_err = one:get("/down/k")
    assert.is_nil(none)
    assert.are.equal("UNAVAILABLE", one_err.code)
    assert.is_true(helper.now() - t0 < 5, "took " .. helper.now() - t0)
    one:close()
  end)
end)

describe("waiting", function()
  local member
  setup(function() member = helper.single() end)
  teardown(function() if member then member:stop() end end)

  -- The member stays frozen until the wait function is first called, so
  -- the put cannot be answered before it is asked to wait.
  it("calls the client's wait function with the time left and the op", function()
    local seen = {}
    local cli = assert(etcd3.new { endpoints = member.endpoint, dial_timeout = 0, timeout = 3,
      wait = function(client, timeout, op)
        seen[#seen + 1] = { client = client, timeout = timeout, ready = op:ready() }
        if #seen == 1 then member:signal("CONT") end
        require("etcd3.core").sleep(0.001)
      end })
    member:signal("STOP")
    finally(function() member:signal("CONT") end)
    assert(cli:put("/w", "1"))
    assert.is_true(#seen >= 1)
    assert.are.equal(cli, seen[1].client)
    assert.is_true(seen[1].timeout > 2 and seen[1].timeout <= 3)
    cli:close()
  end)

  it("lets many coroutines wait on one client, driven by the pollfd", function()
    local cli
    local waiting = {}
    cli = assert(etcd3.new { endpoints = member.endpoint, dial_timeout = 0,
      wait = function(_, _, op)
        waiting[coroutine.running()] = op
        coroutine.yield()
      end })
    local fd = cli:pollfd()
    assert.is_number(fd)
    assert.are.equal(fd, cli:pollfd())
    local results, cos = {}, {}
    for i = 1, 20 do
      cos[i] = coroutine.create(function()
        assert(cli:put("/co/" .. i, tostring(i)))
        results[i] = assert(cli:get("/co/" .. i)).kvs[1].value
      end)
    end
    for _, co in ipairs(cos) do assert(coroutine.resume(co)) end
    -- the smallest scheduler: wait on the pollfd, resume whose op is ready
    local deadline = helper.now() + 10
    while next(waiting) and helper.now() < deadline do
      cli._core:wait(0.5) -- poll(2) on the pollfd
      for co, op in pairs(waiting) do
        if op:ready() then
          waiting[co] = nil
          assert(coroutine.resume(co))
        end
      end
    end
    for i = 1, 20 do assert.are.equal(tostring(i), results[i]) end
    cli:close()
  end)
end)
