-- Auth: credentials, token renewal (simple tokens that expire after
-- --auth-token-ttl seconds), roles, and the password kept out of sight.
local etcd3 = require "etcd3"
local helper = require "spec.helpers.etcd"
local core = require "etcd3.core"

describe("auth", function()
  local member, root
  local ROOT_PW, ALICE_PW = "r00t-s3cret", "al1ce-s3cret"

  setup(function()
    member = helper.single { extra = { "--auth-token-ttl", "2" } }
    local admin = assert(etcd3.new { endpoints = member.endpoint })
    assert.is_false(assert(admin:auth_status()).enabled)
    assert(admin:user_add("root", ROOT_PW))
    assert(admin:user_grant_role("root", "root"))
    assert(admin:role_add("reader"))
    assert(admin:role_grant_permission("reader", "read", "/ro/", { prefix = true }))
    assert(admin:user_add("alice", ALICE_PW))
    assert(admin:user_grant_role("alice", "reader"))
    assert(admin:auth_enable())
    admin:close()
    root = assert(etcd3.new { endpoints = member.endpoint, user = "root", password = ROOT_PW })
    member.auth = "root:" .. ROOT_PW -- for the helper's etcdctl
  end)
  teardown(function()
    if root then root:close() end
    if member then member:stop() end
  end)

  it("reports auth_status", function()
    assert.is_true(assert(root:auth_status()).enabled)
  end)

  it("renews an expired token: an idle client's next put succeeds", function()
    assert(root:put("/ro/a", "1"))
    core.sleep(4) -- the token lives 2 s
    assert(root:put("/ro/a", "2"))
    assert.are.equal("2", assert(root:get("/ro/a")).kvs[1].value)
  end)

  it("keeps a watch opened before the expiry delivering, exactly once", function()
    local w = assert(root:watch("/ro/w/", { prefix = true }))
    core.sleep(4)
    for i = 1, 3 do assert(root:put("/ro/w/" .. i, tostring(i))) end
    for i = 1, 3 do
      local ev = assert(w:next(5))
      assert.are.equal("/ro/w/" .. i, ev.kv.key)
    end
    assert.are.equal("TIMEOUT", select(2, w:next(0.5)).code)
    -- a watch created after the expiry works too (the engine re-authenticates)
    local later = assert(root:watch("/ro/later"))
    assert(root:put("/ro/later", "x"))
    assert.are.equal("x", assert(later:next(5)).kv.value)
    w:cancel()
    later:cancel()
  end)

  it("enforces a read-only role on a prefix", function()
    assert(root:put("/ro/b", "root wrote"))
    local alice = assert(etcd3.new { endpoints = member.endpoint, user = "alice", password = ALICE_PW })
    assert.are.equal("root wrote", assert(alice:get("/ro/b")).kvs[1].value)
    local res, err = alice:put("/ro/b", "alice wrote")
    assert.is_nil(res)
    assert.are.equal("PERMISSION_DENIED", err.code)
    assert.are.equal("etcdserver: permission denied", err.message)
    local _, err2 = alice:get("/elsewhere")
    assert.are.equal("PERMISSION_DENIED", err2.code)
    alice:close()
  end)

  it("gives clear errors for a wrong password, an unknown user and no credentials", function()
    local errs = {}
    local cli, err = etcd3.new { endpoints = member.endpoint, user = "alice", password = "wrong-" .. ALICE_PW }
    assert.is_nil(cli)
    assert.are.equal("INVALID_ARGUMENT", err.code)
    assert.are.equal("etcdserver: authentication failed, invalid user ID or password", err.message)
    errs[#errs + 1] = err
    cli, err = etcd3.new { endpoints = member.endpoint, user = "mallory", password = ALICE_PW }
    assert.is_nil(cli)
    assert.are.equal("etcdserver: authentication failed, invalid user ID or password", err.message)
    errs[#errs + 1] = err
    local anonymous = assert(etcd3.new { endpoints = member.endpoint })
    local res, err3 = anonymous:get("/ro/a")
    assert.is_nil(res)
    assert.are.equal("etcdserver: user name is empty", err3.message)
    errs[#errs + 1] = err3
    anonymous:close()
    for _, e in ipairs(errs) do
      assert.is_nil(tostring(e):find(ALICE_PW, 1, true))
      assert.is_nil(tostring(e):find("s3cret", 1, true))
    end
  end)

  it("never shows the password in tostring of the client or in the client object", function()
    local alice = assert(etcd3.new { endpoints = member.endpoint, user = "alice", password = ALICE_PW })
    assert.is_nil(tostring(alice):find("s3cret", 1, true))
    local function search(t, seen)
      seen = seen or {}
      if seen[t] then return false end
      seen[t] = true
      for k, v in pairs(t) do
        if type(v) == "string" and v:find("s3cret", 1, true) then return true end
        if type(k) == "string" and k:find("s3cret", 1, true) then return true end
        if type(v) == "table" and search(v, seen) then return true end
      end
      return false
    end
    assert.is_false(search(alice))
    alice:close()
  end)

  it("administers users and roles", function()
    assert(root:user_add("bob", "bobpw"))
    assert(root:role_add("writer"))
    assert(root:role_grant_permission("writer", "readwrite", "/w/a", { range_end = "/w/z" }))
    assert(root:role_grant_permission("writer", "write", "/exact"))
    assert(root:user_grant_role("bob", "writer"))
    assert.are.same({ "writer" }, assert(root:user_get("bob")).roles)
    local users = assert(root:user_list()).users
    table.sort(users)
    assert.are.same({ "alice", "bob", "root" }, users)
    local roles = assert(root:role_list()).roles
    table.sort(roles)
    local etcdctl_roles = {}
    for r in member:etcdctl("role list"):gmatch("[^\n]+") do etcdctl_roles[#etcdctl_roles + 1] = r end
    table.sort(etcdctl_roles)
    assert.are.same(etcdctl_roles, roles)
    assert.is_true(#roles >= 2)
    local perms = assert(root:role_get("writer")).perm
    assert.are.equal(2, #perms)
    local by_key = {}
    for _, p in ipairs(perms) do by_key[p.key] = p end
    assert.are.same({ perm_type = "READWRITE", key = "/w/a", range_end = "/w/z" }, by_key["/w/a"])
    assert.are.equal("WRITE", by_key["/exact"].perm_type)
    local bob = assert(etcd3.new { endpoints = member.endpoint, user = "bob", password = "bobpw" })
    assert(bob:put("/w/b", "ok"))
    assert(root:user_change_password("bob", "newpw"))
    assert.is_nil((etcd3.new { endpoints = member.endpoint, user = "bob", password = "bobpw" }))
    local bob2 = assert(etcd3.new { endpoints = member.endpoint, user = "bob", password = "newpw" })
    assert(root:role_revoke_permission("writer", "/w/a", { range_end = "/w/z" }))
    assert.are.equal("PERMISSION_DENIED", select(2, bob2:put("/w/b", "no")).code)
    assert(root:user_revoke_role("bob", "writer"))
    assert.are.same({}, assert(root:user_get("bob")).roles or {})
    assert(root:role_delete("writer"))
    assert(root:user_delete("bob"))
    local _, err = root:user_get("bob")
    assert.are.equal("etcdserver: user name not found", err.message)
    bob:close()
    bob2:close()
  end)

  it("auth_disable turns it off", function()
    local other = helper.single()
    local cli = assert(etcd3.new { endpoints = other.endpoint })
    assert(cli:user_add("root", "pw"))
    assert(cli:user_grant_role("root", "root"))
    assert(cli:auth_enable())
    local r = assert(etcd3.new { endpoints = other.endpoint, user = "root", password = "pw" })
    assert.is_true(assert(r:auth_status()).enabled)
    assert(r:auth_disable())
    assert.is_false(assert(cli:auth_status()).enabled)
    r:close()
    cli:close()
    other:stop()
  end)

  it("raises on bad admin arguments", function()
    assert.has_error(function() root:user_add("x") end)
    assert.has_error(function() root:role_grant_permission("reader", "delete", "/k") end)
    assert.has_error(function() root:role_grant_permission("reader", "read", "/k", { prefix = true, range_end = "x" }) end)
    assert.has_error(function() etcd3.new { endpoints = member.endpoint, user = "root" } end)
  end)
end)
