--- Registrations: a key kept under a lease by the engine itself.
--
--   local reg = assert(cli:register("/nodes/n1", "127.0.0.1:7000", { ttl = 10 }))
--   -- ... the engine renews the lease; when the lease is lost (revoked,
--   -- expired while no member answered, the process was stopped), it
--   -- grants a new one and puts the key again, with no Lua call.
--   reg:set("127.0.0.1:7001")   -- a new value under the same lease
--   reg:close()                 -- deletes the key and revokes the lease
--
-- The engine thread does the work (src/registration.c); this file checks
-- arguments and waits.
local core = require "etcd3.core"
local check = require "etcd3.check"
local errors = require "etcd3.error"
local wait = require "etcd3.wait"

local setmetatable, tostring = setmetatable, tostring
local now = core.now

---@class etcd3.Registration
---@field client etcd3.Client
---@field key string the key as this client sees it (a namespace is stripped)
---@field ttl integer the lease TTL asked for, seconds
local Registration = { __class = "Registration" }
Registration.__index = Registration

local _M = {}

local DEFAULT_TTL = 10

local function check_open(fname, self)
  check.self(fname, self, "Registration", 4)
  if self._closed then check.fail(fname, "registration is closed", 4) end
end

-- Waits until the engine has put generation `generation` under a live
-- lease, or the deadline passes.
local function wait_put(self, generation, deadline, fname)
  local state = self._state
  local op = {
    ready = function()
      local alive, _, put = state:status()
      return alive and put >= generation
    end,
    wait = function(_, seconds) state:wait(seconds) end,
  }
  local ok, err = wait.until_ready(self.client, op, deadline, fname)
  if ok then return true end
  if err.code ~= "DEADLINE_EXCEEDED" then return nil, err end
  local _, _, _, why = state:status()
  return nil, errors.new("TIMEOUT", "not registered yet" .. (why and ": " .. why or "")
    .. " (the engine keeps trying)", fname)
end

--- reg:alive() -> boolean: the key is in etcd under a live lease.
---@return boolean
function Registration:alive()
  check.self("registration:alive", self, "Registration")
  if self._closed then return false end
  local alive = self._state:status()
  return alive
end

--- reg:lease_id() -> the current lease's ID (16 hex digits), or nil while
-- a new one is being granted.
---@return string?
function Registration:lease_id()
  check_open("registration:lease_id", self)
  local _, id = self._state:status()
  return id
end

--- reg:set(value [, { timeout }]) -> true | nil, err: the engine puts the
-- new value under the same lease; returns once it is in etcd.
---@param value string
---@param opts? { timeout: number? }
---@return true|nil ok
---@return etcd3.Error? err
function Registration:set(value, opts)
  check_open("registration:set", self)
  check.arg("registration:set", 1, value, "string")
  opts = check.options("registration:set", opts, { timeout = "number" })
  local generation = self._state:set(value)
  return wait_put(self, generation, now() + (opts.timeout or self.client.timeout), "registration:set")
end

--- reg:close([{ timeout }]) -> true | nil, err: the engine lets go, then
-- the key is deleted and its lease revoked. Idempotent.
---@param opts? { timeout: number? }
---@return true|nil ok
---@return etcd3.Error? err
function Registration:close(opts)
  check.self("registration:close", self, "Registration")
  opts = check.options("registration:close", opts, { timeout = "number" })
  if self._closed then return true end
  self._closed = true
  local lease_id = self._state:stop()
  local ok, err = self.client:delete(self.key, { timeout = opts.timeout })
  if not ok then return nil, err end
  if lease_id then
    ok, err = self.client:revoke(lease_id, { timeout = opts.timeout })
    if not ok and err.code ~= "NOT_FOUND" then return nil, err end
  end
  return true
end
Registration.__close = Registration.close

function Registration:__tostring()
  return ("etcd3.Registration %s (%s)"):format(self.key, self._closed and "closed"
    or (self:alive() and "alive" or "registering"))
end

-- The client's method (init.lua adds it to the client class) -----------------

---@class etcd3.Client
local Client = {}
_M.client_methods = Client

--- client:register(key, value [, { ttl = 10, timeout }]) -> registration | nil, err:
--- returns once the key is in etcd under its lease; from then on the engine
--- keeps it there until reg:close() or the client closes.
---@param key string
---@param value string
---@param opts? { ttl: integer?, timeout: number? }
---@return etcd3.Registration? registration
---@return etcd3.Error? err
function Client:register(key, value, opts)
  check.self("register", self, "Client")
  check.arg("register", 1, key, "string")
  check.arg("register", 2, value, "string")
  opts = check.options("register", opts, { ttl = "integer", timeout = "number" })
  local ttl = opts.ttl or DEFAULT_TTL
  if ttl < 1 then check.fail("register", "option 'ttl': at least 1 second expected, got " .. tostring(ttl)) end
  local sent_key = self._namespace and self._namespace .. key or key
  local reg = setmetatable({ client = self, key = key, ttl = ttl,
    _state = self:_handle("register"):register(sent_key, value, ttl) }, Registration)
  local ok, err = wait_put(reg, 1, now() + (opts.timeout or self.timeout), "register")
  if not ok then
    reg._closed = true
    local lease_id = reg._state:stop()
    if lease_id then self:revoke(lease_id) end
    return nil, err
  end
  return reg
end

return _M
