--- Sessions, mutexes and elections, with the key layout of clientv3's
-- concurrency package, so Lua, Go and `etcdctl lock` / `etcdctl elect`
-- processes share the same locks and elections.
--
--   local s = assert(cli:session { ttl = 10 })
--   local m = s:mutex("/locks/job")
--   assert(m:lock(5))
--   assert(cli:txn():when(m:is_owner()):success(etcd3.op.put("/job", "done")):commit())
--   m:unlock()
--   s:close()
--
-- A session is a lease that the engine keeps alive. A mutex or a candidate
-- is the key `prefix .. "/" .. hex(lease)` under that lease; the holder (or
-- leader) is the key of the prefix with the lowest create revision, and a
-- waiter waits, one key at a time, for every key created before its own to
-- be deleted (clientv3's waitDeletes), so waiters queue in creation order.
local core = require "etcd3.core"
local check = require "etcd3.check"
local errors = require "etcd3.error"
local txn = require "etcd3.txn"
local wait = require "etcd3.wait"

local setmetatable, math_huge, math_min, math_max = setmetatable, math.huge, math.min, math.max
local now = core.now
local cmp, op = txn.compare, txn.op

local _M = {}

local Session = { __class = "Session" }
Session.__index = Session
local Mutex = { __class = "Mutex" }
Mutex.__index = Mutex
local Election = { __class = "Election" }
Election.__index = Election
local Observer = { __class = "Observer" }
Observer.__index = Observer

-- Errors -----------------------------------------------------------------

-- Local codes get the number of the gRPC status closest in meaning.
local function expired(rpc)
  return errors.new("SESSION_EXPIRED", "the session's lease was lost", rpc)
end

local function timed_out(rpc)
  return errors.new("TIMEOUT", "the timeout ran out while waiting", rpc)
end

local function not_leader(rpc)
  return errors.new("NOT_LEADER", "not the leader of this election", rpc)
end

-- Session ----------------------------------------------------------------

local SESSION_OPTS = { ttl = "integer", lease = "id", timeout = "number" }

--- The session of a method's object, or a clear error once it was closed
-- or orphaned (its locks and candidacies are no longer this process's).
-- `level` as check's: 3 when the public method itself calls this.
local function open_session(fname, session, level)
  if session._closed then
    check.fail(fname, ("the session was %s"):format(session._closed), (level or 3) + 1)
  end
  return session
end

--- session:lease_id() -> the lease ID (16 hex digits)
function Session:lease_id()
  check.self("session:lease_id", self, "Session")
  return self.lease.id
end

--- session:alive() -> boolean, why_lost
function Session:alive()
  check.self("session:alive", self, "Session")
  if self._closed == "closed" then return false, "the session was closed" end
  return self.lease:alive()
end

--- session:wait_lost([timeout]) -> true, why | nil, err (TIMEOUT)
function Session:wait_lost(timeout)
  check.self("session:wait_lost", self, "Session")
  if timeout ~= nil then check.arg("session:wait_lost", 1, timeout, "number") end
  if self._closed == "closed" then return true, "the session was closed" end
  return self.lease:wait_lost(timeout)
end

--- session:close() -> true | nil, err: revokes the lease, which deletes
-- every key of the session (its locks and candidacies end). Idempotent.
function Session:close()
  check.self("session:close", self, "Session")
  if self._closed == "closed" then return true end
  self._closed = "closed"
  self.lease:close()
  local ok, err = self.lease:revoke()
  if not ok and err.code ~= "NOT_FOUND" then return nil, err end
  return true
end

--- session:orphan() -> true: stops renewing without revoking; the lease,
-- and the keys on it, run out by themselves after the TTL.
function Session:orphan()
  check.self("session:orphan", self, "Session")
  if not self._closed then self._closed = "orphaned" end
  self.lease:close()
  return true
end

function Session:__tostring()
  return ("etcd3.Session %s%s"):format(self.lease.id, self._closed and (" " .. self._closed) or "")
end

--- The key of this session under `prefix`: the lease ID in lowercase hex
-- without leading zeros, as Go's %x writes it.
local function session_key(session, prefix)
  local hex = session.lease.id:lower():gsub("^0+", "")
  return prefix .. "/" .. (hex == "" and "0" or hex)
end

--- The deadline of one request made while waiting until `deadline`: the
-- client's own timeout, shortened to what is left, but never so short
-- that a request cannot complete (its failure would hide the TIMEOUT).
local MIN_REQUEST = 1

local function request_timeout(client, deadline)
  return math_min(client.timeout, math_max(deadline - now(), MIN_REQUEST))
end

-- The read of a prefix's first-created key, the holder or leader
-- (clientv3's WithFirstCreate).
local FIRST_CREATE = { prefix = true, sort_target = "create", sort_order = "ascend", limit = 1 }

--- Waits until the key of `kv` (read by the caller) is deleted, the
-- deadline passes or the session's lease is lost. Returns true, or nil, err.
local function wait_delete(session, rpc, kv, deadline)
  local client = session.client
  -- clientv3 watches from the revision of its read. Here the watch starts
  -- from etcd's current revision and the key is read again after: etcd
  -- serves such a watch at once, while one that starts in the past waits
  -- for its sync loop (every 100 ms), which would delay hand-overs.
  local w, err = client:watch(kv.key, { filters = { "noput" }, timeout = request_timeout(client, deadline) })
  if not w then return nil, err end
  local res, gerr = client:get(kv.key, { keys_only = true, timeout = request_timeout(client, deadline) })
  if not res then
    w:cancel()
    return nil, gerr
  end
  local still = res.kvs[1]
  if not still or still.create_revision ~= kv.create_revision then
    w:cancel() -- deleted before the watch started
    return true
  end
  while true do
    if not session.lease:alive() then
      w:cancel()
      return nil, expired(rpc)
    end
    local left = deadline - now()
    if left <= 0 then
      w:cancel()
      return nil, timed_out(rpc)
    end
    -- Slices, so that a lease lost while the key stays is noticed at once.
    local ev, werr = w:next(math_min(left, wait.SLICE, session.lease:remaining()))
    if ev then
      if ev.type == "DELETE" then
        w:cancel()
        return true
      end
    elseif werr.code ~= "TIMEOUT" then
      w:cancel()
      return nil, werr
    end
  end
end

--- clientv3's waitDeletes: waits until every key of the prefix created at
-- or before `max_revision` is gone, watching the newest of them each time.
local function wait_deletes(session, rpc, prefix, max_revision, deadline)
  local client = session.client
  while true do
    if not session.lease:alive() then return nil, expired(rpc) end
    local res, err = client:get(prefix, {
      prefix = true, max_create_revision = max_revision, sort_target = "create",
      sort_order = "descend", limit = 1, timeout = request_timeout(client, deadline),
    })
    if not res then return nil, err end
    if #res.kvs == 0 then return res.header end
    local ok, werr = wait_delete(session, rpc, res.kvs[1], deadline)
    if not ok then return nil, werr end
  end
end

--- After the wait: true when `key` still has create revision `revision`
-- (the lease may have run out meanwhile), or nil, err.
local function still_ours(session, rpc, key, revision, deadline)
  local res, err = session.client:get(key, { timeout = request_timeout(session.client, deadline) })
  if not res then return nil, err end
  local kv = res.kvs[1]
  if not kv or kv.create_revision ~= revision then return nil, expired(rpc) end
  return true
end

-- Mutexes and elections share a layout --------------------------------

--- A mutex or an election of `session` under `prefix`.
local function new_recipe(session, fname, prefix, class)
  check.self(fname, session, "Session", 4)
  check.arg(fname, 1, prefix, "string", 4)
  open_session(fname, session, 4)
  return setmetatable({
    session = session, client = session.client, prefix = prefix,
    _pfx = prefix .. "/", _key = session_key(session, prefix),
  }, class)
end

--- The session of a mutex or election method that uses it.
local function recipe_method(self, fname, class)
  check.self(fname, self, class.__class, 4)
  return (open_session(fname, self.session, 4)) -- (not a tail call: levels count this frame)
end

-- Mutex ------------------------------------------------------------------

--- session:mutex(prefix) -> mutex
-- (parenthesised: not a tail call, so errors point at the user's call)
function Session:mutex(prefix)
  return (new_recipe(self, "session:mutex", prefix, Mutex))
end

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
  local session = recipe_method(self, "mutex:lock", Mutex)
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
  local rev = self._rev
  local ok, err = wait_deletes(session, rpc, self._pfx, rev - 1, deadline)
  if ok then ok, err = still_ours(session, rpc, self._key, rev, deadline) end
  if ok then return true end
  -- A lost lease took our key with it; otherwise leave nothing behind.
  if err.code == "SESSION_EXPIRED" then self._rev = nil else self:_release() end
  return nil, err
end

--- mutex:try_lock() -> true | false (held elsewhere; nothing is left
-- behind) | nil, err
function Mutex:try_lock()
  local session = recipe_method(self, "mutex:try_lock", Mutex)
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
  recipe_method(self, "mutex:unlock", Mutex)
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

-- Election ---------------------------------------------------------------

--- session:election(prefix) -> election
function Session:election(prefix)
  return (new_recipe(self, "session:election", prefix, Election))
end

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
  local session = recipe_method(self, "election:campaign", Election)
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
  local rev = self._rev
  local ok, werr = wait_deletes(session, rpc, self._pfx, rev - 1, deadline)
  if ok then ok, werr = still_ours(session, rpc, key, rev, deadline) end
  if ok then
    self._elected = true
    return true
  end
  if werr.code == "SESSION_EXPIRED" then self._rev, self._elected = nil, false else self:_resign() end
  return nil, werr
end

--- election:proclaim(value) -> true | nil, err (NOT_LEADER)
function Election:proclaim(value)
  recipe_method(self, "election:proclaim", Election)
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
  recipe_method(self, "election:resign", Election)
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

-- The client's methods (init.lua adds them to the client class) ----------

---@class etcd3.Client
local Client = {}
_M.client_methods = Client

--- client:session([{ ttl = 60, lease = id, timeout }]) -> session | nil, err
function Client:session(opts)
  check.self("session", self, "Client")
  opts = check.options("session", opts, SESSION_OPTS)
  if opts.ttl ~= nil and opts.lease ~= nil then
    check.fail("session", "options 'ttl' and 'lease' exclude each other (the lease has its TTL)")
  end
  if opts.ttl ~= nil and opts.ttl < 1 then check.fail("session", "option 'ttl' must be >= 1") end
  local lease, err
  if opts.lease ~= nil then
    lease, err = self:keepalive(opts.lease, { timeout = opts.timeout })
  else
    lease, err = self:grant(opts.ttl or 60, { timeout = opts.timeout })
    if lease then lease:keepalive() end
  end
  if not lease then return nil, err end
  return setmetatable({ client = self, lease = lease }, Session)
end
_M.Session, _M.Mutex, _M.Election, _M.Observer = Session, Mutex, Election, Observer

return _M
