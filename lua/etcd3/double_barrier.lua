--- Double barriers (etcd's contrib/recipes DoubleBarrier): the key layout
-- of Go's recipe.NewDoubleBarrier, so Lua and Go processes meet at one.
--
--   local b = session:double_barrier("/barriers/round", 3)
--   assert(b:enter(30))   -- once 3 participants entered
--   -- ... work together ...
--   assert(b:leave(30))   -- once all 3 have left
--
-- Each participant puts `key .. "/waiters/" .. nanoseconds` under its
-- session's lease; the one that makes the count puts `key .. "/ready"`,
-- which releases the others. To leave, every participant but the one with
-- the oldest waiter key deletes its key and waits for that oldest one to
-- go; the oldest waits for the others' keys, then deletes `ready` and its
-- own key.
local check = require "etcd3.check"
local errors = require "etcd3.error"
local recipe = require "etcd3.recipe"
local txn = require "etcd3.txn"

local expired, request_timeout = recipe.expired, recipe.request_timeout
local op = txn.op

local _M = {}

local DoubleBarrier = { __class = "DoubleBarrier" }
DoubleBarrier.__index = DoubleBarrier

local function is_put(ev) return ev.type == "PUT" end

--- Deletes our waiter key, unless the lost lease took it.
local function drop_key(self, err)
  local key = self._key
  self._key = nil
  if key and not (err and err.code == "SESSION_EXPIRED") then return self.client:delete(key) end
  return true
end

--- double_barrier:enter([timeout]) -> true | nil, err (TIMEOUT: our key
-- is removed; TOO_MANY_CLIENTS: more than `count` entered)
function DoubleBarrier:enter(timeout)
  local session = recipe.method(self, "double_barrier:enter", DoubleBarrier)
  local deadline = recipe.deadline("double_barrier:enter", 1, timeout)
  local rpc, client = "double_barrier:enter", self.client
  if self._key then check.fail(rpc, "already entered") end
  if not session.lease:alive() then return nil, expired(rpc) end
  local key, rev = recipe.put_unique(client, self._waiters, "", session.lease.id, deadline)
  if not key then return nil, rev end
  self._key = key
  -- The watch first, then the reads: a `ready` put in between is seen.
  local w, err = client:watch(self._ready, { filters = { "nodelete" }, timeout = request_timeout(client, deadline) })
  local res
  if w then
    res, err = client:txn()
      :success(op.get(self._waiters, { prefix = true, count_only = true }), op.get(self._ready))
      :commit { timeout = request_timeout(client, deadline) }
  end
  if not res then
    if w then w:cancel() end
    drop_key(self)
    return nil, err
  end
  local count, ready = res.responses[1].count, res.responses[2].kvs[1]
  if count > self.count then
    w:cancel()
    drop_key(self)
    return nil, errors.new("TOO_MANY_CLIENTS", ("more than %d participants entered"):format(self.count), rpc)
  end
  if count == self.count then
    w:cancel()
    local ok, perr = client:put(self._ready, "", { timeout = request_timeout(client, deadline) })
    if not ok then return nil, perr end
    return true
  end
  if ready and ready.mod_revision > rev then
    w:cancel() -- released between our put and the watch
    return true
  end
  local ev, werr = recipe.await_event(w, is_put, deadline, rpc, session)
  if ev then return true end
  drop_key(self, werr)
  return nil, werr
end

--- double_barrier:leave([timeout]) -> true | nil, err (TIMEOUT: our key
-- is removed)
function DoubleBarrier:leave(timeout)
  recipe.method(self, "double_barrier:leave", DoubleBarrier)
  local deadline = recipe.deadline("double_barrier:leave", 1, timeout)
  local rpc, client = "double_barrier:leave", self.client
  while true do
    local res, err = client:get(self._waiters, { prefix = true, keys_only = true,
      timeout = request_timeout(client, deadline) })
    if not res then return nil, err end
    local kvs = res.kvs
    if #kvs == 0 then
      self._key = nil
      return true
    end
    if #kvs == 1 then
      local ok, derr = client:delete(self._ready, { timeout = request_timeout(client, deadline) })
      if ok then ok, derr = drop_key(self) end
      if not ok then return nil, derr end
      return true
    end
    local lowest, highest = kvs[1], kvs[1]
    for _, kv in ipairs(kvs) do
      if kv.mod_revision < lowest.mod_revision then lowest = kv end
      if kv.mod_revision > highest.mod_revision then highest = kv end
    end
    local ok, werr
    if lowest.key == self._key then
      ok, werr = recipe.wait_delete(client, self.session, rpc, highest, deadline)
    else
      ok, werr = drop_key(self)
      if ok then ok, werr = recipe.wait_delete(client, self.session, rpc, lowest, deadline) end
    end
    if not ok then
      drop_key(self, werr)
      return nil, werr
    end
  end
end

function DoubleBarrier:__tostring()
  return ("etcd3.DoubleBarrier %q (%d)"):format(self.prefix, self.count)
end

-- The session's methods (init.lua adds them to the session class) --------

local Session = {}
_M.session_methods = Session

--- session:double_barrier(key, count) -> double barrier
function Session:double_barrier(key, count)
  local b = recipe.new(self, "session:double_barrier", key, DoubleBarrier)
  check.arg("session:double_barrier", 2, count, "integer")
  if count < 1 then check.fail("session:double_barrier", "count must be >= 1") end
  b.count, b._key = count, nil -- (recipe.new's key is a mutex's; ours is made by enter)
  b._waiters, b._ready = key .. "/waiters", key .. "/ready"
  return b
end
_M.DoubleBarrier = DoubleBarrier

return _M
