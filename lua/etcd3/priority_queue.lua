--- Priority queues (etcd's contrib/recipes PriorityQueue): the key layout
-- of Go's recipe.NewPriorityQueue, so Lua and Go processes share one.
--
--   local q = cli:priority_queue("/jobs")
--   assert(q:enqueue("urgent", 0))
--   assert(q:enqueue("later", 10))
--   assert(q:dequeue(5) == "urgent")
--
-- An item is the key `prefix .. "/" .. %05d priority .. "/" .. %016d
-- sequence` (key.go's newSequentialKV: the next number after the last
-- key of its priority, put together with the marker key `"__" .. prefix
-- .. "/" .. %05d priority` in a txn that fails when another producer
-- added one meanwhile), so key order is priority order, then FIFO. A
-- consumer takes the first key as queue.lua's dequeue does.
local check = require "etcd3.check"
local recipe = require "etcd3.recipe"
local txn = require "etcd3.txn"
local queue = require "etcd3.queue"

local setmetatable, tonumber = setmetatable, tonumber
local cmp, op = txn.compare, txn.op

local _M = {}

local PriorityQueue = { __class = "PriorityQueue" }
PriorityQueue.__index = PriorityQueue

-- The read of the last key of a priority (Go's WithLastKey).
local function last_key(timeout)
  return { prefix = true, sort_target = "key", sort_order = "descend", limit = 1, keys_only = true, timeout = timeout }
end

--- key.go's newSequentialKV: puts `value` on the key after the last one
-- under `prefix`. Returns true | nil, err.
local function put_sequential(client, prefix, value, deadline)
  local marker = "__" .. prefix
  while true do
    local res, err = client:get(prefix, last_key(recipe.request_timeout(client, deadline)))
    if not res then return nil, err end
    local next_number = 0
    if res.kvs[1] then next_number = assert(tonumber(res.kvs[1].key:match("[^/]*$"))) + 1 end
    local key = ("%s/%016d"):format(prefix, next_number)
    local put, perr = client:txn()
      :when(cmp.mod_revision(marker):lt(res.header.revision + 1))
      :success(op.put(marker, ""), op.put(key, value))
      :commit { timeout = recipe.request_timeout(client, deadline) }
    if not put then return nil, perr end
    if put.succeeded then return true end
  end
end

--- priority_queue:enqueue(value, priority [, timeout]) -> true | nil, err;
-- priority 0-65535, lower first.
function PriorityQueue:enqueue(value, priority, timeout)
  check.self("priority_queue:enqueue", self, "PriorityQueue")
  check.arg("priority_queue:enqueue", 1, value, "string")
  check.arg("priority_queue:enqueue", 2, priority, "integer")
  if priority < 0 or priority > 65535 then
    check.fail("priority_queue:enqueue", ("priority %d out of 0-65535"):format(priority))
  end
  local deadline = recipe.deadline("priority_queue:enqueue", 3, timeout)
  return put_sequential(self.client, ("%s%05d"):format(self._items, priority), value, deadline)
end

--- priority_queue:dequeue([timeout]) -> the value of the item with the
-- lowest priority number (the oldest among equals) | nil, err (TIMEOUT)
function PriorityQueue:dequeue(timeout)
  check.self("priority_queue:dequeue", self, "PriorityQueue")
  return queue.dequeue(self, "priority_queue:dequeue", recipe.deadline("priority_queue:dequeue", 1, timeout))
end

function PriorityQueue:__tostring()
  return ("etcd3.PriorityQueue %q"):format(self.prefix)
end

-- The client's method (init.lua adds it to the client class) ---------------

---@class etcd3.Client
local Client = {}
_M.client_methods = Client

--- client:priority_queue(prefix) -> priority queue
function Client:priority_queue(prefix)
  check.self("priority_queue", self, "Client")
  check.arg("priority_queue", 1, prefix, "string")
  return setmetatable({ client = self, prefix = prefix, _items = prefix .. "/", _order = "key" }, PriorityQueue)
end
_M.PriorityQueue = PriorityQueue

return _M
