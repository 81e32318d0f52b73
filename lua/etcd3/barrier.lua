--- Barriers (etcd's contrib/recipes Barrier): one key, held while it
-- exists, so Lua and Go processes share a barrier.
--
--   local b = cli:barrier("/barriers/start")
--   assert(b:hold())
--   -- elsewhere: assert(cli:barrier("/barriers/start"):wait(30))
--   assert(b:release())                    -- every waiter returns
local check = require "etcd3.check"
local errors = require "etcd3.error"
local recipe = require "etcd3.recipe"
local txn = require "etcd3.txn"

local setmetatable = setmetatable
local cmp, op = txn.compare, txn.op

local _M = {}

local Barrier = { __class = "Barrier" }
Barrier.__index = Barrier

--- barrier:hold() -> true | nil, err (ALREADY_EXISTS: already held)
function Barrier:hold()
  check.self("barrier:hold", self, "Barrier")
  local res, err = self.client:txn()
    :when(cmp.version(self.key):eq(0))
    :success(op.put(self.key, ""))
    :commit()
  if not res then return nil, err end
  if not res.succeeded then return nil, errors.new("ALREADY_EXISTS", "the barrier is held", "barrier:hold") end
  return true
end

--- barrier:release() -> true | nil, err: every waiter returns.
function Barrier:release()
  check.self("barrier:release", self, "Barrier")
  local res, err = self.client:delete(self.key)
  if not res then return nil, err end
  return true
end

--- barrier:wait([timeout]) -> true (not held, or released) | nil, err (TIMEOUT)
function Barrier:wait(timeout)
  check.self("barrier:wait", self, "Barrier")
  local deadline = recipe.deadline("barrier:wait", 1, timeout)
  local res, err = self.client:get(self.key, { keys_only = true, timeout = recipe.request_timeout(self.client, deadline) })
  if not res then return nil, err end
  if not res.kvs[1] then return true end
  return recipe.wait_delete(self.client, nil, "barrier:wait", res.kvs[1], deadline)
end

function Barrier:__tostring()
  return ("etcd3.Barrier %q"):format(self.key)
end

-- The client's method (init.lua adds it to the client class) ---------------

---@class etcd3.Client
local Client = {}
_M.client_methods = Client

--- client:barrier(key) -> barrier
function Client:barrier(key)
  check.self("barrier", self, "Client")
  check.arg("barrier", 1, key, "string")
  return setmetatable({ client = self, key = key }, Barrier)
end
_M.Barrier = Barrier

return _M
