-- client:stm: clientv3's STM, its four isolation levels, and Lua and Go
-- STMs over the same keys.
local helper = require "spec.helpers.etcd"
local process = require "spec.helpers.process"
local raises = process.raises
local gopeer = require "spec.helpers.gopeer"

local LEVELS = { "serializable_snapshot", "serializable", "repeatable_reads", "read_committed" }
-- The levels whose commit guards what was read: no increment is lost.
local EXACT = { "serializable_snapshot", "serializable", "repeatable_reads" }

local function value(cli, key)
  local kv = assert(cli:get(key)).kvs[1]
  return kv and kv.value
end

--- A Lua child doing `n` STM increments of `key` at `isolation`; its
-- output ends with "done\nexit=0".
local function lua_incrementer(member, isolation, key, n)
  return process.lua(([[
    local etcd3 = require "etcd3"
    local cli = assert(etcd3.new { endpoints = %q })
    for _ = 1, %d do
      assert(cli:stm(function(stm)
        stm:put(%q, tostring(tonumber(stm:get(%q) or "0") + 1))
      end, { isolation = %q, timeout = 120 }))
    end
    print("done")
  ]]):format(member.endpoint, n, key, key, isolation))
end

local function finish(child)
  local out = child:read("*a")
  child:close()
  assert.matches("done\nexit=0", out)
end

describe("stm", function()
  local member, cli
  local start_member, stop_member = helper.member_and_client(function(m, c) member, cli = m, c end)
  setup(start_member)
  teardown(stop_member)

  it("returns what fn returned on the run that committed, true for nothing", function()
    local a, b, c = cli:stm(function(stm)
      stm:put("/ret/k", "v")
      return 1, nil, "three"
    end)
    assert.are.same({ 1, nil, "three" }, { a, b, c })
    assert.are.equal("v", value(cli, "/ret/k"))
    assert.is_true(cli:stm(function(stm) stm:delete("/ret/k") end))
    assert.is_nil(value(cli, "/ret/k"))
  end)

  it("propagates an error raised in fn and writes nothing", function()
    assert(cli:put("/raise/a", "1"))
    for _, isolation in ipairs(LEVELS) do
      local thrown = { "a table" }
      local ok, err = pcall(cli.stm, cli, function(stm)
        stm:put("/raise/a", "2")
        stm:put("/raise/b", "2")
        stm:delete("/raise/a")
        error(thrown)
      end, { isolation = isolation })
      assert.is_false(ok)
      assert.are.equal(thrown, err) -- the very value raised
      raises("spec/27%-stm_spec%.lua:%d+: boom", cli.stm, cli, function() error("boom") end, { isolation = isolation })
    end
    assert.are.equal("1", value(cli, "/raise/a"))
    assert.is_nil(value(cli, "/raise/b"))
  end)

  it("reads nil and rev 0 for an absent key, the mod revision otherwise, and its own writes", function()
    for _, isolation in ipairs(LEVELS) do
      local put = assert(cli:put("/ryw/present", "p"))
      assert(cli:stm(function(stm)
        assert.is_nil(stm:get("/ryw/absent"))
        assert.are.equal(0, stm:rev("/ryw/absent"))
        assert.are.equal("p", stm:get("/ryw/present"))
        assert.are.equal(put.header.revision, stm:rev("/ryw/present"))
        stm:put("/ryw/absent", "new")
        assert.are.equal("new", stm:get("/ryw/absent"))
        stm:delete("/ryw/present")
        assert.is_nil(stm:get("/ryw/present"))
        -- buffered: etcd has neither write yet
        assert.is_nil(value(cli, "/ryw/absent"))
        assert.are.equal("p", value(cli, "/ryw/present"))
        stm:put("/ryw/present", "p")
        stm:delete("/ryw/absent")
      end, { isolation = isolation }))
    end
  end)

  it("puts under a lease and prefetches", function()
    local lease = assert(cli:grant(30))
    assert(cli:put("/pre/a", "A"))
    assert(cli:stm(function(stm)
      assert.are.equal("A", stm:get("/pre/a"))
      assert.is_nil(stm:get("/pre/b"))
      stm:put("/pre/b", "B", { lease = lease.id })
    end, { prefetch = { "/pre/a", "/pre/b" } }))
    assert.are.equal(lease.id, assert(cli:get("/pre/b")).kvs[1].lease)
    lease:revoke()
  end)

  it("runs fn again after a conflicting write for the levels that guard reads", function()
    for _, isolation in ipairs(LEVELS) do
      local key = "/conflict/" .. isolation
      assert(cli:put(key, "0"))
      local runs = 0
      local seen = assert(cli:stm(function(stm)
        runs = runs + 1
        local n = tonumber(stm:get(key))
        if runs == 1 then assert(cli:put(key, "10")) end -- another writer, between read and commit
        stm:put(key, tostring(n + 1))
        return n
      end, { isolation = isolation }))
      if isolation == "read_committed" then
        assert.are.same({ 1, 0, "1" }, { runs, seen, value(cli, key) }) -- the update of "10" is lost
      else
        assert.are.same({ 2, 10, "11" }, { runs, seen, value(cli, key) })
      end
    end
  end)

  it("reads at the first read's revision for the serializable levels", function()
    for _, isolation in ipairs(LEVELS) do
      local key = "/snap/" .. isolation
      local later, runs = nil, 0
      assert(cli:stm(function(stm)
        runs = runs + 1
        stm:get("/snap/first")
        if runs == 1 then
          assert(cli:put(key, "after the first read"))
          later = stm:get(key)
        end
      end, { isolation = isolation }))
      if isolation:find("^serializable") then assert.is_nil(later) else assert.are.equal("after the first read", later) end
    end
  end)

  it("serializable_snapshot also guards blind writes made after its first read", function()
    for _, isolation in ipairs { "serializable_snapshot", "serializable" } do
      local key = "/blind/" .. isolation
      local runs = 0
      assert(cli:stm(function(stm)
        runs = runs + 1
        stm:get("/blind/read")
        if runs == 1 then assert(cli:put(key, "other")) end
        stm:put(key, "mine")
      end, { isolation = isolation }))
      assert.are.equal(isolation == "serializable_snapshot" and 2 or 1, runs)
      assert.are.equal("mine", value(cli, key))
    end
  end)

  it("gives up with DEADLINE_EXCEEDED while another process keeps conflicting, writing nothing", function()
    assert(cli:put("/busy", "0"))
    local writer = process.spawn("exec env " .. helper.lua_command(([[
      local etcd3 = require "etcd3"
      local cli = assert(etcd3.new { endpoints = %q })
      local i = 0
      while true do i = i + 1; assert(cli:put("/busy", tostring(i))) end
    ]]):format(member.endpoint)))
    finally(function() process.stop(writer) end)
    local runs = 0
    local started = helper.now()
    local ok, err = cli:stm(function(stm)
      runs = runs + 1
      local rev = stm:rev("/busy")
      stm:put("/busy-out", "written")
      -- each run reads the key, then waits until the writer has changed it
      helper.wait_for(function() return assert(cli:get("/busy")).kvs[1].mod_revision > rev end, 20, "the writer")
    end, { timeout = 2 })
    assert.is_nil(ok)
    assert.are.equal("DEADLINE_EXCEEDED", err.code)
    assert.is_true(runs >= 1)
    assert.is_true(helper.now() - started >= 2)
    assert.is_nil(value(cli, "/busy-out"))
    assert.is_true(process.running(writer.pid)) -- the conflicts came from it all along
  end)

  it("returns a failed read as nil, err, even when fn swallows it, writing nothing", function()
    local ok, err = cli:stm(function(stm)
      pcall(stm.get, stm, "/failed/read") -- no time left for it
      stm:put("/failed/out", "written")
    end, { timeout = 0 })
    assert.is_nil(ok)
    assert.are.equal("DEADLINE_EXCEEDED", err.code)
    assert.is_nil(value(cli, "/failed/out"))
  end)

  it("counts exactly under concurrent increments from three Lua processes", function()
    for _, isolation in ipairs(EXACT) do
      local key = "/count/" .. isolation
      local children = {}
      for i = 1, 3 do children[i] = lua_incrementer(member, isolation, key, 20) end
      for _, child in ipairs(children) do finish(child) end
      assert.are.equal("60", value(cli, key))
    end
  end)

  it("raises on bad arguments and unknown options", function()
    raises("bad argument #1 to 'etcd3%.stm' %(function expected", cli.stm, cli, "x")
    raises("etcd3%.stm: unknown option 'isolate'", cli.stm, cli, function() end, { isolate = "serializable" })
    raises("etcd3%.stm: option 'isolation': one of", cli.stm, cli, function() end, { isolation = "snapshot" })
    raises("etcd3%.stm: option 'prefetch': list of strings", cli.stm, cli, function() end, { prefetch = { 1 } })
    raises("etcd3%.stm: called without an object", cli.stm)
    raises("bad argument #1 to 'etcd3%.stm:get' %(string expected", cli.stm, cli, function(s) s:get(1) end)
    raises("bad argument #2 to 'etcd3%.stm:put' %(string expected", cli.stm, cli, function(s) s:put("k", 1) end)
    raises("etcd3%.stm:put: unknown option 'ttl'", cli.stm, cli, function(s) s:put("k", "v", { ttl = 1 }) end)
    raises("bad argument #1 to 'etcd3%.stm:delete' %(string expected", cli.stm, cli, function(s) s:delete() end)
    raises("bad argument #1 to 'etcd3%.stm:rev' %(string expected", cli.stm, cli, function(s) s:rev({}) end)
  end)

  describe("with Go's STM on the same key", function()
    local bin, why = gopeer.build()
    local it_go = bin and it or function(name) pending(name .. ": " .. why) end

    it_go("counts exactly for the levels Go's STM keeps exact", function()
      for _, isolation in ipairs(EXACT) do
        local key = "/go-count/" .. isolation
        local go = gopeer.start(member, "stm-increment", isolation, key, "20")
        local children = { lua_incrementer(member, isolation, key, 20), lua_incrementer(member, isolation, key, 20) }
        for _, child in ipairs(children) do finish(child) end
        helper.wait_for(function() return not process.running(go.pid) end, 120, "the Go peer")
        assert.matches("done\n$", process.stop(go))
        assert.are.equal("60", value(cli, key))
      end
    end)
  end)
end)
