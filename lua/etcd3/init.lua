--- lua-etcd3: the etcd v3 client for Lua (public API; see README.md).
--
--   local etcd3 = require "etcd3"
--   local cli = assert(etcd3.new { endpoints = { "127.0.0.1:2379" } })
--   assert(cli:put("/app/name", "zyq"))
local Client = require "etcd3.client"
local kv = require "etcd3.kv"
local errors = require "etcd3.error"
local txn = require "etcd3.txn"

local ipairs, pairs, require = ipairs, pairs, require

-- Each service's or recipe's file holds its client methods in
-- `client_methods`; the client class gets them all here (client.lua names
-- none of them). A new file of client methods is one name in this list
-- (docs/extending.md).
local METHOD_FILES = { "kv", "txn", "lease", "watch", "admin", "registration", "session", "mirror", "stm",
  "queue", "priority_queue", "barrier" }
for _, file in ipairs(METHOD_FILES) do
  for name, method in pairs(require("etcd3." .. file).client_methods) do Client[name] = method end
end

-- Likewise each recipe's file holds its session methods (session:mutex,
-- session:election, …) in `session_methods`; the session class gets them here.
local session = require "etcd3.session"
for _, file in ipairs { "mutex", "election", "double_barrier", "rwmutex" } do
  for name, method in pairs(require("etcd3." .. file).session_methods) do session.Session[name] = method end
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
