-- Regressions for what the codec's fuzz targets found. Messages nest at
-- most 100 deep, both ways: a transaction nested tens of thousands deep
-- overflowed the C stack while being encoded, and so did a reply nested
-- that deep (a TxnResponse holds ResponseOps that hold TxnResponses) while
-- being decoded. Request tables are read raw.
local etcd3 = require "etcd3"
local helper = require "spec.helpers.etcd"
local peer = require "spec.helpers.peer"
local op = etcd3.op

describe("nesting", function()
  local cli
  local start_member, stop_member = helper.member_and_client(function(_, c) cli = c end)
  setup(start_member)
  teardown(stop_member)

  -- A put inside `levels` transactions nested as ops of one another:
  -- TxnRequest > RequestOp > ... > PutRequest is 3 + 2 * levels messages.
  local function nested(levels, key)
    local t = cli:txn():success(op.put(key, "deep"))
    for _ = 1, levels do t = cli:txn():success(op.txn(t)) end
    return t
  end

  it("commits a transaction nested up to the limit, and reads its reply", function()
    local res = assert(nested(48, "/nest/k"):commit())
    assert.is_true(res.succeeded)
    local depth, r = 0, res
    while r.responses and r.responses[1] and r.responses[1].type == "txn" do
      depth, r = depth + 1, r.responses[1]
    end
    assert.are.equal(48, depth)
    assert.are.equal("put", r.responses[1].type)
    assert.are.equal("deep", assert(cli:get("/nest/k")).kvs[1].value)
  end)

  it("raises for a transaction nested past the limit, however deep", function()
    for _, levels in ipairs { 49, 20000 } do
      local ok, msg = pcall(function() return nested(levels, "/nest/k2"):commit() end)
      assert.is_false(ok)
      assert.matches("request nested too deeply", msg, 1, true)
    end
    assert.are.equal(0, assert(cli:get("/nest/k2")).count)
  end)

  it("reads request tables raw: what an __index makes up is not sent", function()
    -- (the encode fuzzer's find: the codec kept pointers into strings that
    -- only a metamethod had made, and a collection freed them under it)
    local fresh = setmetatable({ key = "/nest/raw" }, { __index = function(_, k) return "made up " .. k end })
    assert(cli:_request("put", "KV.Put", fresh))
    local kv = assert(cli:get("/nest/raw")).kvs[1]
    assert.are.equal("", kv.value)
  end)

  it("refuses a reply nested thousands deep from a peer: an error, not a crash", function()
    local p = peer.start("deep-txn")
    finally(function() p:stop() end)
    local lazy = assert(etcd3.new { endpoints = p.endpoint, dial_timeout = 0, timeout = 5 })
    local res, err = lazy:txn():success(op.get("/k")):commit()
    lazy:close()
    assert.is_nil(res)
    assert.are.equal("INTERNAL", err.code)
    assert.matches("could not be decoded", err.message)
  end)
end)
