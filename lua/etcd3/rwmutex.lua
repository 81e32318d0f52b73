--- Reader-writer locks (etcd's contrib/recipes RWMutex): the key layout of
-- Go's recipe.NewRWMutex, so Lua and Go processes share one lock.
--
--   local rw = session:rwmutex("/locks/config")
--   assert(rw:rlock(5))   -- shared with other readers
--   rw:runlock()
--   assert(rw:lock(5))    -- alone
--   rw:unlock()
--
-- A reader puts `prefix .. "/read/" .. nanoseconds`, a writer
-- `prefix .. "/write/" .. nanoseconds`, under the session's lease. A
-- reader waits until no writer key is older than its own; a writer until
-- no key at all is: each waits for the deletion of the newest such key
-- (by mod revision) until none is left, so the lock goes in arrival order.
local check = require "etcd3.check"
local recipe = require "etcd3.recipe"

local pairs, ipairs = pairs, ipairs
local expired, request_timeout = recipe.expired, recipe.request_timeout

local _M = {}

local RWMutex = { __class = "RWMutex" }
RWMutex.__index = RWMutex

--- Puts our key under `self._pfx .. own` and waits until no key under
-- `self._pfx .. blockers` is older (rwmutex.go's waitOnLastRev loop).
-- true | nil, err (on TIMEOUT our key is removed).
local function acquire(self, session, rpc, own, blockers, deadline)
  if self._key then check.fail(rpc, "this rwmutex already holds or waits for the lock", 4) end
  if not session.lease:alive() then return nil, expired(rpc) end
  local client = self.client
  local key, rev = recipe.put_unique(client, self._pfx .. own, "", session.lease.id, deadline)
  if not key then return nil, rev end
  self._key = key
  while true do
    local res, err = client:get(self._pfx .. blockers, { prefix = true, sort_target = "mod", sort_order = "descend",
      limit = 1, max_mod_revision = rev - 1, timeout = request_timeout(client, deadline) })
    if res and not res.kvs[1] then return true end
    local ok = res ~= nil
    if ok then ok, err = recipe.wait_delete(client, session, rpc, res.kvs[1], deadline) end
    if not ok then
      -- A lost lease took our key with it; otherwise leave nothing behind.
      if err.code ~= "SESSION_EXPIRED" then client:delete(key) end
      self._key = nil
      return nil, err
    end
  end
end

-- rwmutex:rlock([timeout]) -> true | nil, err (TIMEOUT, SESSION_EXPIRED as
-- mutex:lock): waits for the writers that came before.
-- rwmutex:lock([timeout]) -> true | nil, err: waits for everyone who came
-- before, readers and writers.
-- name -> the kind of our key, the keys it waits for (under the prefix)
local LOCKS = { rlock = { "read", "write" }, lock = { "write", "" } }
for name, kinds in pairs(LOCKS) do
  local fname = "rwmutex:" .. name
  RWMutex[name] = function(self, timeout)
    local session = recipe.method(self, fname, RWMutex)
    local deadline = recipe.deadline(fname, 1, timeout)
    local ok, err = acquire(self, session, fname, kinds[1], kinds[2], deadline)
    return ok, err
  end
end

-- rwmutex:runlock(), rwmutex:unlock() -> true | nil, err: deletes our key.
for _, name in ipairs { "runlock", "unlock" } do
  local fname = "rwmutex:" .. name
  RWMutex[name] = function(self)
    recipe.method(self, fname, RWMutex)
    local key = self._key
    self._key = nil
    if not key then return true end
    local ok, err = self.client:delete(key)
    if not ok then return nil, err end
    return true
  end
end

--- rwmutex:key() -> our key while holding or waiting, else nil
function RWMutex:key()
  check.self("rwmutex:key", self, "RWMutex")
  return self._key
end

function RWMutex:__tostring()
  return ("etcd3.RWMutex %q%s"):format(self.prefix, self._key and (" " .. self._key) or "")
end

-- The session's methods (init.lua adds them to the session class) --------

local Session = {}
_M.session_methods = Session

--- session:rwmutex(prefix) -> rwmutex
function Session:rwmutex(prefix)
  local rw = recipe.new(self, "session:rwmutex", prefix, RWMutex)
  rw._key = nil -- (recipe.new's key is a mutex's; ours is made by each lock)
  return rw
end
_M.RWMutex = RWMutex

return _M
