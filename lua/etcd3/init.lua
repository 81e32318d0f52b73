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
local registration = require "etcd3.registration"
local session = require "etcd3.session"
local mutex = require "etcd3.mutex"
local election = require "etcd3.election"
local mirror = require "etcd3.mirror"

local ipairs, pairs = ipairs, pairs

-- Each service's file holds its client methods; the client class gets
-- them all here (client.lua names none of them).
for _, service in ipairs { kv, txn, lease, watch, admin, registration, session, mirror } do
  for name, method in pairs(service.client_methods) do Client[name] = method end
end

-- Likewise each recipe's file holds its session methods (session:mutex,
-- session:election); the session class gets them here.
for _, recipe in ipairs { mutex, election } do
  for name, method in pairs(recipe.session_methods) do session.Session[name] = method end
end

---@class etcd3
local _M = {
  _VERSION = "lua-etcd3 0.1.0",
  --- Creates a client; nil, err (UNAVAILABLE) when no endpoint answers
  --- within dial_timeout.
  new = Client.new,
  --- The range end that covers every key starting with a prefix.
  prefix_end = kv.prefix_end,
  --- Whether a value is an error object.
  is_error = errors.is_error,
  --- Compare targets for transactions: compare.value(key):eq(v), …
  compare = txn.compare,
  --- Ops for transactions: op.get, op.put, op.delete, op.txn.
  op = txn.op,
}

return _M
