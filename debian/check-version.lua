-- usage: lua5.x -letcd3 debian/check-version.lua VERSION (dh-lua's LUA_TEST)
-- etcd3 and etcd3.core load from the build, and etcd3._VERSION is
-- "lua-etcd3 VERSION", debian/changelog's upstream version.
local etcd3 = require "etcd3"
local core = require "etcd3.core"
assert(type(core) == "table", "etcd3.core did not load")
local want = "lua-etcd3 " .. assert(arg[1], "usage: check-version.lua VERSION")
assert(etcd3._VERSION == want, "etcd3._VERSION is " .. etcd3._VERSION .. ", debian/changelog says " .. want)
print(etcd3._VERSION .. " on " .. _VERSION)
