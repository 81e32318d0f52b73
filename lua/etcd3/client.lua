--- The client: configuration, endpoints, and how one request is run.
--
-- The C module (etcd3.core) starts calls and reports connectivity; this
-- file holds the policy: which endpoint a request goes to, what is retried,
-- how the caller waits, and how failures become error objects.
local core = require "etcd3.core"
local check = require "etcd3.check"
local errors = require "etcd3.error"
local wait = require "etcd3.wait"
local namespace = require "etcd3.namespace"

local type, ipairs, setmetatable, tostring = type, ipairs, setmetatable, tostring
local now, os_getenv = core.now, os.getenv

local Client = { __class = "Client" }
Client.__index = Client
-- `local cli <close> = etcd3.new {...}` on Lua 5.4
Client.__close = function(self) self:close() end

local CONFIG = {
  endpoints = "any", timeout = "number", dial_timeout = "number",
  keepalive_time = "number", max_recv_bytes = "integer", wait = "function",
  user = "string", password = "string", tls = "table", namespace = "string",
  auto_sync = "number",
}
local TLS = { ca = "string", cert = "string", key = "string", server_name = "string" }

local DEFAULT_MAX_RECV = 2 ^ 31 - 1

--- "host:port", "http://host:port[/]" and "https://…" -> "host:port" for
-- gRPC, and whether the scheme asked for TLS.
local function parse_endpoint(s)
  if type(s) ~= "string" then
    check.fail("new", ("endpoints: strings expected, got %s"):format(type(s)), 4)
  end
  local scheme, rest = s:match("^(%a+)://(.*)$")
  local tls = false
  if scheme then
    scheme = scheme:lower()
    if scheme == "https" then
      tls = true
    elseif scheme ~= "http" then
      check.fail("new", ("endpoint '%s': unknown scheme '%s'"):format(s, scheme), 4)
    end
    s = rest
  end
  s = s:gsub("/+$", "")
  if not s:match("^[%w%.%-_%[%]:]+:%d+$") then
    check.fail("new", ("endpoint '%s': host:port expected"):format(s), 4)
  end
  return s, tls
end

local function parse_endpoints(v)
  if v == nil then v = os_getenv("ETCDCTL_ENDPOINTS") or "127.0.0.1:2379" end
  local list, tls = {}, false
  local function add(item)
    local e, is_tls = parse_endpoint(item)
    list[#list + 1], tls = e, tls or is_tls
  end
  if type(v) == "string" then
    for item in v:gmatch("[^,%s]+") do add(item) end
  elseif type(v) == "table" then
    for _, item in ipairs(v) do add(item) end
  else
    check.fail("new", ("option 'endpoints': list or string expected, got %s"):format(type(v)), 4)
  end
  if #list == 0 then check.fail("new", "option 'endpoints': no endpoint given", 4) end
  return list, tls
end

local function read_file(what, path)
  local f, err = io.open(path, "rb")
  if not f then check.fail("new", ("tls.%s: cannot read %s"):format(what, err), 5) end
  local text = f:read("*a")
  f:close()
  return text
end

--- The PEM texts for core.new, or nil for plaintext.
local function tls_config(tls, https)
  if tls == nil and not https then return nil end
  tls = check.options("new", tls or {}, TLS, 5)
  if (tls.cert == nil) ~= (tls.key == nil) then
    check.fail("new", "tls: 'cert' and 'key' go together", 5)
  end
  return {
    ca = tls.ca and read_file("ca", tls.ca),
    cert = tls.cert and read_file("cert", tls.cert),
    key = tls.key and read_file("key", tls.key),
    server_name = tls.server_name,
  }
end

local function positive(name, v, default, min)
  if v == nil then return default end
  if v < (min or 0) then
    check.fail("new", ("option '%s' must be >= %s, got %s"):format(name, min or 0, tostring(v)), 4)
  end
  return v
end

--- etcd3.new(config) -> client | nil, err
function Client.new(config)
  config = check.options("new", config, CONFIG)
  local endpoints, https = parse_endpoints(config.endpoints)
  if (config.user == nil) ~= (config.password == nil) then
    check.fail("new", "options 'user' and 'password' go together")
  end
  local timeout = positive("timeout", config.timeout, 5)
  local dial_timeout = positive("dial_timeout", config.dial_timeout, 5)
  local keepalive = positive("keepalive_time", config.keepalive_time, 10, 5)
  local max_recv = positive("max_recv_bytes", config.max_recv_bytes, DEFAULT_MAX_RECV, 1)
  if max_recv > DEFAULT_MAX_RECV then max_recv = DEFAULT_MAX_RECV end

  local handle, msg = core.new(endpoints, math.floor(keepalive * 1000), max_recv,
    tls_config(config.tls, https))
  if not handle then return nil, errors.new("UNAVAILABLE", 14, msg, "new") end
  local self = setmetatable({
    _ns = config.namespace ~= "" and config.namespace or nil,
    _user = config.user,
    _tls = config.tls,
    _keepalive = keepalive,
    _max_recv = max_recv,
    _core = handle,
    _endpoints = endpoints,
    _current = 1,
    _retired = {},
    _wait = wait.strategy(config.wait),
    _precheck = not config.wait and wait.precheck or nil,
    _blocking = not config.wait and wait.blocking or nil,
    timeout = timeout,
  }, Client)
  if dial_timeout > 0 then
    local ok, err = self:_dial(dial_timeout)
    if not ok then
      handle:close()
      return nil, err
    end
  end
  if config.user then
    -- kept in C only: the client object never holds the password
    handle:set_credentials(config.user, config.password)
    local ok, err = self:_authenticate(dial_timeout > 0 and dial_timeout or timeout)
    if not ok then
      handle:close()
      return nil, err
    end
  end
  if config.auto_sync then self:_start_auto_sync(config.auto_sync) end
  return self
end

--- Authenticates with the credentials kept in C; the token then rides on
-- every call and stream.
function Client:_authenticate(timeout)
  local handle = self._core
  local deadline = now() + timeout
  local err
  for _ = 1, #self._endpoints do
    local call = handle:authenticate(self:_pick(handle), math.max(deadline - now(), 0))
    local ready, werr = self._wait(self, call, deadline)
    if not ready then
      call:cancel()
      return nil, werr or errors.new("DEADLINE_EXCEEDED", 4, "deadline exceeded", "Auth.Authenticate")
    end
    local res, code, status, message = call:result()
    if res then
      handle:set_token(res.token)
      return true
    end
    err = errors.new(code, status, message, "Auth.Authenticate")
    if code ~= "UNAVAILABLE" then break end
    self._current = self._current % #self._endpoints + 1
  end
  return nil, err
end

--- Waits until some endpoint is connected; makes it the current one.
function Client:_dial(dial_timeout)
  local handle, n = self._core, #self._endpoints
  local op = wait.polling_op(function()
    for i = 1, n do
      if handle:state(i, true) == "READY" then
        self._current = i
        return true
      end
    end
    return false
  end)
  local ready, err = self._wait(self, op, now() + dial_timeout)
  if ready then return true end
  if err then return nil, err end
  return nil, errors.new("UNAVAILABLE", 14,
    ("no endpoint answered within dial_timeout (%gs): %s%s"):format(
      dial_timeout, table.concat(self._endpoints, ","), self:_why(self._current)), "new")
end

--- Why endpoint i does not answer, as " (reason)", or "" when gRPC knows
-- no reason. A fail-fast call carries gRPC's last connection error
-- (refused, TLS handshake failed and on what, an HTTP/1 server, a gRPC
-- server without etcd's services, …) at once; a channel still connecting
-- (a peer that accepted and never spoke) would only run the probe into
-- its deadline, so it is named as such.
function Client:_why(i)
  local handle = self._core
  if handle:state(i) == "CONNECTING" then return " (still connecting: the peer never completed the HTTP/2 handshake)" end
  local probe = handle:call(i, "Maintenance.Status", {}, 0.5)
  if wait.plain(self, probe, now() + 1) then
    local _, code, _, message = probe:result()
    if code and message and message ~= "" then return " (" .. message .. ")" end
  end
  return ""
end

--- The live core handle, or a clear error for a closed or inherited client.
function Client:_handle(fname)
  check.self(fname, self, "Client", 4)
  local handle = self._core
  if handle:closed() then check.fail(fname, "client is closed", 4) end
  if handle:forked() then
    check.fail(fname, "client used in a forked child (create a new client after fork)", 4)
  end
  return handle
end

--- The endpoint a request goes to: the current one unless it is known to
-- be failing (or was removed from the cluster) while another is not.
function Client:_pick(handle)
  local cur, n, retired = self._current, #self._endpoints, self._retired
  if n == 1 or (not retired[cur] and handle:state(cur) ~= "TRANSIENT_FAILURE") then return cur end
  for k = 1, n - 1 do
    local i = (cur + k - 1) % n + 1
    if not retired[i] and handle:state(i, true) ~= "TRANSIENT_FAILURE" then
      self._current = i
      return i
    end
  end
  return cur
end

--- The index of an endpoint given as "host:port" or "http://host:port",
-- or nil when it is not one of this client's.
function Client:_endpoint_index(endpoint)
  local target = endpoint:gsub("^%a+://", ""):gsub("/+$", "")
  for i, e in ipairs(self._endpoints) do
    if e == target and not self._retired[i] then return i end
  end
  return nil
end

-- auto_sync: the endpoint list follows the cluster's members, refreshed
-- at most every `interval` seconds, when the client is used (Lua has no
-- background; the refresh is one member_list call).
function Client:_start_auto_sync(interval)
  self._sync_interval = interval
  self._next_sync = now() + interval
end

function Client:_sync()
  self._next_sync = now() + self._sync_interval
  local res = self:member_list()
  if not res then return end
  local live = {}
  for _, m in ipairs(res.members or {}) do
    for _, url in ipairs(m.client_urls or {}) do
      local target = url:gsub("^%a+://", ""):gsub("/+$", "")
      live[target] = true
      local known = false
      for i, e in ipairs(self._endpoints) do
        if e == target then known = true; self._retired[i] = nil end
      end
      if not known then
        local index = self._core:add_endpoint(target)
        if index then self._endpoints[index] = target end
      end
    end
  end
  for i, e in ipairs(self._endpoints) do
    if not live[e] then self._retired[i] = true end
  end
end

--- Runs one unary RPC: `req` is the request table, `timeout` the seconds
-- allowed (nil: the client's), `idempotent` whether a failure with
-- UNAVAILABLE may be retried on the next endpoint (reads: yes; writes:
-- never, once they may have reached a member); `endpoint` (an index)
-- aims the call at one member, without retries elsewhere.
-- Returns the response table or nil, err.
function Client:_request(fname, rpc, req, timeout, idempotent, endpoint)
  local handle = self:_handle(fname)
  if self._sync_interval and not self._syncing and now() >= self._next_sync then
    self._syncing = true
    pcall(self._sync, self)
    self._syncing = false
  end
  if self._precheck then
    local err = self._precheck()
    if err then return nil, err end
  end
  local deadline = now() + (timeout or self.timeout)
  local ns = self._ns
  if ns then req = namespace.wrap_request(ns, rpc, req) end
  local n = #self._endpoints
  local err
  local reauthenticated = false
  local attempt, attempts = 0, idempotent and n or 1
  while attempt < attempts do
    attempt = attempt + 1
    local i = endpoint or self:_pick(handle)
    local left = deadline - now()
    if left <= 0 then break end
    local call = handle:call(i, rpc, req, left, self._blocking and self._blocking())
    -- gRPC enforces the same deadline; a call not complete by then is
    -- cancelled here rather than waited for.
    local ready, werr = self._wait(self, call, deadline)
    if not ready then
      call:cancel()
      return nil, werr or errors.new("DEADLINE_EXCEEDED", 4, "deadline exceeded", rpc)
    end
    local res, code, status, message = call:result()
    if res then
      if ns then namespace.unwrap_response(ns, rpc, res) end
      return res
    end
    err = errors.new(code, status, message, rpc)
    if code == "UNAUTHENTICATED" and self._user and not reauthenticated then
      -- The token expired (etcd's simple tokens live --auth-token-ttl
      -- seconds): authenticate again, once, and repeat. Safe for writes
      -- too: etcd refused the request before applying it.
      reauthenticated = true
      local ok, aerr = self:_authenticate(math.max(deadline - now(), 0.1))
      if not ok then return nil, aerr end
      attempts = attempts + 1
    elseif code ~= "UNAVAILABLE" or endpoint then
      return nil, err
    else
      -- This endpoint failed: the next request starts on the next one.
      if self._current == i then self._current = i % n + 1 end
    end
  end
  return nil, err or errors.new("DEADLINE_EXCEEDED", 4, "deadline exceeded", rpc)
end

--- A client for one endpoint that is not in this client's list, with the
-- same settings and the current auth token (never the password).
function Client:_sibling(endpoint)
  local other, err = Client.new {
    endpoints = { endpoint }, timeout = self.timeout, dial_timeout = 0,
    keepalive_time = self._keepalive, max_recv_bytes = self._max_recv, tls = self._tls,
    namespace = self._ns,
  }
  if not other then return nil, err end
  local token = self._core:token()
  if token then other._core:set_token(token) end
  return other
end

--- client:close(): ends every call and frees the connections. Idempotent;
-- also run by __gc (of the core handle) and __close.
function Client:close()
  check.self("close", self, "Client")
  self._core:close()
end

--- client:endpoints() -> { "host:port", … } (those in use: auto_sync
-- adds members that joined and drops those removed)
function Client:endpoints()
  check.self("endpoints", self, "Client")
  local list = {}
  for i, e in ipairs(self._endpoints) do
    if not self._retired[i] then list[#list + 1] = e end
  end
  return list
end

--- client:pollfd() -> fd, readable while a completion waits to be collected.
function Client:pollfd()
  return self:_handle("pollfd"):pollfd()
end

function Client:__tostring()
  return ("etcd3.Client (%s)%s"):format(table.concat(self._endpoints, ","),
    self._core:closed() and " closed" or "")
end

return Client
