--- Queues (etcd's contrib/recipes Queue): the key layout of Go's
-- recipe.NewQueue, so Lua and Go processes share one queue.
--
--   local q = cli:queue("/jobs")
--   assert(q:enqueue("job 1"))
--   local job = assert(q:dequeue(5))
--
-- An item is the key `prefix .. "/" .. nanoseconds` holding its value; the
-- oldest item is the key of the prefix with the lowest mod revision, and a
-- consumer takes one by deleting its key in a txn that holds only while
-- the key is unchanged, so among competing consumers each item goes to
-- exactly one. An empty queue is waited on with a watch.
local check = require "etcd3.check"
local recipe = require "etcd3.recipe"

local setmetatable = setmetatable

local _M = {}

local Queue = { __class = "Queue" }
Queue.__index = Queue

--- The read of a queue's first item (`sort_target` "mod" for the FIFO
-- queue, Go's WithFirstRev; "key" for the priority queue, WithFirstKey).
local function first_item(sort_target, timeout)
  return { prefix = true, sort_target = sort_target, sort_order = "ascend", limit = 1, timeout = timeout }
end

local function any_event() return true end

--- The dequeue of both queues (Go's Dequeue): takes the first item under
-- `self._items` in `self._order`, or waits for the next one put.
-- Returns its value | nil, err (TIMEOUT: nothing was taken).
function _M.dequeue(self, rpc, deadline)
  local client, items = self.client, self._items
  while true do
    local res, err = client:get(items, first_item(self._order, recipe.request_timeout(client, deadline)))
    if not res then return nil, err end
    local kv = res.kvs[1]
    if not kv then
      -- empty: the first item put after the read (nothing to undo on TIMEOUT)
      local w, werr = client:watch(items, { prefix = true, start_revision = res.header.revision + 1,
        filters = { "nodelete" }, timeout = recipe.request_timeout(client, deadline) })
      if not w then return nil, werr end
      kv, werr = recipe.await_event(w, any_event, deadline, rpc)
      if not kv then return nil, werr end
      kv = kv.kv
    end
    local taken, terr = recipe.delete_if_unchanged(client, kv, deadline)
    if taken == nil then return nil, terr end
    if taken then return kv.value end
    -- another consumer took it: read again
  end
end

--- queue:enqueue(value [, timeout]) -> true | nil, err
function Queue:enqueue(value, timeout)
  check.self("queue:enqueue", self, "Queue")
  check.arg("queue:enqueue", 1, value, "string")
  local deadline = recipe.deadline("queue:enqueue", 2, timeout)
  local key, err = recipe.put_unique(self.client, self.prefix, value, nil, deadline)
  if not key then return nil, err end
  return true
end

--- queue:dequeue([timeout]) -> the oldest item's value | nil, err (TIMEOUT)
function Queue:dequeue(timeout)
  check.self("queue:dequeue", self, "Queue")
  return _M.dequeue(self, "queue:dequeue", recipe.deadline("queue:dequeue", 1, timeout))
end

function Queue:__tostring()
  return ("etcd3.Queue %q"):format(self.prefix)
end

-- The client's method (init.lua adds it to the client class) ---------------

---@class etcd3.Client
local Client = {}
_M.client_methods = Client

--- client:queue(prefix) -> queue
function Client:queue(prefix)
  check.self("queue", self, "Client")
  check.arg("queue", 1, prefix, "string")
  return setmetatable({ client = self, prefix = prefix, _items = prefix .. "/", _order = "mod" }, Queue)
end
_M.Queue = Queue

return _M
