--- Elections (clientv3's concurrency.Election): the key layout of
-- `etcdctl elect`, so Lua, Go and etcdctl processes share the same
-- elections (see recipe.lua for the layout and the wait in creation
-- order), and observers of who leads.
--
--   local e = session:election("/elect/job")
--   assert(e:campaign("node-1", 5)) -- waits until elected
--   assert(e:proclaim("node-1, busy"))
--   e:resign()
--
-- and anywhere, leader or not: `for value in e:observe() do … end`.
local core = require "etcd3.core"
local check = require "etcd3.check"
local errors = require "etcd3.error"
local txn = require "etcd3.txn"
local recipe = require "etcd3.recipe"

local setmetatable, math_huge, math_max = setmetatable, math.huge, math.max
local now = core.now
local cmp, op = txn.compare, txn.op
local expired, request_timeout, FIRST_CREATE = recipe.expired, recipe.request_timeout, recipe.FIRST_CREATE

local _M = {}

local Election = { __class = "Election" }
Election.__index = Election
local Observer = { __class = "Observer" }
Observer.__index = Observer

-- A local code, as recipe.lua's.
local function not_leader(rpc)
  return errors.new("NOT_LEADER", "not the leader of this election", rpc)
end

-- Election ---------------------------------------------------------------

--- Puts `value` on our key as long as it has our create revision.
function Election:_put_guarded(value, timeout)
  return self.client:txn()
    :when(cmp.create_revision(self._key):eq(self._rev))
    :success(op.put(self._key, value, { lease = self.session.lease.id }))
    :commit { timeout = timeout }
end

--- Deletes our key as long as it has our create revision (clientv3's
-- Resign); the candidacy ends either way.
function Election:_resign(timeout)
  local rev = self._rev
  self._rev, self._elected = nil, false
  return self.client:txn()
    :when(cmp.create_revision(self._key):eq(rev))
    :success(op.delete(self._key))
    :commit { timeout = timeout }
end

--- election:campaign(value [, timeout]) -> true | nil, err: waits until
-- elected (TIMEOUT: our key is removed; SESSION_EXPIRED as mutex:lock).
function Election:campaign(value, timeout)
  local session = recipe.method(self, "election:campaign", Election)
  check.arg("election:campaign", 1, value, "string")
  if timeout ~= nil then check.arg("election:campaign", 2, timeout, "number") end
  local rpc = "election:campaign"
  if not session.lease:alive() then return nil, expired(rpc) end
  local deadline = now() + (timeout or math_huge)
  local key = self._key
  local res, err = self.client:txn()
    :when(cmp.create_revision(key):eq(0))
    :success(op.put(key, value, { lease = session.lease.id }))
    :failure(op.get(key))
    :commit { timeout = request_timeout(self.client, deadline) }
  if not res then
    self.client:delete(key) -- the txn may have been applied
    self._rev, self._elected = nil, false
    return nil, err
  end
  self._rev = res.header.revision
  if not res.succeeded then
    -- already a candidate in this session: keep the place, take the value
    local kv = res.responses[1].kvs[1]
    self._rev = kv.create_revision
    if kv.value ~= value then
      local put, perr = self:_put_guarded(value, request_timeout(self.client, deadline))
      if not put or not put.succeeded then
        self:_resign()
        return nil, perr or not_leader(rpc)
      end
    end
  end
  local ok, werr = recipe.wait_turn(self, rpc, self._rev, deadline)
  if ok then
    self._elected = true
    return true
  end
  if werr.code == "SESSION_EXPIRED" then self._rev, self._elected = nil, false else self:_resign() end
  return nil, werr
end

--- election:proclaim(value) -> true | nil, err (NOT_LEADER)
function Election:proclaim(value)
  recipe.method(self, "election:proclaim", Election)
  check.arg("election:proclaim", 1, value, "string")
  if not self._elected then return nil, not_leader("election:proclaim") end
  local res, err = self:_put_guarded(value)
  if not res then return nil, err end
  if not res.succeeded then
    self._rev, self._elected = nil, false
    return nil, not_leader("election:proclaim")
  end
  return true
end

--- election:resign() -> true | nil, err (NOT_LEADER when not leading)
function Election:resign()
  recipe.method(self, "election:resign", Election)
  if not self._elected then return nil, not_leader("election:resign") end
  local res, err = self:_resign()
  if not res then return nil, err end
  if not res.succeeded then return nil, not_leader("election:resign") end
  return true
end

--- election:leader() -> value, kv | nil, err (NO_LEADER)
function Election:leader()
  check.self("election:leader", self, "Election")
  local res, err = self.client:get(self._pfx, FIRST_CREATE)
  if not res then return nil, err end
  local kv = res.kvs[1]
  if not kv then return nil, errors.new("NO_LEADER", "no leader is elected", "election:leader") end
  return kv.value, kv
end

--- election:key() -> our key (as this client sees it)
function Election:key()
  check.self("election:key", self, "Election")
  return self._key
end

--- election:is_leader() -> boolean: elected, not resigned, not found
-- superseded, and the session's lease not known to be lost.
function Election:is_leader()
  check.self("election:is_leader", self, "Election")
  return self._elected == true and not self.session._closed and self.session.lease:alive() == true
end

function Election:__tostring()
  return ("etcd3.Election %q%s"):format(self._pfx, self._elected and " (leader)" or "")
end

-- Observer ---------------------------------------------------------------

--- election:observe() -> observer: `for value, kv in election:observe()`
-- yields the leader's value each time a leader is elected or proclaims
-- (as `etcdctl elect -l` prints them); `observer:next([timeout])` is one
-- step, `observer:close()` ends it; `observer.err` says why a loop ended.
function Election:observe()
  check.self("election:observe", self, "Election")
  return setmetatable({ client = self.client, _pfx = self._pfx, _step = "read" }, Observer)
end

local function observer_fail(self, err)
  if self._w then self._w:cancel() end
  self._w, self._step, self.err = nil, "done", err
  return nil, err
end

--- Follows the leader's key from `revision` on.
local function follow(self, kv, revision)
  local w, err = self.client:watch(kv.key, { start_revision = revision })
  if not w then return observer_fail(self, err) end
  self._w, self._step = w, "follow"
  return kv.value, kv
end

--- observer:next([timeout]) -> value, kv | nil, err (TIMEOUT, or why the
-- observation ended)
function Observer:next(timeout)
  check.self("observer:next", self, "Observer")
  if timeout ~= nil then check.arg("observer:next", 1, timeout, "number") end
  local deadline = now() + (timeout or math_huge)
  while true do
    local step = self._step
    if step == "done" then return nil, self.err end
    if step == "read" then
      local res, err = self.client:get(self._pfx, FIRST_CREATE)
      if not res then return observer_fail(self, err) end
      local kv = res.kvs[1]
      if kv then return follow(self, kv, res.header.revision + 1) end
      -- no leader: the first key put under the prefix is the next one
      -- (after the read's revision; see wait_delete for why not at it)
      local w, werr = self.client:watch(self._pfx, { prefix = true, start_revision = res.header.revision + 1,
        filters = { "nodelete" } })
      if not w then return observer_fail(self, werr) end
      self._w, self._step = w, "first"
    else
      local ev, err = self._w:next(math_max(deadline - now(), 0))
      if ev then
        if step == "first" then
          self._w:cancel()
          return follow(self, ev.kv, ev.kv.mod_revision + 1)
        end
        if ev.type == "PUT" then return ev.kv.value, ev.kv end
        -- the leader resigned or its lease ran out: who leads now?
        self._w:cancel()
        self._w, self._step = nil, "read"
      elseif err.code == "TIMEOUT" then
        return nil, errors.new("TIMEOUT", "no new leader value within the timeout", "election:observe")
      elseif err.code == "COMPACTED" then
        self._w:cancel()
        self._w, self._step = nil, "read"
      else
        return observer_fail(self, err)
      end
    end
  end
end

--- for value, kv in observer do … end (ends when the observation ends)
function Observer:__call()
  return self:next()
end

--- observer:close(): stops observing. Idempotent.
function Observer:close()
  check.self("observer:close", self, "Observer")
  if self._w then self._w:cancel() end
  self._w, self._step = nil, "done"
end
Observer.__close = Observer.close

-- The session's methods (init.lua adds them to the session class) --------

local Session = {}
_M.session_methods = Session

--- session:election(prefix) -> election
function Session:election(prefix)
  return (recipe.new(self, "session:election", prefix, Election))
end
_M.Election, _M.Observer = Election, Observer

return _M
