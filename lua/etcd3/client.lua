--- The client: its configuration, and how one request is run.
--
-- The C module (etcd3.core) starts calls and reports connectivity; this
-- file runs a request's loop: how the caller waits, and how failures
-- become error objects. Which endpoint, what is retried and when the
-- token is renewed is the engine's request policy (src/policy.h), shared
-- with its background services; signing in is auth.lua's; the methods users
-- call live in the file of their service (kv, txn, lease, watch, admin,
-- registration, session, mirror).
local core = require "etcd3.core"
local check = require "etcd3.check"
local errors = require "etcd3.error"
local wait = require "etcd3.wait"
local namespace = require "etcd3.namespace"
local endpoints = require "etcd3.endpoints"
local auth = require "etcd3.auth"

local setmetatable, tostring, io_open = setmetatable, tostring, io.open
local math_floor, math_min = math.floor, math.min
local now = core.now

---@alias etcd3.WaitFunction fun(client: etcd3.Client, timeout: number, op: { ready: fun(self: table): boolean })

--- etcd3.new's configuration (README.md, "etcd3.new").
---@class etcd3.Config
--- "host:port", "http://…", "https://…": a list or comma-separated
--- (default: $ETCDCTL_ENDPOINTS, or "127.0.0.1:2379")
---@field endpoints? string|string[]
---@field timeout? number default deadline of each request, seconds (5)
---@field dial_timeout? number how long new() waits for a first connection; 0 connects lazily (5)
---@field keepalive_time? number gRPC ping interval, seconds, >= 5 (10)
---@field max_recv_bytes? integer largest response accepted (2^31-1)
---@field wait? etcd3.WaitFunction how blocking calls wait (default: automatic)
---@field user? string authenticate as this user (with `password`)
---@field password? string
---@field tls? etcd3.TlsConfig
---@field namespace? string prefix added to every key sent, stripped from every key received
---@field auto_sync? number follow the cluster's members, refreshed at most every that many seconds

---@class etcd3.TlsConfig
---@field ca? string path of the CA certificates (PEM)
---@field cert? string path of the client certificate (PEM), with `key`
---@field key? string path of the client key (PEM), with `cert`
---@field server_name? string name to verify the server's certificate against

--- A connection to an etcd cluster. Its methods are in the files of their
-- service: kv.lua, txn.lua, lease.lua, watch.lua, admin.lua,
-- registration.lua, session.lua, mirror.lua (init.lua hands them over).
---@class etcd3.Client
---@field timeout number default deadline of each request, seconds
---@field _core userdata the etcd3.core handle
---@field _endpoints etcd3.EndpointSet
---@field _namespace string?
---@field _user string?
---@field _wait fun(client: etcd3.Client, op: table, deadline: number): boolean, etcd3.Error?
local Client = { __class = "Client" }
Client.__index = Client
-- `local cli <close> = etcd3.new {...}` on Lua 5.4
Client.__close = function(self) self:close() end

-- etcd3.new's options (name -> kind, as check.options takes them): the one
-- list of them. ngx.lua's mirror{} accepts each of these too and passes
-- them on, so a field added here is taken there as well. Read-only.
local CONFIG = {
  endpoints = "any", timeout = "number", dial_timeout = "number",
  keepalive_time = "number", max_recv_bytes = "integer", wait = "function",
  user = "string", password = "string", tls = "table", namespace = "string",
  auto_sync = "number",
}
Client.CONFIG = CONFIG
local TLS = { ca = "string", cert = "string", key = "string", server_name = "string" }

local DEFAULT_MAX_RECV = 2 ^ 31 - 1

-- Raises at the user's call of etcd3.new: check.fail -> helper -> new -> user
local NEW_USER = 4

local function read_file(what, path)
  local file, err = io_open(path, "rb")
  if not file then check.fail("new", ("tls.%s: cannot read %s"):format(what, err), NEW_USER + 1) end
  local text = file:read("*a")
  file:close()
  return text
end

--- The PEM texts for core.new, or nil for plaintext.
local function tls_config(tls, https)
  if tls == nil and not https then return nil end
  tls = check.options("new", tls or {}, TLS, NEW_USER)
  if (tls.cert == nil) ~= (tls.key == nil) then
    check.fail("new", "tls: 'cert' and 'key' go together", NEW_USER)
  end
  return {
    ca = tls.ca and read_file("ca", tls.ca),
    cert = tls.cert and read_file("cert", tls.cert),
    key = tls.key and read_file("key", tls.key),
    server_name = tls.server_name,
  }
end

--- `value`, which must be >= `min` (default 0), or `default` when nil.
local function at_least(name, value, default, min)
  if value == nil then return default end
  if value < (min or 0) then
    check.fail("new", ("option '%s' must be >= %s, got %s"):format(name, min or 0, tostring(value)), NEW_USER)
  end
  return value
end

--- etcd3.new(config) -> client | nil, err
---@param config? etcd3.Config
---@return etcd3.Client? client
---@return etcd3.Error? err
function Client.new(config)
  config = check.options("new", config, CONFIG)
  local list, https = endpoints.parse(config.endpoints)
  if (config.user == nil) ~= (config.password == nil) then
    check.fail("new", "options 'user' and 'password' go together")
  end
  local timeout = at_least("timeout", config.timeout, 5)
  local dial_timeout = at_least("dial_timeout", config.dial_timeout, 5)
  local keepalive = at_least("keepalive_time", config.keepalive_time, 10, 5)
  local max_recv = at_least("max_recv_bytes", config.max_recv_bytes, DEFAULT_MAX_RECV, 1)
  if max_recv > DEFAULT_MAX_RECV then max_recv = DEFAULT_MAX_RECV end

  local tls = tls_config(config.tls, https)
  local handle, message = core.new(list, math_floor(keepalive * 1000), max_recv, tls)
  if not handle then return nil, errors.new("UNAVAILABLE", message, "new") end
  local self = setmetatable({
    _tls_cert = tls and tls.cert ~= nil, -- nil: plaintext
    _namespace = config.namespace ~= "" and config.namespace or nil,
    _user = config.user,
    _tls = config.tls,
    _keepalive = keepalive,
    _max_recv = max_recv,
    _core = handle,
    _endpoints = endpoints.new_set(list),
    _wait = wait.strategy(config.wait),
    _precheck = not config.wait and wait.precheck or nil,
    _blocking = not config.wait and wait.blocking or nil,
    timeout = timeout,
  }, Client)
  local ok, err = true, nil
  if dial_timeout > 0 then ok, err = endpoints.dial(self, dial_timeout) end
  if ok and config.user then
    ok, err = auth.sign_in(self, config.user, config.password, dial_timeout > 0 and dial_timeout or timeout)
  end
  if not ok then
    handle:close()
    return nil, err
  end
  if config.auto_sync then self._endpoints:start_auto_sync(config.auto_sync) end
  return self
end

--- The live core handle, or a clear error for a closed or inherited client.
function Client:_handle(fname)
  check.self(fname, self, "Client", 4)
  local handle = self._core
  -- one question to C for both (closed, then forked), asked at every request
  local unusable = handle:unusable()
  if unusable == "closed" then check.fail(fname, "client is closed", 4) end
  if unusable then
    check.fail(fname, "client used in a forked child (create a new client after fork)", 4)
  end
  return handle
end

--- Runs one unary RPC: `req` is the request table, `timeout` the seconds
-- allowed (nil: the client's), `idempotent` whether it is a read;
-- `endpoint` (an index) aims the call at one member, without retries
-- elsewhere. What is retried, where, and when the token is renewed is the
-- engine's request policy (src/policy.h), asked only after a failure.
-- Returns the response table or nil, err.
function Client:_request(fname, rpc, req, timeout, idempotent, endpoint)
  local handle = self:_handle(fname)
  local set = self._endpoints
  if set.sync_interval then endpoints.auto_sync(self) end
  if self._precheck then
    local err = self._precheck()
    if err then return nil, err end
  end
  local started = now()
  local deadline = started + (timeout or self.timeout)
  local prefix = self._namespace
  if prefix then req = namespace.wrap_request(prefix, rpc, req) end
  local err
  local reauthenticated = false
  local sent = started
  local attempt, attempts = 0, #set.list
  local rounds = 0
  while attempt < attempts do
    attempt = attempt + 1
    local i = endpoint or handle:pick()
    -- the first attempt has the whole timeout (no second clock reading)
    local left = attempt == 1 and deadline - started or deadline - now()
    if left <= 0 then break end
    if attempt > 1 then sent = now() end
    local call = handle:call(i, rpc, req, left, self._blocking and self._blocking())
    local res, call_err, ended = wait.for_response(self, call, deadline, rpc)
    if res then
      if prefix then namespace.unwrap_response(prefix, rpc, res) end
      return res
    end
    if not ended then return nil, call_err end
    err = call_err
    err.message = endpoints.explain(self, err.message)
    local verdict = handle:verdict(err.code, err.message, idempotent, self._user ~= nil and not reauthenticated)
    if verdict == "reauth" then
      -- once per request: a second refusal is etcd's answer
      reauthenticated = true
      local ok, auth_err = auth.renew(self, sent, deadline)
      if not ok then return nil, auth_err end
      attempts = attempts + 1
    elseif verdict ~= "next" or endpoint then
      -- not retried, but the member failed it (a timeout): the next
      -- request starts on the next endpoint, not on a member that stopped
      -- answering
      if verdict == "move" and not endpoint then handle:failed(i) end
      return nil, err
    else
      handle:failed(i)
      if attempt == attempts and attempts >= 2 then
        -- every endpoint of several failed it in this round: an election,
        -- a rolling restart. Another round after a pause, until the
        -- deadline, as clientv3 retries until its context's; a single
        -- endpoint fails fast (it has nowhere else to go)
        rounds = rounds + 1
        local pause = math_min(handle:pause(rounds), deadline - now())
        if pause <= 0 then break end
        wait.pause(self, pause)
        attempts = attempts + #set.list
      end
    end
  end
  return nil, err or errors.new("DEADLINE_EXCEEDED", "deadline exceeded", rpc)
end

--- A client for one endpoint that is not in this client's list, with the
-- same settings and the current auth token (never the password).
function Client:_sibling(endpoint)
  local other, err = Client.new {
    endpoints = { endpoint }, timeout = self.timeout, dial_timeout = 0,
    keepalive_time = self._keepalive, max_recv_bytes = self._max_recv, tls = self._tls,
    namespace = self._namespace,
  }
  if not other then return nil, err end
  auth.share_token(self, other)
  return other
end

--- Ends every call and frees the connections. Idempotent; also run by
-- __gc (of the core handle) and __close.
function Client:close()
  check.self("close", self, "Client")
  self._core:close()
end

--- The endpoints in use, as "host:port" (auto_sync adds members that
-- joined and drops those removed).
---@return string[]
function Client:endpoints()
  check.self("endpoints", self, "Client")
  return self._endpoints:live()
end

--- A file descriptor readable while a completion waits to be collected
-- (level-triggered; the same for the client's whole life).
---@return integer fd
function Client:pollfd()
  return self:_handle("pollfd"):pollfd()
end

function Client:__tostring()
  return ("etcd3.Client (%s)%s"):format(tostring(self._endpoints), self._core:closed() and " closed" or "")
end

return Client
