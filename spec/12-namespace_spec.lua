-- Namespaces: keys gain the prefix on the way out and lose it on the way
-- in, everywhere; no range or prefix escapes.
local etcd3 = require "etcd3"
local helper = require "spec.helpers.etcd"

local function keys(list)
  local out = {}
  for i, kv in ipairs(list) do out[i] = kv.key end
  return out
end

describe("namespace", function()
  local member, plain, ns

  setup(function()
    member = helper.single()
    plain = assert(etcd3.new { endpoints = member.endpoint })
    ns = assert(etcd3.new { endpoints = member.endpoint, namespace = "/ns/" })
    -- neighbours on both sides of the namespace
    assert(plain:put("/ns", "outside"))
    assert(plain:put("/ns0", "outside"))
    assert(plain:put("/nr", "outside"))
    assert(plain:put("/a", "outside"))
  end)
  teardown(function()
    if ns then ns:close() end
    if plain then plain:close() end
    if member then member:stop() end
  end)

  it("isolates KV", function()
    assert(ns:put("a", "1"))
    assert(ns:put("b/c", "2"))
    assert.are.equal("1", assert(plain:get("/ns/a")).kvs[1].value)
    local res = assert(ns:get("a", { prefix = false }))
    assert.are.same({ "a" }, keys(res.kvs))
    -- an empty-key prefix get returns only what is inside the namespace
    assert.are.same({ "a", "b/c" }, keys(assert(ns:get("", { prefix = true })).kvs))
    assert.are.same({ "a", "b/c" }, keys(assert(ns:get("", { from_key = true })).kvs))
    assert.are.equal(2, assert(ns:get("", { prefix = true, count_only = true })).count)
    local put = assert(ns:put("a", "1b", { prev_kv = true }))
    assert.are.equal("a", put.prev_kv.key)
    local del = assert(ns:delete("", { prefix = true, prev_kv = true }))
    assert.are.equal(2, del.deleted)
    assert.are.same({ "a", "b/c" }, keys(del.prev_kvs))
    assert.are.equal("outside", assert(plain:get("/ns")).kvs[1].value)
    assert.are.equal(4, assert(plain:get("", { from_key = true, count_only = true })).count)
  end)

  it("isolates txn compares, ops and responses", function()
    local cmp, op = etcd3.compare, etcd3.op
    assert(ns:put("t", "v"))
    local t = ns:txn():when(cmp.value("t"):eq("v"), cmp.version("", { prefix = true }):gt(0))
      :success(op.get("", { prefix = true }), op.put("u", "w", { prev_kv = true }),
        op.txn(ns:txn():success(op.delete("t", { prev_kv = true }))))
    local res = assert(t:commit())
    assert.is_true(res.succeeded)
    assert.are.same({ "t" }, keys(res.responses[1].kvs))
    assert.are.equal("txn", res.responses[3].type)
    assert.are.equal("t", res.responses[3].responses[1].prev_kvs[1].key)
    assert.are.equal("w", assert(plain:get("/ns/u")).kvs[1].value)
    -- committed again: the same (prefixed once) transaction
    assert(ns:put("t", "v"))
    assert.is_true(assert(t:commit()).succeeded)
    assert.are.equal(0, assert(plain:get("/ns//ns/t")).count)
    -- a compare outside the namespace is not reachable by name
    assert.is_false(assert(ns:txn():when(cmp.value("/a"):eq("outside")):commit()).succeeded)
  end)

  it("isolates watch events", function()
    local w = assert(ns:watch("", { prefix = true, prev_kv = true }))
    assert(plain:put("/nr", "outside again"))
    assert(plain:put("/ns0", "outside again"))
    assert(ns:put("w", "1"))
    assert(ns:put("w", "2"))
    local e1, e2 = assert(w:next(5)), assert(w:next(5))
    assert.are.equal("w", e1.kv.key)
    assert.are.equal("w", e2.kv.key)
    assert.are.equal("w", e2.prev_kv.key)
    assert.are.equal("TIMEOUT", select(2, w:next(0.3)).code)
    w:cancel()
  end)

  it("isolates pages", function()
    for i = 1, 12 do assert(ns:put(("p/%02d"):format(i), "x")) end
    local seen = {}
    for page in ns:pages("p/", { prefix = true, page_size = 5 }) do
      for _, kv in ipairs(page) do seen[#seen + 1] = kv.key end
    end
    assert.are.equal(12, #seen)
    assert.are.equal("p/01", seen[1])
    assert.are.equal("p/12", seen[12])
    local all = 0
    for page in ns:pages("", { from_key = true }) do
      for _, kv in ipairs(page) do
        assert.is_nil(kv.key:find("^/"), kv.key)
        all = all + 1
      end
    end
    assert.is_true(all >= 12)
  end)

  it("strips the prefix from lease time_to_live keys", function()
    local lease = assert(ns:grant(60))
    assert(ns:put("leased", "x", { lease = lease.id }))
    assert.are.same({ "leased" }, assert(lease:time_to_live { keys = true }).keys)
    assert(lease:revoke())
  end)
end)
