-- Mirror: a paged snapshot at one revision, then a watch; the copy changes
-- only inside update(), equals the store at revision(), and survives
-- compaction (reporting the exact difference) and a killed member.
local etcd3 = require "etcd3"
local helper = require "spec.helpers.etcd"
local process = require "spec.helpers.process"
local proxy = require "spec.helpers.proxy"

local function raises(pattern, fn, ...)
  local ok, err = pcall(fn, ...)
  assert.is_false(ok)
  assert.matches(pattern, tostring(err))
end

--- The store under `prefix` at `revision` as etcdctl reads it:
-- { [key] = value }, count, and the keys in etcdctl's order.
local function etcdctl_view(member, prefix, revision)
  local out = member:etcdctl("get " .. prefix .. " --prefix --rev=" .. revision .. " -w json")
  local map, order = {}, {}
  local kvs = out:match('"kvs":%[(.-)%]')
  for obj in (kvs or ""):gmatch("{(.-)}") do
    local key = helper.unbase64(assert(obj:match('"key":"([^"]*)"'), out))
    map[key] = helper.unbase64(obj:match('"value":"([^"]*)"') or "")
    order[#order + 1] = key
  end
  return map, tonumber(out:match('"count":(%d+)') or "0"), order
end

--- The mirror's copy through its public reads.
local function copy_of(m)
  local map, order = {}, {}
  for k, v in m:pairs() do
    map[k] = v
    order[#order + 1] = k
    assert.are.equal(v, (m:get(k)))
  end
  return map, order
end

--- Applies `changes` to `shadow`, checking each against it: every change's
-- prev_value is the value before it (so none was lost), revisions strictly
-- increase (none repeated). Returns the last revision seen.
local function replay(shadow, changes, last)
  for _, c in ipairs(changes) do
    assert.are.equal(shadow[c.key], c.prev_value, "prev_value of " .. c.key)
    assert.is_true(c.kv.mod_revision > last, "revision order at " .. c.key)
    assert.are.equal(c.key, c.kv.key)
    last = c.kv.mod_revision
    if c.type == "PUT" then
      assert.are.equal(c.kv.value, c.value)
      shadow[c.key] = c.value
    else
      assert.are.equal("DELETE", c.type)
      assert.is_nil(c.value)
      shadow[c.key] = nil
    end
  end
  return last
end

local function writer_script(endpoints, prefix, n, rev_file)
  return [[
    local etcd3 = require "etcd3"
    local cli = assert(etcd3.new { endpoints = { "]] .. table.concat(endpoints, '", "') .. [[" } })
    math.randomseed(]] .. os.time() .. [[)
    local rev
    for i = 1, ]] .. n .. [[ do
      local key = "]] .. prefix .. [[" .. math.random(1, 60)
      local deadline = os.time() + 30
      local res
      repeat
        if math.random() < 0.3 then res = cli:delete(key) else res = cli:put(key, "v" .. i) end
        assert(res or os.time() < deadline, "op " .. i)
      until res
      rev = res.header.revision
    end
    local f = assert(io.open("]] .. rev_file .. [[", "w"))
    f:write(rev)
    f:close()
  ]]
end

local function read_number(path)
  local f = io.open(path)
  if not f then return nil end
  local n = tonumber(f:read("*a"))
  f:close()
  return n
end

--- Runs 1000 random puts and deletes in another process (talking to
-- `endpoints`) while `m` follows them, checking every change against a
-- shadow copy; `each(applied)` runs after each update with the number of
-- changes applied so far. Returns the writer's last revision and the shadow.
local function follow_writer(m, endpoints, prefix, each)
  local shadow, last, applied = copy_of(m), m:revision(), 0
  local rev_file = helper.capture("mktemp /tmp/etcd3-spec-rev.XXXXXX"):gsub("%s+$", "")
  os.remove(rev_file)
  local child = process.lua(writer_script(endpoints, prefix, 1000, rev_file))
  local final
  helper.wait_for(function()
    local changes = assert(m:update(0.2))
    last = replay(shadow, changes, last)
    applied = applied + #changes
    if each then each(applied) end
    final = final or read_number(rev_file)
    return final and m:revision() >= final
  end, 180, "the mirror to catch up with the writer")
  local out = child:read("*a")
  child:close()
  os.remove(rev_file)
  assert.matches("exit=0", out)
  assert.are.equal(final, m:revision())
  return final, shadow
end

describe("mirror", function()
  local member, cli
  local start_member, stop_member = helper.member_and_client(function(m, c) member, cli = m, c end)
  setup(start_member)
  teardown(stop_member)

  it("copies a prefix in pages at one revision; changes only inside update()", function()
    for i = 1, 50 do assert(cli:put(("/mir/k%03d"):format(i), "v" .. i)) end
    assert(cli:put("/mir0", "outside"))
    assert(cli:put("/mi", "outside"))
    local head = assert(cli:get("/", { prefix = true, count_only = true })).header.revision
    local m = assert(cli:mirror("/mir/", { page_size = 7 }))
    assert.are.equal(50, m:count())
    assert.are.equal(head, m:revision())
    local map, order = copy_of(m)
    local want, count, want_order = etcdctl_view(member, "/mir/", m:revision())
    assert.are.same(want, map)
    assert.are.same(want_order, order)
    assert.are.equal(count, m:count())
    local value, kv = m:get("/mir/k007")
    assert.are.equal("v7", value)
    assert.are.equal("/mir/k007", kv.key)
    assert.is_nil(m:get("/mir0"))
    assert.are.same({}, m:update(0))
    assert.are.same({}, m:update(0.3))

    assert(cli:put("/mir/new", "n"))
    assert(cli:delete("/mir/k001"))
    local last = assert(cli:put("/mir/k002", "changed")).header.revision
    assert(cli:put("/mir0", "outside again"))
    -- not applied yet
    assert.is_nil(m:get("/mir/new"))
    assert.are.equal("v1", (m:get("/mir/k001")))
    local changes = {}
    helper.wait_for(function()
      for _, c in ipairs(assert(m:update(1))) do changes[#changes + 1] = c end
      return #changes >= 3
    end, 10, "three changes")
    assert.are.equal(3, #changes)
    assert.are.same({ "PUT", "/mir/new", "n" }, { changes[1].type, changes[1].key, changes[1].value })
    assert.is_nil(changes[1].prev_value)
    assert.are.same({ "DELETE", "/mir/k001", "v1" }, { changes[2].type, changes[2].key, changes[2].prev_value })
    assert.are.same({ "PUT", "/mir/k002", "changed", "v2" },
      { changes[3].type, changes[3].key, changes[3].value, changes[3].prev_value })
    assert.are.equal(last, m:revision())
    assert.are.equal(50, m:count())
    assert.is_nil(m:get("/mir/k001"))
    map = copy_of(m)
    assert.are.same((etcdctl_view(member, "/mir/", m:revision())), map)
    m:close()
  end)

  it("follows a namespace", function()
    local ns = assert(etcd3.new { endpoints = member.endpoint, namespace = "/tenant/" })
    assert(cli:put("/tenant/a", "1"))
    assert(cli:put("/tenantx", "outside"))
    local m = assert(ns:mirror(""))
    assert.are.same({ a = "1" }, (copy_of(m)))
    assert(ns:put("b", "2"))
    local changes = assert(m:update(5))
    assert.are.equal("b", changes[1].key)
    assert.are.equal("b", changes[1].kv.key)
    assert.are.same({ a = "1", b = "2" }, (copy_of(m)))
    m:close()
    ns:close()
  end)

  it("equals etcdctl's view after 1000 random puts and deletes by another process", function()
    local m = assert(cli:mirror("/rand/"))
    local _, shadow = follow_writer(m, { member.endpoint }, "/rand/")
    local want, count, want_order = etcdctl_view(member, "/rand/", m:revision())
    local map, order = copy_of(m)
    assert.are.same(want, map)
    assert.are.same(want_order, order)
    assert.are.same(shadow, map)
    assert.are.equal(count, m:count())
    assert.are.same({}, m:update(0))
    m:close()
  end)

  it("raises on bad input and once closed", function()
    raises("bad argument #1 to 'etcd3%.mirror' %(string expected, got nil%)", cli.mirror, cli)
    raises("etcd3%.mirror: option 'page_size': integer expected", cli.mirror, cli, "/x/", { page_size = "7" })
    raises("etcd3%.mirror: unknown option 'pagesize'", cli.mirror, cli, "/x/", { pagesize = 7 })
    raises("etcd3%.mirror: option 'page_size' must be >= 1", cli.mirror, cli, "/x/", { page_size = 0 })
    raises("etcd3%.mirror: called without an object", cli.mirror)
    local m = assert(cli:mirror("/x/"))
    raises("bad argument #1 to 'etcd3%.mirror:update' %(number expected, got string%)", m.update, m, "1")
    raises("bad argument #1 to 'etcd3%.mirror:get' %(string expected, got 1%)", m.get, m, 1)
    raises("etcd3%.mirror:update: called without an object", m.update)
    raises("bad argument #1 to 'etcd3%.mirror:sync' %(number expected, got string%)", m.sync, m, "1")
    raises("etcd3%.mirror:sync: called without an object", m.sync)
    m:close()
    m:close() -- idempotent
    for _, name in ipairs { "update", "get", "pairs", "count", "revision", "sync" } do
      raises("etcd3%.mirror:" .. name .. ": the mirror is closed", m[name], m, "/x/a")
    end
  end)
end)

describe("mirror:sync", function()
  local member, cli, other
  local start_member, stop_member = helper.member_and_client(function(m, c) member, cli = m, c end)
  setup(function()
    start_member()
    other = assert(etcd3.new { endpoints = member.endpoint })
  end)
  teardown(function()
    if other then other:close() end
    stop_member()
  end)

  it("reads what another client wrote, without update(), which then reports it once", function()
    local m = assert(cli:mirror("/sy/"))
    local shadow, last = copy_of(m), m:revision()
    for i = 1, 40 do
      local rev = assert(other:put("/sy/k", "v" .. i)).header.revision
      if i % 2 == 0 then assert(other:put("/sy-outside/" .. i, "x")) end -- the store moves on outside the copy
      local at = assert(m:sync(5))
      assert.is_true(at >= rev, ("sync at %d, the put at %d"):format(at, rev))
      assert.are.equal(at, m:revision())
      assert.are.equal("v" .. i, (m:get("/sy/k")))
      if i % 10 == 0 then -- what sync applied comes out of update(), once
        last = replay(shadow, assert(m:update(0)), last)
        assert.are.same(shadow, (copy_of(m)))
      end
    end
    assert.are.same({}, m:update(0))
    assert.are.same({ ["/sy/k"] = "v40" }, shadow)
    -- a change after a sync that moved the revision past the copy's own
    -- still arrives
    local rev = assert(other:put("/sy/k2", "after")).header.revision
    local changes = assert(m:update(5))
    assert.are.equal(1, #changes)
    assert.are.equal(rev, changes[1].kv.mod_revision)
    assert.are.equal("after", (m:get("/sy/k2")))
    m:close()
  end)

  it("stays linearizable and exact while another process writes inside and outside the prefix", function()
    local m = assert(cli:mirror("/syw/"))
    local shadow, last = copy_of(m), m:revision()
    local rev_file = helper.capture("mktemp /tmp/etcd3-spec-rev.XXXXXX"):gsub("%s+$", "")
    os.remove(rev_file)
    local child = process.lua(writer_script({ member.endpoint }, "/syw/", 1000, rev_file))
    local i, final = 0, nil
    helper.wait_for(function()
      i = i + 1
      local rev = assert(other:put("/syw/marker", tostring(i))).header.revision
      assert(other:put("/syw-outside", tostring(i)))
      local at = assert(m:sync(10))
      assert.is_true(at >= rev)
      assert.are.equal(tostring(i), (m:get("/syw/marker")))
      if i % 5 == 0 then last = replay(shadow, assert(m:update(0)), last) end
      final = final or read_number(rev_file)
      return final and m:revision() >= final
    end, 180, "the writer to finish")
    local out = child:read("*a")
    child:close()
    os.remove(rev_file)
    assert.matches("exit=0", out)
    local at = assert(m:sync(10))
    last = replay(shadow, assert(m:update(0)), last)
    local want, count = etcdctl_view(member, "/syw/", at)
    assert.are.same(want, (copy_of(m)))
    assert.are.same(want, shadow)
    assert.are.equal(count, m:count())
    io.stderr:write(("\n[mirror] %d syncs during 1000 random writes: each read its marker\n"):format(i))
    m:close()
  end)

  it("syncs a mirror of the whole keyspace", function()
    local m = assert(cli:mirror(""))
    local rev = assert(other:put("/sy-all/k", "1")).header.revision
    assert.is_true(assert(m:sync(5)) >= rev)
    assert.are.equal("1", (m:get("/sy-all/k")))
    m:close()
  end)

  it("returns DEADLINE_EXCEEDED past its timeout, and works after", function()
    local m = assert(cli:mirror("/syd/"))
    local res, err = m:sync(1e-6)
    assert.is_nil(res)
    assert.are.equal("DEADLINE_EXCEEDED", err.code)
    assert(other:put("/syd/a", "1"))
    assert(m:sync(5))
    assert.are.equal("1", (m:get("/syd/a")))
    m:close()
  end)
end)

describe("mirror behind a compaction", function()
  local member, cli, px
  setup(function()
    member = helper.single()
    cli = assert(etcd3.new { endpoints = member.endpoint })
    px = proxy.start(member.endpoint)
  end)
  teardown(function()
    if px then px:stop() end
    if cli then cli:close() end
    if member then member:stop() end
  end)

  it("re-reads a snapshot and reports exactly the difference", function()
    for k, v in pairs { a = "1", b = "2", c = "3", g = "7" } do assert(cli:put("/cmp/" .. k, v)) end
    -- the mirror's client goes through the proxy, which is then cut
    local far = assert(etcd3.new { endpoints = px.endpoint })
    local m = assert(far:mirror("/cmp/"))
    assert.are.same({}, m:update(0))
    px:stop()
    -- meanwhile: a deleted, b and g rewritten with the same value, c
    -- untouched, d created and deleted, e created, f created and changed
    assert(cli:delete("/cmp/a"))
    local rev_b = assert(cli:put("/cmp/b", "2")).header.revision
    assert(cli:put("/cmp/d", "4"))
    assert(cli:delete("/cmp/d"))
    local rev_e = assert(cli:put("/cmp/e", "5")).header.revision
    assert(cli:put("/cmp/f", "6"))
    local rev_f = assert(cli:put("/cmp/f", "6b")).header.revision
    local rev_g = assert(cli:put("/cmp/g", "7")).header.revision
    assert(cli:put("/elsewhere", "x"))
    local now_rev = assert(cli:get("/cmp/a")).header.revision
    assert(cli:compact(now_rev, { physical = true }))
    assert.are.equal("1", (m:get("/cmp/a"))) -- the copy has not moved
    px:start()
    local changes
    helper.wait_for(function()
      local c = m:update(1)
      if c and #c > 0 then changes = c end
      return changes
    end, 60, "the mirror to resume")
    local got = {}
    for i, c in ipairs(changes) do
      got[i] = { c.type, c.key, c.value or false, c.prev_value or false, c.kv.mod_revision }
    end
    assert.are.same({
      { "PUT", "/cmp/b", "2", "2", rev_b },
      { "PUT", "/cmp/e", "5", false, rev_e },
      { "PUT", "/cmp/f", "6b", false, rev_f },
      { "PUT", "/cmp/g", "7", "7", rev_g },
      { "DELETE", "/cmp/a", false, "1", now_rev },
    }, got)
    assert.are.equal(now_rev, m:revision())
    local want, count = etcdctl_view(member, "/cmp/", now_rev)
    assert.are.same(want, (copy_of(m)))
    assert.are.equal(count, m:count())
    -- and it follows from there
    assert(cli:put("/cmp/c", "3c"))
    local after = {}
    helper.wait_for(function()
      for _, c in ipairs(assert(m:update(1))) do after[#after + 1] = c end
      return #after > 0
    end, 20, "the next change")
    assert.are.same({ "PUT", "/cmp/c", "3c", "3" }, { after[1].type, after[1].key, after[1].value, after[1].prev_value })
    m:close()
    far:close()
  end)
end)

describe("mirror on a 3-member cluster", function()
  local cluster
  setup(function() cluster = helper.cluster(3) end)
  teardown(function() if cluster then cluster.stop() end end)

  it("loses and repeats no change when the member carrying its watch is killed", function()
    local cli = assert(etcd3.new { endpoints = cluster.endpoints })
    local m = assert(cli:mirror("/kill/"))
    local killed = false
    -- the writer talks to the members that stay up
    local final, shadow = follow_writer(m, { cluster.endpoints[2], cluster.endpoints[3] }, "/kill/", function(applied)
      if applied >= 250 and not killed then
        cluster.members[1]:kill() -- the member carrying the watch
        killed = true
      end
    end)
    assert.is_true(killed)
    local want, count = etcdctl_view(cluster.members[2], "/kill/", final)
    assert.are.same(want, (copy_of(m)))
    assert.are.same(shadow, (copy_of(m)))
    assert.are.equal(count, m:count())
    m:close()
    cli:close()
  end)
end)
