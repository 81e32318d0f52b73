--- The shared base of the recipes: those on a session (mutex.lua,
-- election.lua, double_barrier.lua, rwmutex.lua) and those of etcd's
-- contrib/recipes (queue.lua, priority_queue.lua, barrier.lua), whose key
-- helpers (contrib/recipes' key.go and client.go) are here too.
--
-- Mutexes and elections use the key layout of clientv3's concurrency
-- package, so Lua, Go and `etcdctl lock` / `etcdctl elect` processes share
-- the same locks and elections, and the waits on it (clientv3's key.go).
--
-- A mutex or a candidate is the key `prefix .. "/" .. hex(lease)` under
-- its session's lease; the holder (or leader) is the key of the prefix
-- with the lowest create revision, and a waiter waits, one key at a time,
-- for every key created before its own to be deleted (clientv3's
-- waitDeletes), so waiters queue in creation order.
local core = require "etcd3.core"
local check = require "etcd3.check"
local errors = require "etcd3.error"
local wait = require "etcd3.wait"
local txn = require "etcd3.txn"

local setmetatable, math_min, math_max, math_floor, math_huge = setmetatable, math.min, math.max, math.floor, math.huge
local os_time = os.time
local now = core.now
local cmp, op = txn.compare, txn.op

local _M = {}

-- Errors -----------------------------------------------------------------

-- Local codes get the number of the gRPC status closest in meaning.

--- The session's lease was lost (while waiting, or before the call).
local function expired(rpc)
  return errors.new("SESSION_EXPIRED", "the session's lease was lost", rpc)
end
_M.expired = expired

local function timed_out(rpc)
  return errors.new("TIMEOUT", "the timeout ran out while waiting", rpc)
end

-- Recipe objects -----------------------------------------------------------

--- The session of a method's object, or a clear error once it was closed
-- or orphaned (its locks and candidacies are no longer this process's).
-- `level` as check's: 3 when the public method itself calls this.
local function open_session(fname, session, level)
  if session._closed then
    check.fail(fname, ("the session was %s"):format(session._closed), (level or 3) + 1)
  end
  return session
end

--- The key of this session under `prefix`: the lease ID in lowercase hex
-- without leading zeros, as Go's %x writes it.
local function session_key(session, prefix)
  local hex = session.lease.id:lower():gsub("^0+", "")
  return prefix .. "/" .. (hex == "" and "0" or hex)
end

--- A recipe object (mutex, election) of `session` under `prefix`, of
-- `class`; for the session method `fname`, which calls this directly (not
-- as a tail call: the levels count its frame).
function _M.new(session, fname, prefix, class)
  check.self(fname, session, "Session", 4)
  check.arg(fname, 1, prefix, "string", 4)
  open_session(fname, session, 4)
  return setmetatable({
    session = session, client = session.client, prefix = prefix,
    _pfx = prefix .. "/", _key = session_key(session, prefix),
  }, class)
end

--- The session of a recipe object's method that uses it.
function _M.method(self, fname, class)
  check.self(fname, self, class.__class, 4)
  return (open_session(fname, self.session, 4)) -- (not a tail call: levels count this frame)
end

-- Waits --------------------------------------------------------------------

--- The deadline of one request made while waiting until `deadline`: the
-- client's own timeout, shortened to what is left, but never so short
-- that a request cannot complete (its failure would hide the TIMEOUT).
local MIN_REQUEST = 1

local function request_timeout(client, deadline)
  return math_min(client.timeout, math_max(deadline - now(), MIN_REQUEST))
end
_M.request_timeout = request_timeout

-- The read of a prefix's first-created key, the holder or leader
-- (clientv3's WithFirstCreate).
_M.FIRST_CREATE = { prefix = true, sort_target = "create", sort_order = "ascend", limit = 1 }

--- Waits on watcher `w` until an event for which `wanted(ev)` holds
-- arrives (returned), `deadline` passes (TIMEOUT) or, with a `session`,
-- its lease is known to be lost (SESSION_EXPIRED); cancels `w` either way.
local function await_event(w, wanted, deadline, rpc, session)
  local ev, err
  while true do
    if session and not session.lease:alive() then
      err = expired(rpc)
      break
    end
    local left = deadline - now()
    if left <= 0 then
      err = timed_out(rpc)
      break
    end
    -- Slices, so that a lease lost while nothing happens is noticed at once.
    if session then left = math_min(left, wait.SLICE, session.lease:remaining()) end
    local werr
    ev, werr = w:next(left)
    if ev and wanted(ev) then break end
    ev = nil
    if werr and werr.code ~= "TIMEOUT" then
      err = werr
      break
    end
  end
  w:cancel()
  return ev, err
end
_M.await_event = await_event

local function is_delete(ev) return ev.type == "DELETE" end

--- Waits until the key of `kv` (read by the caller) is deleted, the
-- deadline passes or (with a `session`) the session's lease is lost.
-- Returns true, or nil, err.
local function wait_delete(client, session, rpc, kv, deadline)
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
  local ev, werr = await_event(w, is_delete, deadline, rpc, session)
  if not ev then return nil, werr end
  return true
end
_M.wait_delete = wait_delete

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
    local ok, werr = wait_delete(client, session, rpc, res.kvs[1], deadline)
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

--- Waits until the recipe object's key, created at `revision`, is the
-- first-created under its prefix (every key created before it is gone) and
-- is still there: true, or nil, err (TIMEOUT at `deadline`; SESSION_EXPIRED
-- once the lease is known to be lost).
function _M.wait_turn(self, rpc, revision, deadline)
  local session = self.session
  local ok, err = wait_deletes(session, rpc, self._pfx, revision - 1, deadline)
  if ok then ok, err = still_ours(session, rpc, self._key, revision, deadline) end
  if ok then return true end
  return nil, err
end

-- The keys of contrib/recipes (key.go, client.go) -------------------------

--- A number for a new unique key, as Go's time.Now().UnixNano() writes
-- it: the wall-clock second, then nine digits that change between calls.
local function unique_suffix()
  local fraction = now() % 1
  return ("%d%09d"):format(os_time(), math_floor(fraction * 1e9))
end

--- key.go's newUniqueKV / newUniqueEphemeralKV: puts `value` on a new key
-- `prefix .. "/" .. nanoseconds` (under `lease` when given), trying another
-- number while the key exists. Returns key, its create revision | nil, err.
function _M.put_unique(client, prefix, value, lease, deadline)
  while true do
    local key = prefix .. "/" .. unique_suffix()
    local res, err = client:txn()
      :when(cmp.version(key):eq(0))
      :success(op.put(key, value, lease and { lease = lease } or nil))
      :commit { timeout = request_timeout(client, deadline) }
    if not res then
      client:delete(key) -- the txn may have been applied although its answer was lost
      return nil, err
    end
    if res.succeeded then return key, res.header.revision end
  end
end

--- client.go's deleteRevKey: deletes `kv`'s key if it still has `kv`'s mod
-- revision. true (deleted here), false (changed or taken), or nil, err.
function _M.delete_if_unchanged(client, kv, deadline)
  local res, err = client:txn()
    :when(cmp.mod_revision(kv.key):eq(kv.mod_revision))
    :success(op.delete(kv.key))
    :commit { timeout = request_timeout(client, deadline) }
  if not res then return nil, err end
  return res.succeeded
end

--- The deadline of a recipe call from its optional `timeout` argument
-- (checked as argument `position` of `fname`).
function _M.deadline(fname, position, timeout)
  if timeout == nil then return math_huge end
  check.arg(fname, position, timeout, "number", 4)
  return now() + timeout
end

return _M
