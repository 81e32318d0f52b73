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

local setmetatable, ipairs, pairs, type, tostring = setmetatable, ipairs, pairs, type, tostring
local math_huge = math.huge
local now = core.now
local tointeger = math.tointeger or function(v) return v end

local _M = {}

---@class etcd3.LeaseKeepAliveResult
---@field header etcd3.Header
---@field id string
---@field ttl integer seconds granted from now

---@class etcd3.LeaseTimeToLiveResult
---@field header etcd3.Header
---@field id string
---@field ttl integer seconds left (-1 once expired)
---@field granted_ttl integer
---@field keys string[]? with `keys = true`, the keys attached

---@class etcd3.LeasesResult
---@field header etcd3.Header
---@field ids string[] every lease ID

---@class etcd3.GrantOptions: etcd3.TimeoutOptions
---@field id? string|integer the ID wanted (default: etcd picks one)

---@class etcd3.TimeToLiveOptions: etcd3.TimeoutOptions
---@field keys? boolean also list the keys attached

---@alias etcd3.LeaseId string|integer 16 hex digits, or an integer on Lua 5.3+

--- A granted lease (client:grant) or one taken over by ID (client:keepalive).
---@class etcd3.Lease
---@field client etcd3.Client
---@field id string 16 hex digits
---@field ttl integer seconds granted
---@field header etcd3.Header? the grant's header (client:grant only)
local Lease = { __class = "Lease" }
Lease.__index = Lease

local TIMEOUT_ONLY = check.TIMEOUT_ONLY

local WEAK_KEYS = { __mode = "k" }

-- `since`: when the request that granted or renewed it left (its life is
-- counted from then, never from the answer).
local function new_lease(client, id, ttl, since)
  local state = client:_handle("grant"):lease(id, ttl, since)
  local lease = setmetatable({ client = client, id = id, ttl = ttl, _state = state }, Lease)
  -- the client's live lease objects (weak: a dropped lease is not kept),
  -- so that a revoke by ID ends their liveness at once, as lease:revoke() does
  local live = client._lease_objects
  if not live then
    live = setmetatable({}, WEAK_KEYS)
    client._lease_objects = live
  end
  live[lease] = true
  return lease
end

--- An ID as the client gives them ("%016x"): "abc12", "ABC12" and 0xabc12
-- are the same lease.
local function lease_id(id)
  if type(id) == "string" then return ("0"):rep(16 - #id) .. id:lower() end
  return ("%016x"):format(id)
end

local function not_found(rpc)
  return errors.new("NOT_FOUND", "etcdserver: requested lease not found", rpc)
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
  if res or err.code == "NOT_FOUND" then
    -- every lease object of this client with that ID is lost now, not at
    -- its next renewal
    id = lease_id(id)
    for lease in pairs(client._lease_objects or {}) do
      if lease.id == id then lease._state:lose("revoked") end
    end
  end
  if not res then return nil, err end
  return true
end

--- Renews the lease every ttl/3 in the background (in C) until
-- lease:close(), revoke, client close, or loss. false when the lease is
-- already lost (nothing is renewed).
---@return boolean
function Lease:keepalive()
  check.self("lease:keepalive", self, "Lease")
  self.client:_handle("keepalive")
  return self._state:keepalive()
end

--- Whether the lease is alive as far as this client knows: false once etcd
-- said it is gone or its TTL ran out here without a renewal.
---@return boolean alive
---@return string? why_lost
function Lease:alive()
  check.self("lease:alive", self, "Lease")
  local alive, _, why = self._state:status()
  return alive, why
end

--- The seconds left as last known (0 once lost).
---@return number
function Lease:remaining()
  check.self("lease:remaining", self, "Lease")
  local _, remaining = self._state:status()
  return remaining
end

--- Returns once the lease is lost, or nil, err (TIMEOUT) when it is still
-- alive after `timeout` seconds (nil: no limit).
---@param timeout? number
---@return true|nil lost
---@return string|etcd3.Error why_or_err
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
  if not ok then return nil, errors.new("TIMEOUT", "the lease is still alive", "lease:wait_lost") end
  local _, _, why = state:status()
  return true, why
end

--- Renews the lease once.
---@param opts? etcd3.TimeoutOptions
---@return etcd3.LeaseKeepAliveResult? result
---@return etcd3.Error? err
function Lease:keepalive_once(opts)
  check.self("lease:keepalive_once", self, "Lease")
  local res, err, sent_at = keepalive_once(self.client, "lease:keepalive_once", self.id, opts)
  if res then self._state:renewed(res.ttl, sent_at)
  elseif err and err.code == "NOT_FOUND" then self._state:lose("gone") end
  return res, err
end

--- What etcd knows of the lease.
---@param opts? etcd3.TimeToLiveOptions
---@return etcd3.LeaseTimeToLiveResult? result
---@return etcd3.Error? err
function Lease:time_to_live(opts)
  check.self("lease:time_to_live", self, "Lease")
  return time_to_live(self.client, "lease:time_to_live", self.id, opts)
end

--- Revokes the lease: it and every key attached to it are gone.
---@param opts? etcd3.TimeoutOptions
---@return true|nil ok
---@return etcd3.Error? err
function Lease:revoke(opts)
  check.self("lease:revoke", self, "Lease")
  return revoke(self.client, "lease:revoke", self.id, opts)
end

--- Stops the background keepalive (the lease then expires
-- after its TTL unless renewed elsewhere). Idempotent.
function Lease:close()
  check.self("lease:close", self, "Lease")
  self._state:stop()
end
Lease.__close = Lease.close

function Lease:__tostring()
  return ("etcd3.Lease %s (ttl %s)"):format(self.id, tostring(self.ttl))
end

-- The client's lease methods (init.lua adds them to the client class) ------

---@class etcd3.Client
local Client = {}
_M.client_methods = Client

--- Grants a lease of `ttl` seconds.
---@param ttl integer
---@param opts? etcd3.GrantOptions
---@return etcd3.Lease? lease
---@return etcd3.Error? err
function Client:grant(ttl, opts)
  check.self("grant", self, "Client")
  check.arg("grant", 1, ttl, "integer")
  opts = check.options("grant", opts, { id = "id", timeout = "number" })
  local sent_at = now()
  local res, err = self:_request("grant", "Lease.LeaseGrant", { ttl = ttl, id = opts.id }, opts.timeout, false)
  if not res then return nil, err end
  if res.error and res.error ~= "" then
    return nil, errors.new("UNKNOWN", res.error, "Lease.LeaseGrant")
  end
  local lease = new_lease(self, res.id, res.ttl, sent_at)
  lease.header = res.header
  return lease
end

--- Revokes a lease by ID.
---@param id etcd3.LeaseId
---@param opts? etcd3.TimeoutOptions
---@return true|nil ok
---@return etcd3.Error? err
function Client:revoke(id, opts)
  check.self("revoke", self, "Client")
  check.arg("revoke", 1, id, "id")
  return revoke(self, "revoke", id, opts)
end

--- What etcd knows of a lease, by ID.
---@param id etcd3.LeaseId
---@param opts? etcd3.TimeToLiveOptions
---@return etcd3.LeaseTimeToLiveResult? result
---@return etcd3.Error? err
function Client:time_to_live(id, opts)
  check.self("time_to_live", self, "Client")
  check.arg("time_to_live", 1, id, "id")
  return time_to_live(self, "time_to_live", id, opts)
end

--- Renews a lease once, by ID.
---@param id etcd3.LeaseId
---@param opts? etcd3.TimeoutOptions
---@return etcd3.LeaseKeepAliveResult? result
---@return etcd3.Error? err
function Client:keepalive_once(id, opts)
  check.self("keepalive_once", self, "Client")
  check.arg("keepalive_once", 1, id, "id")
  local res, err = keepalive_once(self, "keepalive_once", id, opts)
  return res, err
end

--- Takes over an existing lease by ID and keeps it alive in the background.
---@param id etcd3.LeaseId
---@param opts? etcd3.TimeoutOptions
---@return etcd3.Lease? lease
---@return etcd3.Error? err
function Client:keepalive(id, opts)
  check.self("keepalive", self, "Client")
  check.arg("keepalive", 1, id, "id")
  local res, err, sent_at = keepalive_once(self, "keepalive", id, opts)
  if not res then return nil, err end
  local lease = new_lease(self, res.id, res.ttl, sent_at)
  lease._state:keepalive()
  return lease
end

--- The IDs of every lease.
---@param opts? etcd3.TimeoutOptions
---@return etcd3.LeasesResult? result
---@return etcd3.Error? err
function Client:leases(opts)
  check.self("leases", self, "Client")
  opts = check.options("leases", opts, TIMEOUT_ONLY)
  local res, err = self:_request("leases", "Lease.LeaseLeases", {}, opts.timeout, true)
  if not res then return nil, err end
  local ids = {}
  for i, lease in ipairs(res.leases or {}) do ids[i] = lease.id end
  return { header = res.header, ids = ids }
end

return _M
