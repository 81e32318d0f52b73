-- Txn: compares, ops, nesting, the table form, result shapes, refusals.
local etcd3 = require "etcd3"
local helper = require "spec.helpers.etcd"
local cmp, op = etcd3.compare, etcd3.op

-- the revision stamp differs between a txn's and a plain call's header
local function without_header(t)
  local copy = {}
  for k, v in pairs(t) do if k ~= "header" and k ~= "type" then copy[k] = v end end
  return copy
end

describe("txn", function()
  local member, cli
  local start_member, stop_member = helper.member_and_client(function(m, c) member, cli = m, c end)
  setup(start_member)
  teardown(stop_member)

  describe("compares every target with every operator", function()
    local kv, lease_id
    setup(function()
      lease_id = member:etcdctl("lease grant 600"):match("lease (%x+) granted")
      lease_id = ("0"):rep(16 - #lease_id) .. lease_id
      assert(cli:put("/t/k", "m", { lease = lease_id }))
      assert(cli:put("/t/k", "m", { ignore_lease = true })) -- version 2
      kv = assert(cli:get("/t/k")).kvs[1]
    end)

    local function outcome(compare)
      local res = assert(cli:txn():when(compare):commit())
      return res.succeeded
    end

    it("value", function()
      assert.is_true(outcome(cmp.value("/t/k"):eq("m")))
      assert.is_false(outcome(cmp.value("/t/k"):eq("x")))
      assert.is_true(outcome(cmp.value("/t/k"):ne("x")))
      assert.is_false(outcome(cmp.value("/t/k"):ne("m")))
      assert.is_true(outcome(cmp.value("/t/k"):lt("n")))
      assert.is_false(outcome(cmp.value("/t/k"):lt("a")))
      assert.is_true(outcome(cmp.value("/t/k"):gt("a")))
      assert.is_false(outcome(cmp.value("/t/k"):gt("z")))
    end)

    for _, case in ipairs {
      { "version", "version" }, { "create_revision", "create_revision" }, { "mod_revision", "mod_revision" },
    } do
      local target, field = case[1], case[2]
      it(target, function()
        local v = kv[field]
        assert.is_true(outcome(cmp[target]("/t/k"):eq(v)))
        assert.is_false(outcome(cmp[target]("/t/k"):eq(v + 1)))
        assert.is_true(outcome(cmp[target]("/t/k"):ne(v + 1)))
        assert.is_false(outcome(cmp[target]("/t/k"):ne(v)))
        assert.is_true(outcome(cmp[target]("/t/k"):lt(v + 1)))
        assert.is_false(outcome(cmp[target]("/t/k"):lt(v)))
        assert.is_true(outcome(cmp[target]("/t/k"):gt(v - 1)))
        assert.is_false(outcome(cmp[target]("/t/k"):gt(v)))
      end)
    end

    it("lease, with hex IDs", function()
      assert.are.equal(lease_id, kv.lease)
      assert.is_true(outcome(cmp.lease("/t/k"):eq(lease_id)))
      assert.is_false(outcome(cmp.lease("/t/k"):eq("1")))
      assert.is_true(outcome(cmp.lease("/t/k"):ne("1")))
      assert.is_false(outcome(cmp.lease("/t/k"):ne(lease_id)))
      assert.is_true(outcome(cmp.lease("/t/k"):gt("1")))
      assert.is_false(outcome(cmp.lease("/t/k"):lt("1")))
      if math.type then -- integers on 5.3+
        assert.is_true(outcome(cmp.lease("/t/k"):gt(1)))
      end
    end)

    it("in clientv3's form", function()
      assert.is_true(outcome(etcd3.compare("value", "/t/k", "=", "m")))
      assert.is_true(outcome(etcd3.compare("value", "/t/k", "!=", "x")))
      assert.is_true(outcome(etcd3.compare("version", "/t/k", "<", 3)))
      assert.is_true(outcome(etcd3.compare("mod", "/t/k", ">", 0)))
      assert.is_false(outcome(etcd3.compare("create_revision", "/t/k", ">", kv.create_revision)))
      assert.is_true(outcome(etcd3.compare("lease", "/t/k", "=", lease_id)))
    end)

    it("over a prefix or a range", function()
      assert(cli:put("/t/r/a", "1"))
      assert(cli:put("/t/r/b", "1"))
      assert.is_true(outcome(cmp.value("/t/r/", { prefix = true }):eq("1")))
      assert(cli:put("/t/r/c", "2"))
      assert.is_false(outcome(cmp.value("/t/r/", { prefix = true }):eq("1")))
      assert.is_true(outcome(cmp.value("/t/r/a", { range_end = "/t/r/c" }):eq("1")))
      assert.is_true(outcome(cmp.version("/t/r/", { prefix = true }):gt(0)))
    end)
  end)

  it("runs the seed example both ways", function()
    local function seed()
      return assert(cli:txn()
        :when(cmp.value("/hi"):eq("hello"))
        :success(op.get("/hi"))
        :failure(op.get("/test/", { prefix = true }))
        :commit())
    end
    assert(cli:put("/test/a", "A"))
    assert(cli:put("/test/b", "B"))
    assert(cli:put("/hi", "bye"))
    local res = seed()
    assert.is_false(res.succeeded)
    assert.are.equal(1, #res.responses)
    assert.are.equal("range", res.responses[1].type)
    assert.are.same({ "A", "B" }, { res.responses[1].kvs[1].value, res.responses[1].kvs[2].value })
    assert(cli:put("/hi", "hello"))
    res = seed()
    assert.is_true(res.succeeded)
    assert.are.equal("hello", res.responses[1].kvs[1].value)
  end)

  it("shapes every response like the plain call, field by field", function()
    assert(cli:put("/s/a", "1"))
    local res = assert(cli:txn():success(
      op.get("/s/", { prefix = true }),
      op.put("/s/b", "2", { prev_kv = true }),
      op.delete("/s/a", { prev_kv = true })):commit())
    assert.is_true(res.succeeded)
    assert.is_number(res.header.revision)
    local range, put, del = res.responses[1], res.responses[2], res.responses[3]
    assert.are.same({ "range", "put", "delete" }, { range.type, put.type, del.type })
    assert.is_table(range.header)
    -- the same state read plainly
    assert(cli:put("/s/a", "1"))
    local plain_get = assert(cli:get("/s/a"))
    assert.are.same(without_header(plain_get).kvs[1].key, range.kvs[1].key)
    assert.are.same({ key = "/s/a", value = "1", create_revision = range.kvs[1].create_revision,
      mod_revision = range.kvs[1].mod_revision, version = 1 }, range.kvs[1])
    assert.is_false(range.more)
    assert.are.equal(1, range.count)
    local plain_put = assert(cli:put("/s/b", "3", { prev_kv = true }))
    assert.is_nil(put.prev_kv) -- /s/b did not exist before the txn
    assert.are.same(without_header(plain_put).prev_kv.key, "/s/b")
    local plain_del = assert(cli:delete("/s/a", { prev_kv = true }))
    assert.are.same(without_header(plain_del).deleted, del.deleted)
    assert.are.same(plain_del.prev_kvs[1].key, del.prev_kvs[1].key)
    assert.are.same(plain_del.prev_kvs[1].value, del.prev_kvs[1].value)
    -- every field of the plain results appears in the txn's, with the same type
    for _, pair in ipairs { { plain_get, range }, { plain_put, put }, { plain_del, del } } do
      for k, v in pairs(pair[1]) do
        if k ~= "prev_kv" then assert.are.equal(type(v), type(pair[2][k]), k) end
      end
    end
  end)

  it("nests transactions two levels deep", function()
    assert(cli:put("/n/flag", "on"))
    local inner = cli:txn():when(cmp.value("/n/flag"):eq("on")):success(op.put("/n/inner", "yes"))
    local middle = cli:txn():when(cmp.version("/n/flag"):gt(0))
      :success(op.txn(inner), op.get("/n/flag"))
    local res = assert(cli:txn():success(op.txn(middle)):commit())
    assert.is_true(res.succeeded)
    local m = res.responses[1]
    assert.are.equal("txn", m.type)
    assert.is_true(m.succeeded)
    assert.are.equal("txn", m.responses[1].type)
    assert.is_true(m.responses[1].succeeded)
    assert.are.equal("put", m.responses[1].responses[1].type)
    assert.are.equal("range", m.responses[2].type)
    assert.are.equal("on", m.responses[2].kvs[1].value)
    assert.are.equal("yes", assert(cli:get("/n/inner")).kvs[1].value)
  end)

  it("accepts the table form and the clientv3 names", function()
    local res = assert(cli:txn {
      compare = { cmp.value("/n/flag"):eq("on") },
      success = { op.put("/tf", "ok") },
      failure = { op.put("/tf", "no") },
    })
    assert.is_true(res.succeeded)
    assert.are.equal("ok", assert(cli:get("/tf")).kvs[1].value)
    res = assert(cli:txn():If(cmp.value("/tf"):eq("nope")):Then(op.put("/tf", "x")):Else(op.delete("/tf")):commit())
    assert.is_false(res.succeeded)
    assert.are.equal(1, res.responses[1].deleted)
  end)

  it("appends on repeated calls, and commits again the same transaction", function()
    assert(cli:put("/ctr", "0"))
    local t = cli:txn():when(cmp.version("/ctr"):gt(0)):when(cmp.value("/ctr"):eq("0"))
      :success(op.put("/rep/a", "1")):success(op.put("/rep/b", "1"))
    local first = assert(t:commit())
    assert.is_true(first.succeeded)
    assert.are.equal(2, #first.responses)
    local second = assert(t:commit())
    assert.is_true(second.succeeded)
    assert.are.equal(first.header.revision + 1, second.header.revision)
  end)

  it("keeps a compare-and-swap counter exact across two processes (lua5.4 and luajit)", function()
    assert(cli:put("/cas/counter", "0"))
    local script = [[
      local etcd3 = require "etcd3"
      local cmp, op = etcd3.compare, etcd3.op
      local cli = assert(etcd3.new { endpoints = "]] .. member.endpoint .. [[" })
      for _ = 1, 200 do
        repeat
          local kv = assert(cli:get("/cas/counter")).kvs[1]
          local res = assert(cli:txn()
            :when(cmp.mod_revision("/cas/counter"):eq(kv.mod_revision))
            :success(op.put("/cas/counter", tostring(tonumber(kv.value) + 1)))
            :commit())
        until res.succeeded
      end
      cli:close()
    ]]
    local function command(interp)
      return ("LUA_PATH='lua/?.lua;lua/?/init.lua' LUA_CPATH='build/%s/?.so' %s -e %q"):format(interp, interp, script)
    end
    local ok = helper.sh("(" .. command("lua5.4") .. " & " .. command("luajit") ..
      " & wait %1 && wait %2) 2>&1")
    assert.is_true(ok)
    assert.are.equal("400", assert(cli:get("/cas/counter")).kvs[1].value)
  end)

  describe("refuses bad input before sending anything", function()
    local cases = {
      { "a non-compare in when", function() cli:txn():when({}) end, "txn:when: argument #1 is not a compare" },
      { "an op in when", function() cli:txn():when(op.get("/a")) end, "is not a compare" },
      { "a compare in success", function() cli:txn():success(cmp.value("/a"):eq("x")) end, "is not an op" },
      { "a non-op in failure", function() cli:txn():failure("get /a") end, "txn:failure: argument #1 is not an op" },
      { "an unknown target", function() etcd3.compare("size", "/a", "=", 1) end, "unknown target \"size\"" },
      { "an unknown operator", function() etcd3.compare("value", "/a", "<>", "x") end, "unknown operator \"<>\"" },
      { "a string for version", function() cmp.version("/a"):eq("1") end, "integer expected, got string" },
      { "a number for value", function() cmp.value("/a"):eq(1) end, "string expected, got 1" },
      { "a bad lease ID", function() cmp.lease("/a"):eq("not-hex") end, "ID %(hex string or integer%) expected" },
      { "a key that is not a string", function() cmp.value(5) end, "bad argument #1 to 'etcd3.compare.value'" },
      { "an unknown compare option", function() cmp.value("/a", { prefixx = true }) end, "unknown option 'prefixx'" },
      { "an unknown op option", function() op.get("/a", { foo = 1 }) end, "etcd3.op.get: unknown option 'foo'" },
      { "a timeout on an op", function() op.put("/a", "v", { timeout = 1 }) end, "belongs to commit" },
      { "a bad put value", function() op.put("/a", 5) end, "bad argument #2 to 'etcd3.op.put'" },
      { "a non-builder to op.txn", function() op.txn({}) end, "bad argument #1 to 'etcd3.op.txn'" },
      { "an unknown table-form field", function() cli:txn { when = {} } end, "etcd3.txn: unknown option 'when'" },
      { "a non-op in the table form", function() cli:txn { success = { 1 } } end, "is not an op" },
    }
    for _, case in ipairs(cases) do
      it(case[1], function()
        local before = assert(cli:get("/")).header.revision
        local ok, msg = pcall(case[2])
        assert.is_false(ok)
        assert.matches(case[3], msg)
        assert.are.equal(before, assert(cli:get("/")).header.revision)
      end)
    end
  end)

  describe("returns etcd's refusals as error objects", function()
    it("more than 128 ops", function()
      local ops = {}
      for i = 1, 129 do ops[i] = op.put("/many/" .. i, "v") end
      local res, err = cli:txn { success = ops }
      assert.is_nil(res)
      assert.are.equal("INVALID_ARGUMENT", err.code)
      assert.are.equal("etcdserver: too many operations in txn request", err.message)
      assert.are.equal("KV.Txn", err.rpc)
      ops[129] = nil
      assert.is_true(assert(cli:txn { success = ops }).succeeded)
    end)

    it("the same key put twice", function()
      local res, err = cli:txn():success(op.put("/dup", "1"), op.put("/dup", "2")):commit()
      assert.is_nil(res)
      assert.are.equal("INVALID_ARGUMENT", err.code)
      assert.are.equal("etcdserver: duplicate key given in txn request", err.message)
    end)
  end)
end)
