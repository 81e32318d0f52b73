--- lua-etcd3: the etcd v3 client for Lua (public API; see README.md).
--
--   local etcd3 = require "etcd3"
--   local cli = assert(etcd3.new { endpoints = { "127.0.0.1:2379" } })
--   assert(cli:put("/app/name", "zyq"))
local Client = require "etcd3.client"
local kv = require "etcd3.kv"
local errors = require "etcd3.error"
local txn = require "etcd3.txn"
local lease = require "etcd3.lease"
local watch = require "etcd3.watch"
local admin = require "etcd3.admin"

kv.install(Client)
txn.install(Client)
lease.install(Client)
watch.install(Client)
admin.install(Client)
require("etcd3.concurrency").install(Client)
require("etcd3.mirror").install(Client)

local _M = {
  _VERSION = "lua-etcd3 0.1.0",
  new = Client.new,
  prefix_end = kv.prefix_end,
  is_error = errors.is_error,
  compare = txn.compare,
  op = txn.op,
}

return _M
