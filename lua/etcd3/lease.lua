--- Leases: grant, keepalive in the background (in C, on the engine
-- thread), liveness, time_to_live, revoke.
--
--   local lease = assert(cli:grant(10))
--   lease:keepalive()                 -- renewed every ttl/3 until close/revoke/loss
--   assert(cli:put("/nodes/me", "addr", { lease = lease.id }))
--   if not lease:alive() then ... end -- etcd said it is gone, or its TTL ran out here
local core = require "etcd3.core"
local check = require "etcd3.check"
local errors = require "etcd3.error"

local setmetatable, math_huge = setmetatable, math.huge
local now = core.now
local tointeger = math.tointeger or function(v) return v end

local Lease = { __class = "Lease" }
Lease.__index = Lease

local _M = { Lease = Lease }

local TIMEOUT_ONLY = { timeout = "number" }

local function new_lease(client, id, ttl)
  local state = client:_handle("grant"):lease(id, ttl)
  return setmetatable({ client = client, id = id, ttl = ttl, _state = state }, Lease)
end

local function not_found(rpc)
  return errors.new("NOT_FOUND", 5, "etcdserver: requested lease not found", rpc)
end

-- Requests by ID, shared by the lease methods and the client's by-ID forms.

local function keepalive_once(client, fname, id, opts)
  opts = check.options(fname, opts, TIMEOUT_ONLY, 4)
  local sent_at = now()
  -- LeaseKeepAlive is a stream; one request, half-close, one answer.
  local res, err = client:_request(fname, "Lease.LeaseKeepAlive", { id = id }, opts.timeout, true)
  if not res then return nil, err end
  if (res.ttl or 0) <= 0 then return nil, not_found("Lease.LeaseKeepAlive"), sent_at end
  return { header = res.header, id = res.id, ttl = tointeger(res.ttl) }, nil, sent_at
end

local function time_to_live(client, fname, id, opts)
  opts = check.options(fname, opts, { keys = "boolean", timeout = "number" }, 4)
  local res, err = client:_request(fname, "Lease.LeaseTimeToLive", { id = id, keys = opts.keys },
    opts.timeout, true)
  if not res then return nil, err end
  res.id = res.id or id
  return res
end

local function revoke(client, fname, id, opts)
  opts = check.options(fname, opts, TIMEOUT_ONLY, 4)
  local res, err = client:_request(fname, "Lease.LeaseRevoke", { id = id }, opts.timeout, false)
  if not res then return nil, err end
  return true
end

--- lease:keepalive() -> true: renew every ttl/3 in the background until
-- lease:close(), revoke, client close, or loss.
function Lease:keepalive()
  check.self("lease:keepalive", self, "Lease")
  self.client:_handle("keepalive")
  return self._state:keepalive()
end

--- lease:alive() -> boolean, why_lost
function Lease:alive()
  check.self("lease:alive", self, "Lease")
  local alive, _, why = self._state:status()
  return alive, why
end

--- lease:remaining() -> seconds left as last known (0 once lost)
function Lease:remaining()
  check.self("lease:remaining", self, "Lease")
  local _, remaining = self._state:status()
  return remaining
end

--- lease:wait_lost([timeout]) -> true, why | nil, err (TIMEOUT)
function Lease:wait_lost(timeout)
  check.self("lease:wait_lost", self, "Lease")
  if timeout ~= nil then check.arg("lease:wait_lost", 1, timeout, "number") end
  local state = self._state
  local op = {
    ready = function() return not state:status() end,
    wait = function(_, seconds) state:wait(seconds) end,
    -- a TTL that runs out without a keepalive posts no news: look then
    recheck = function() return select(2, state:status()) end,
  }
  local ok, err = self.client._wait(self.client, op, now() + (timeout or math_huge))
  if err then return nil, err end
  if not ok then return nil, errors.new("TIMEOUT", 4, "the lease is still alive", "lease:wait_lost") end
  local _, _, why = state:status()
  return true, why
end

--- lease:keepalive_once([opts]) -> { header, id, ttl } | nil, err
function Lease:keepalive_once(opts)
  check.self("lease:keepalive_once", self, "Lease")
  local res, err, sent_at = keepalive_once(self.client, "lease:keepalive_once", self.id, opts)
  if res then self._state:renewed(res.ttl, sent_at)
  elseif err and err.code == "NOT_FOUND" then self._state:lose("gone") end
  return res, err
end

--- lease:time_to_live([{ keys = true }]) -> { header, id, ttl, granted_ttl, keys }
function Lease:time_to_live(opts)
  check.self("lease:time_to_live", self, "Lease")
  return time_to_live(self.client, "lease:time_to_live", self.id, opts)
end

--- lease:revoke() -> true: the lease and every key attached to it are gone.
function Lease:revoke(opts)
  check.self("lease:revoke", self, "Lease")
  local ok, err = revoke(self.client, "lease:revoke", self.id, opts)
  if ok or (err and err.code == "NOT_FOUND") then self._state:lose("revoked") end
  return ok, err
end

--- lease:close(): stops the background keepalive (the lease then expires
-- after its TTL unless renewed elsewhere). Idempotent.
function Lease:close()
  check.self("lease:close", self, "Lease")
  self._state:stop()
end
Lease.__close = Lease.close

function Lease:__tostring()
  return ("etcd3.Lease %s (ttl %s)"):format(self.id, tostring(self.ttl))
end

function _M.install(Client)
  --- client:grant(ttl [, { id, timeout }]) -> lease | nil, err
  function Client:grant(ttl, opts)
    check.self("grant", self, "Client")
    check.arg("grant", 1, ttl, "integer")
    opts = check.options("grant", opts, { id = "id", timeout = "number" })
    local res, err = self:_request("grant", "Lease.LeaseGrant", { ttl = ttl, id = opts.id }, opts.timeout, false)
    if not res then return nil, err end
    if res.error and res.error ~= "" then
      return nil, errors.new("UNKNOWN", 2, res.error, "Lease.LeaseGrant")
    end
    local lease = new_lease(self, res.id, res.ttl)
    lease.header = res.header
    return lease
  end

  --- client:revoke(id [, opts]) -> true | nil, err
  function Client:revoke(id, opts)
    check.self("revoke", self, "Client")
    check.arg("revoke", 1, id, "id")
    return revoke(self, "revoke", id, opts)
  end

  --- client:time_to_live(id [, { keys }]) -> { header, id, ttl, granted_ttl, keys }
  function Client:time_to_live(id, opts)
    check.self("time_to_live", self, "Client")
    check.arg("time_to_live", 1, id, "id")
    return time_to_live(self, "time_to_live", id, opts)
  end

  --- client:keepalive_once(id [, opts]) -> { header, id, ttl }
  function Client:keepalive_once(id, opts)
    check.self("keepalive_once", self, "Client")
    check.arg("keepalive_once", 1, id, "id")
    local res, err = keepalive_once(self, "keepalive_once", id, opts)
    return res, err
  end

  --- client:keepalive(id [, opts]) -> lease (kept alive) | nil, err:
  -- takes over an existing lease by ID.
  function Client:keepalive(id, opts)
    check.self("keepalive", self, "Client")
    check.arg("keepalive", 1, id, "id")
    local res, err, sent_at = keepalive_once(self, "keepalive", id, opts)
    if not res then return nil, err end
    local lease = new_lease(self, res.id, res.ttl)
    lease._state:renewed(res.ttl, sent_at)
    lease._state:keepalive()
    return lease
  end

  --- client:leases([opts]) -> { header, ids = { id, … } }
  function Client:leases(opts)
    check.self("leases", self, "Client")
    opts = check.options("leases", opts, TIMEOUT_ONLY)
    local res, err = self:_request("leases", "Lease.LeaseLeases", {}, opts.timeout, true)
    if not res then return nil, err end
    local ids = {}
    for i, l in ipairs(res.leases or {}) do ids[i] = l.id end
    return { header = res.header, ids = ids }
  end
end

return _M
