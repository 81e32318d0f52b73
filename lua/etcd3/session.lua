--- Sessions (clientv3's concurrency.Session): a lease that the engine
-- keeps alive, on which the recipes put their keys.
--
--   local s = assert(cli:session { ttl = 10 })
--   local m = s:mutex("/locks/job")
--   assert(m:lock(5))
--   assert(cli:txn():when(m:is_owner()):success(etcd3.op.put("/job", "done")):commit())
--   m:unlock()
--   s:close()
--
-- Each recipe's file holds its session methods (session:mutex in
-- mutex.lua, session:election in election.lua); init.lua hands them to the
-- session class, which names none of them.
local check = require "etcd3.check"

local setmetatable = setmetatable

local _M = {}

local Session = { __class = "Session" }
Session.__index = Session

local SESSION_OPTS = { ttl = "integer", lease = "id", timeout = "number" }

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
_M.Session = Session

return _M
