--- Mutexes (clientv3's concurrency.Mutex): the key layout of `etcdctl
-- lock`, so Lua, Go and etcdctl processes share the same locks (see
-- recipe.lua for the layout and the wait in creation order).
--
--   local m = session:mutex("/locks/job")
--   assert(m:lock(5))
--   m:unlock()
local core = require "etcd3.core"
local check = require "etcd3.check"
local txn = require "etcd3.txn"
local recipe = require "etcd3.recipe"

local math_huge = math.huge
local now = core.now
local cmp, op = txn.compare, txn.op
local expired, request_timeout, FIRST_CREATE = recipe.expired, recipe.request_timeout, recipe.FIRST_CREATE

local _M = {}

local Mutex = { __class = "Mutex" }
Mutex.__index = Mutex

--- clientv3's Mutex.tryAcquire: one txn that creates our key unless this
-- session already has one, and reads the prefix's first-created key.
-- Returns the txn result and whether we hold the lock.
function Mutex:_acquire(timeout)
  local key, pfx = self._key, self._pfx
  local owner = op.get(pfx, FIRST_CREATE)
  local res, err = self.client:txn()
    :when(cmp.create_revision(key):eq(0))
    :success(op.put(key, "", { lease = self.session.lease.id }), owner)
    :failure(op.get(key), owner)
    :commit { timeout = timeout }
  if not res then return nil, err end
  local rev = res.header.revision
  if not res.succeeded then rev = res.responses[1].kvs[1].create_revision end
  self._rev = rev
  local first = res.responses[2].kvs[1]
  return res, first == nil or first.create_revision == rev
end

--- Deletes our key (after a failed wait, try_lock, unlock).
function Mutex:_release()
  self._rev = nil
  return self.client:delete(self._key)
end

--- mutex:lock([timeout]) -> true | nil, err (TIMEOUT: our key is removed;
-- SESSION_EXPIRED: the lease was lost while waiting)
function Mutex:lock(timeout)
  local session = recipe.method(self, "mutex:lock", Mutex)
  if timeout ~= nil then check.arg("mutex:lock", 1, timeout, "number") end
  local rpc = "mutex:lock"
  if not session.lease:alive() then return nil, expired(rpc) end
  local deadline = now() + (timeout or math_huge)
  local res, held = self:_acquire(request_timeout(self.client, deadline))
  if not res then
    -- the txn may have been applied although its answer was lost
    self:_release()
    return nil, held
  end
  if held then return true end
  local ok, err = recipe.wait_turn(self, rpc, self._rev, deadline)
  if ok then return true end
  -- A lost lease took our key with it; otherwise leave nothing behind.
  if err.code == "SESSION_EXPIRED" then self._rev = nil else self:_release() end
  return nil, err
end

--- mutex:try_lock() -> true | false (held elsewhere; nothing is left
-- behind) | nil, err
function Mutex:try_lock()
  local session = recipe.method(self, "mutex:try_lock", Mutex)
  if not session.lease:alive() then return nil, expired("mutex:try_lock") end
  local res, held = self:_acquire()
  if not res then
    self:_release()
    return nil, held
  end
  if held then return true end
  local ok, err = self:_release()
  if not ok then return nil, err end
  return false
end

--- mutex:unlock() -> true | nil, err
function Mutex:unlock()
  recipe.method(self, "mutex:unlock", Mutex)
  local ok, err = self:_release()
  if not ok then return nil, err end
  return true
end

--- mutex:key() -> the key (as this client sees it: without the namespace)
function Mutex:key()
  check.self("mutex:key", self, "Mutex")
  return self._key
end

--- mutex:revision() -> the create revision of our key, nil when not held
-- or waited for
function Mutex:revision()
  check.self("mutex:revision", self, "Mutex")
  return self._rev
end

--- mutex:is_owner() -> a txn compare: our key still has the create
-- revision we hold the lock with (never true when not held).
function Mutex:is_owner()
  check.self("mutex:is_owner", self, "Mutex")
  return cmp.create_revision(self._key):eq(self._rev or -1)
end

function Mutex:__tostring()
  return ("etcd3.Mutex %q%s"):format(self._key, self._rev and (" (revision " .. self._rev .. ")") or "")
end

-- The session's methods (init.lua adds them to the session class) --------

local Session = {}
_M.session_methods = Session

--- session:mutex(prefix) -> mutex
-- (parenthesised: not a tail call, so errors point at the user's call)
function Session:mutex(prefix)
  return (recipe.new(self, "session:mutex", prefix, Mutex))
end
_M.Mutex = Mutex

return _M
