-- KV: get, put, delete, compact, pages, prefix_end, with exact results.
-- Each describe block starts its own member, so revisions are known: a new
-- etcd is at revision 1 and every write adds one.
local etcd3 = require "etcd3"
local helper = require "spec.helpers.etcd"

local function keys(res)
  local out = {}
  for i, kv in ipairs(res.kvs) do out[i] = kv.key end
  return out
end

describe("prefix_end", function()
  it("covers a prefix", function()
    assert.are.equal("/app0", etcd3.prefix_end("/app/"))
    assert.are.equal("b", etcd3.prefix_end("a"))
    assert.are.equal("a\1", etcd3.prefix_end("a\0"))
  end)
  it("is correct for keys ending in \\255", function()
    assert.are.equal("b", etcd3.prefix_end("a\255"))
    assert.are.equal("b", etcd3.prefix_end("a\255\255"))
    assert.are.equal("\0", etcd3.prefix_end("\255\255"))
    assert.are.equal("\0", etcd3.prefix_end(""))
  end)
end)

describe("kv", function()
  local member, cli, cluster_id, member_id
  local start_member, stop_member = helper.member_and_client(function(m, c) member, cli = m, c end)
  setup(start_member)
  teardown(stop_member)

  it("puts and gets with exact result shapes", function()
    local put = assert(cli:put("/a", "1"))
    assert.are.equal(2, put.header.revision)
    assert.is_string(put.header.cluster_id)
    assert.matches("^%x+$", put.header.cluster_id)
    assert.matches("^[1-9a-f]%x*$", put.header.member_id) -- etcdctl's %x
    assert.is_number(put.header.raft_term)
    assert.is_nil(put.prev_kv)
    cluster_id, member_id = put.header.cluster_id, put.header.member_id

    local res = assert(cli:get("/a"))
    assert.are.same({
      header = { cluster_id = cluster_id, member_id = member_id, revision = 2,
                 raft_term = put.header.raft_term },
      kvs = { { key = "/a", value = "1", create_revision = 2, mod_revision = 2, version = 1 } },
      more = false, count = 1,
    }, res)

    local missing = assert(cli:get("/nope"))
    assert.are.same({}, missing.kvs)
    assert.are.equal(0, missing.count)
    assert.is_false(missing.more)
  end)

  it("agrees with etcdctl on cluster and member IDs", function()
    local out = member:etcdctl("endpoint status -w json")
    local mid = out:match('"member_id":(%d+)')
    local cid = out:match('"cluster_id":(%d+)')
    -- etcdctl prints decimal: compare digit strings of the same numbers
    local function dec(hex)
      local digits = { 0 } -- little-endian base 10
      for c in hex:gmatch(".") do
        local carry = tonumber(c, 16)
        for i = 1, #digits do
          local v = digits[i] * 16 + carry
          digits[i], carry = v % 10, math.floor(v / 10)
        end
        while carry > 0 do digits[#digits + 1], carry = carry % 10, math.floor(carry / 10) end
      end
      return table.concat(digits):reverse()
    end
    assert.are.equal(mid, dec(member_id))
    assert.are.equal(cid, dec(cluster_id))
  end)

  it("put options: prev_kv, ignore_value, lease, ignore_lease", function()
    local prev = assert(cli:put("/a", "2", { prev_kv = true }))
    assert.are.equal(3, prev.header.revision)
    assert.are.same({ key = "/a", value = "1", create_revision = 2, mod_revision = 2, version = 1 }, prev.prev_kv)

    assert(cli:put("/a", nil, { ignore_value = true }))
    local res = assert(cli:get("/a"))
    assert.are.same({ key = "/a", value = "2", create_revision = 2, mod_revision = 4, version = 3 }, res.kvs[1])

    local lease_id = member:etcdctl("lease grant 600"):match("lease (%x+) granted")
    assert.is_string(lease_id)
    assert(cli:put("/leased", "x", { lease = lease_id }))
    local kv = assert(cli:get("/leased")).kvs[1]
    assert.are.equal((("0"):rep(16 - #lease_id) .. lease_id:lower()), kv.lease)
    assert(cli:put("/leased", "y", { ignore_lease = true }))
    kv = assert(cli:get("/leased")).kvs[1]
    assert.are.equal("y", kv.value)
    assert.are.equal((("0"):rep(16 - #lease_id) .. lease_id:lower()), kv.lease)
    assert(cli:put("/leased", "z"))
    assert.is_nil(assert(cli:get("/leased")).kvs[1].lease)

    local res2, err = cli:put("/leased", "w", { lease = "abcdef" })
    assert.is_nil(res2)
    assert.are.equal("NOT_FOUND", err.code)
    assert.are.equal("etcdserver: requested lease not found", err.message)

    local res3, err3 = cli:put("/never", nil, { ignore_value = true })
    assert.is_nil(res3)
    assert.are.equal("etcdserver: key not found", err3.message)
    assert(cli:delete("/leased"))
  end)

  describe("get options", function()
    local base
    setup(function()
      assert(cli:delete("/r/", { prefix = true }))
      for _, kv in ipairs { { "/r/c", "3" }, { "/r/a", "1" }, { "/r/b", "22" }, { "/r/d", "0" } } do
        base = assert(cli:put(kv[1], kv[2])).header.revision
      end
      assert(cli:put("/r/b", "2")) -- /r/b: version 2, newest mod_revision
      base = base - 3 -- revision of /r/c's put
    end)

    it("prefix, range_end, from_key", function()
      assert.are.same({ "/r/a", "/r/b", "/r/c", "/r/d" }, keys(assert(cli:get("/r/", { prefix = true }))))
      assert.are.same({ "/r/b", "/r/c" }, keys(assert(cli:get("/r/b", { range_end = "/r/d" }))))
      assert.are.same({ "/r/c", "/r/d" }, keys(assert(cli:get("/r/c", { from_key = true }))))
    end)

    it("limit, more, count", function()
      local res = assert(cli:get("/r/", { prefix = true, limit = 2 }))
      assert.are.same({ "/r/a", "/r/b" }, keys(res))
      assert.is_true(res.more)
      assert.are.equal(4, res.count)
    end)

    it("revision", function()
      local res = assert(cli:get("/r/", { prefix = true, revision = base }))
      assert.are.same({ "/r/c" }, keys(res))
      local old = assert(cli:get("/r/b", { revision = base + 2 }))
      assert.are.equal("22", old.kvs[1].value)
    end)

    it("sort_order and sort_target", function()
      local function sorted(target, order)
        return keys(assert(cli:get("/r/", { prefix = true, sort_target = target, sort_order = order })))
      end
      assert.are.same({ "/r/d", "/r/c", "/r/b", "/r/a" }, sorted("key", "descend"))
      assert.are.same({ "/r/a", "/r/b", "/r/c", "/r/d" }, sorted("key", "ascend"))
      assert.are.same({ "/r/d", "/r/a", "/r/b", "/r/c" }, sorted("value", "ascend"))
      assert.are.same({ "/r/c", "/r/a", "/r/b", "/r/d" }, sorted("create", "ascend"))
      assert.are.same({ "/r/c", "/r/a", "/r/d", "/r/b" }, sorted("mod", "ascend"))
      assert.are.same("/r/b", sorted("version", "descend")[1])
      assert.are.same({ "/r/a", "/r/b", "/r/c", "/r/d" }, sorted("key", "none"))
    end)

    it("serializable, keys_only, count_only", function()
      assert.are.same({ "/r/a", "/r/b", "/r/c", "/r/d" }, keys(assert(cli:get("/r/", { prefix = true, serializable = true }))))
      local ko = assert(cli:get("/r/a", { keys_only = true }))
      assert.are.equal("/r/a", ko.kvs[1].key)
      assert.are.equal("", ko.kvs[1].value)
      local co = assert(cli:get("/r/", { prefix = true, count_only = true }))
      assert.are.same({}, co.kvs)
      assert.are.equal(4, co.count)
    end)

    it("min/max mod and create revisions", function()
      local function with(k, v) local o = { prefix = true }; o[k] = v; return keys(assert(cli:get("/r/", o))) end
      assert.are.same({ "/r/b" }, with("min_mod_revision", base + 4))
      assert.are.same({ "/r/a", "/r/c", "/r/d" }, with("max_mod_revision", base + 3))
      assert.are.same({ "/r/b", "/r/d" }, with("min_create_revision", base + 2))
      assert.are.same({ "/r/a", "/r/c" }, with("max_create_revision", base + 1))
    end)
  end)

  it("delete with prefix, range_end, from_key and prev_kv", function()
    for _, k in ipairs { "/d/a", "/d/b", "/d/c", "/d/d", "/e/a" } do assert(cli:put(k, k .. "!")) end
    local one = assert(cli:delete("/d/a", { prev_kv = true }))
    assert.are.equal(1, one.deleted)
    assert.are.equal("/d/a!", one.prev_kvs[1].value)
    local ranged = assert(cli:delete("/d/b", { range_end = "/d/c" }))
    assert.are.equal(1, ranged.deleted)
    assert.are.same({}, ranged.prev_kvs)
    local pre = assert(cli:delete("/d/", { prefix = true, prev_kv = true }))
    assert.are.equal(2, pre.deleted)
    assert.are.same({ "/d/c", "/d/d" }, { pre.prev_kvs[1].key, pre.prev_kvs[2].key })
    local none = assert(cli:delete("/d/zz"))
    assert.are.equal(0, none.deleted)
    local from = assert(cli:delete("/e/", { from_key = true }))
    assert.is_true(from.deleted >= 1)
    assert.are.equal(0, assert(cli:get("/e/a")).count)
  end)

  it("keeps keys and values with \\0 and \\255 exact, and etcdctl agrees", function()
    local key, value = "/bin/\0k\255\0", "\255\0v\0\255"
    assert(cli:put(key, value))
    local res = assert(cli:get("/bin/", { prefix = true }))
    assert.are.equal(key, res.kvs[1].key)
    assert.are.equal(value, res.kvs[1].value)
    local json = member:etcdctl("get /bin/ --prefix -w json")
    assert.are.equal(key, helper.unbase64(json:match('"key":"([^"]*)"')))
    assert.are.equal(value, helper.unbase64(json:match('"value":"([^"]*)"')))
    assert.are.same({ key }, keys(assert(cli:get("/bin/\0", { prefix = true }))))
    assert(cli:put("\255\255", "top"))
    assert.are.equal("top", assert(cli:get("\255", { prefix = true })).kvs[1].value)
  end)

  it("interoperates with etcdctl both ways", function()
    assert(cli:put("/interop/from-lua", "hello from lua"))
    assert.are.equal("/interop/from-lua\nhello from lua\n", member:etcdctl("get /interop/from-lua"))
    member:etcdctl("put /interop/from-etcdctl 'hello from etcdctl'")
    assert.are.equal("hello from etcdctl", assert(cli:get("/interop/from-etcdctl")).kvs[1].value)
    member:etcdctl("del /interop/from-lua")
    assert.are.equal(0, assert(cli:get("/interop/from-lua")).count)
  end)

  it("pages through a range at one pinned revision", function()
    for i = 1, 25 do assert(cli:put(("/p/%02d"):format(i), tostring(i))) end
    local seen, pages = {}, 0
    local first = true
    for page in cli:pages("/p/", { prefix = true, page_size = 10 }) do
      assert.is_table(page)
      pages = pages + 1
      if first then
        first = false
        -- written after the first page: must not show up in later pages
        assert(cli:put("/p/99", "late"))
        assert(cli:put("/p/25", "changed"))
      end
      for _, kv in ipairs(page) do seen[#seen + 1] = kv.key .. "=" .. kv.value end
    end
    assert.are.equal(3, pages)
    assert.are.equal(25, #seen)
    assert.are.equal("/p/01=1", seen[1])
    assert.are.equal("/p/25=25", seen[25])
    local n = 0
    for page in cli:pages("/p/01") do n = n + #page end
    assert.are.equal(1, n)
    for page in cli:pages("/nothing/", { prefix = true }) do error("no page expected, got " .. #page) end
  end)

  it("pages yields false, err once on failure", function()
    local results = {}
    for page, err in cli:pages("/p/", { prefix = true, revision = 10 ^ 7 }) do
      results[#results + 1] = { page, err }
    end
    assert.are.equal(1, #results)
    assert.is_false(results[1][1])
    assert.are.equal("OUT_OF_RANGE", results[1][2].code)
  end)

  it("compacts, and compacted revisions give etcd's error", function()
    local rev = assert(cli:put("/c", "1")).header.revision
    assert(cli:put("/c", "2"))
    local res = assert(cli:compact(rev, { physical = true }))
    assert.is_number(res.header.revision)
    local old, err = cli:get("/c", { revision = rev - 1 })
    assert.is_nil(old)
    assert.are.equal("OUT_OF_RANGE", err.code)
    assert.are.equal("etcdserver: mvcc: required revision has been compacted", err.message)
    assert.are.equal("1", assert(cli:get("/c", { revision = rev })).kvs[1].value)
    local _, again = cli:compact(rev)
    assert.are.equal("etcdserver: mvcc: required revision has been compacted", again.message)
  end)

  it("refuses a 3 MiB put with a clear error", function()
    local res, err = cli:put("/big", ("x"):rep(3 * 1024 * 1024))
    assert.is_nil(res)
    assert.is_true(etcd3.is_error(err))
    assert.are.equal("RESOURCE_EXHAUSTED", err.code)
    assert.matches("larger than max", err.message)
    assert.are.equal("KV.Put", err.rpc)
  end)

  it("reads a 6 MiB range with the default max_recv_bytes", function()
    local chunk = ("v"):rep(1024 * 1024)
    for i = 1, 6 do assert(cli:put("/huge/" .. i, chunk)) end
    local res = assert(cli:get("/huge/", { prefix = true }))
    local total = 0
    for _, kv in ipairs(res.kvs) do total = total + #kv.value end
    assert.are.equal(6 * 1024 * 1024, total)
    local small = assert(etcd3.new { endpoints = member.endpoint, max_recv_bytes = 1024 * 1024 })
    local r2, err = small:get("/huge/", { prefix = true })
    assert.is_nil(r2)
    assert.are.equal("RESOURCE_EXHAUSTED", err.code)
    small:close()
    assert(cli:delete("/huge/", { prefix = true }))
  end)

  it("accepts a per-call timeout", function()
    assert(cli:get("/a", { timeout = 2.5 }))
    assert(cli:put("/a", "t", { timeout = 0.5 }))
  end)
end)
