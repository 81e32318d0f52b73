-- cqueues: inside a running controller, waits go through cqueues.poll on
-- the client's pollfd, so coroutines of one controller progress together.
local etcd3 = require "etcd3"
local helper = require "spec.helpers.etcd"

describe("cqueues", function()
  local cqueues = require "cqueues"
  local member
  setup(function() member = helper.single() end)
  teardown(function() if member then member:stop() end end)

  it("runs a watcher and a writer coroutine in one controller", function()
    local cli = assert(etcd3.new { endpoints = member.endpoint })
    local cq = cqueues.new()
    local seen, written = {}, 0
    local ready = false
    cq:wrap(function()
      local w = assert(cli:watch("/cq/", { prefix = true }))
      ready = true
      for _ = 1, 20 do
        local ev = assert(w:next(10))
        seen[#seen + 1] = ev.kv.value
      end
      w:cancel()
    end)
    cq:wrap(function()
      while not ready do cqueues.sleep(0.01) end
      for i = 1, 20 do
        assert(cli:put("/cq/k", tostring(i)))
        written = written + 1
      end
    end)
    -- a third coroutine proves the controller is never blocked by a call
    local ticks = 0
    cq:wrap(function()
      while #seen < 20 do
        ticks = ticks + 1
        cqueues.sleep(0.005)
      end
    end)
    assert(cq:loop(30))
    assert.are.equal(20, written)
    assert.are.equal(20, #seen)
    for i = 1, 20 do assert.are.equal(tostring(i), seen[i]) end
    assert.is_true(ticks > 1)
    cli:close()
  end)

  it("lets many coroutines wait on their own calls", function()
    local cli = assert(etcd3.new { endpoints = member.endpoint })
    local cq = cqueues.new()
    local done = 0
    for i = 1, 50 do
      cq:wrap(function()
        assert(cli:put("/cq/many/" .. i, tostring(i)))
        assert.are.equal(tostring(i), assert(cli:get("/cq/many/" .. i)).kvs[1].value)
        done = done + 1
      end)
    end
    assert(cq:loop(30))
    assert.are.equal(50, done)
    cli:close()
  end)
end)
