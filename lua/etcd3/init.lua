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
-- `client_methods`; the client class gets them here (client.lua names none
-- of them). A new file of client methods is one name in one of these two
-- lists (docs/extending.md). The first list is loaded with etcd3; the
-- second on the first use of a method it holds, so a script that only
-- reads and writes keys compiles none of it (it was a fifth of the
-- instructions of a cold start: start, connect, one get).
local METHOD_FILES = { "kv", "txn", "lease", "watch" }
local LATER_METHOD_FILES = { "admin", "registration", "session", "mirror", "stm", "queue", "priority_queue",
  "barrier" }

local function add_methods(file)
  for name, method in pairs(require("etcd3." .. file).client_methods) do Client[name] = method end
end
for _, file in ipairs(METHOD_FILES) do add_methods(file) end

--- Loads LATER_METHOD_FILES, and each recipe's session methods
-- (session:mutex, session:election, …, in `session_methods`) into the
-- session class.
local function add_later_methods()
  setmetatable(Client, nil)
  for _, file in ipairs(LATER_METHOD_FILES) do add_methods(file) end
  local session = require "etcd3.session"
  for _, file in ipairs { "mutex", "election", "double_barrier", "rwmutex" } do
    for name, method in pairs(require("etcd3." .. file).session_methods) do session.Session[name] = method end
  end
end

-- A public name the client class lacks (a client's own fields start with
-- "_", and a missing one of those is no method) loads the later files once.
setmetatable(Client, {
  __index = function(_, name)
    if type(name) ~= "string" or name:sub(1, 1) == "_" then return nil end
    add_later_methods()
    return Client[name]
  end,
})

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
