--- The client: configuration, endpoints, and how one request is run.
--
-- The C module (etcd3.core) starts calls and reports connectivity; this
-- file holds the policy: which endpoint a request goes to, what is retried,
-- how the caller waits, and how failures become error objects.
local core = require "etcd3.core"
local check = require "etcd3.check"
local errors = require "etcd3.error"
local wait = require "etcd3.wait"

local type, ipairs, setmetatable, tostring = type, ipairs, setmetatable, tostring
local now, os_getenv = core.now, os.getenv

local Client = { __class = "Client" }
Client.__index = Client
-- `local cli <close> = etcd3.new {...}` on Lua 5.4
Client.__close = function(self) self:close() end

local CONFIG = {
  endpoints = "any", timeout = "number", dial_timeout = "number",
  keepalive_time = "number", max_recv_bytes = "integer", wait = "function",
}

local DEFAULT_MAX_RECV = 2 ^ 31 - 1

--- "host:port" and "http://host:port[/]" -> "host:port" for gRPC.
local function parse_endpoint(s)
  if type(s) ~= "string" then
    check.fail("new", ("endpoints: strings expected, got %s"):format(type(s)), 4)
  end
  local scheme, rest = s:match("^(%a+)://(.*)$")
  if scheme then
    scheme = scheme:lower()
    if scheme == "https" then
      check.fail("new", ("endpoint '%s': TLS is not available in this version"):format(s), 4)
    elseif scheme ~= "http" then
      check.fail("new", ("endpoint '%s': unknown scheme '%s'"):format(s, scheme), 4)
    end
    s = rest
  end
  s = s:gsub("/+$", "")
  if not s:match("^[%w%.%-_%[%]:]+:%d+$") then
    check.fail("new", ("endpoint '%s': host:port expected"):format(s), 4)
  end
  return s
end

local function parse_endpoints(v)
  if v == nil then v = os_getenv("ETCDCTL_ENDPOINTS") or "127.0.0.1:2379" end
  local list = {}
  if type(v) == "string" then
    for item in v:gmatch("[^,%s]+") do list[#list + 1] = parse_endpoint(item) end
  elseif type(v) == "table" then
    for _, item in ipairs(v) do list[#list + 1] = parse_endpoint(item) end
  else
    check.fail("new", ("option 'endpoints': list or string expected, got %s"):format(type(v)), 4)
  end
  if #list == 0 then check.fail("new", "option 'endpoints': no endpoint given", 4) end
  return list
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
  local endpoints = parse_endpoints(config.endpoints)
  local timeout = positive("timeout", config.timeout, 5)
  local dial_timeout = positive("dial_timeout", config.dial_timeout, 5)
  local keepalive = positive("keepalive_time", config.keepalive_time, 10, 5)
  local max_recv = positive("max_recv_bytes", config.max_recv_bytes, DEFAULT_MAX_RECV, 1)
  if max_recv > DEFAULT_MAX_RECV then max_recv = DEFAULT_MAX_RECV end

  local handle, msg = core.new(endpoints, math.floor(keepalive * 1000), max_recv)
  if not handle then return nil, errors.new("UNAVAILABLE", 14, msg, "new") end
  local self = setmetatable({
    _core = handle,
    _endpoints = endpoints,
    _current = 1,
    _wait = wait.strategy(config.wait),
    _precheck = not config.wait and wait.precheck or nil,
    timeout = timeout,
  }, Client)
  if dial_timeout > 0 then
    local ok, err = self:_dial(dial_timeout)
    if not ok then
      handle:close()
      return nil, err
    end
  end
  return self
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
    ("no endpoint answered within dial_timeout (%gs): %s"):format(
      dial_timeout, table.concat(self._endpoints, ",")), "new")
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
-- be failing while another is not.
function Client:_pick(handle)
  local cur, n = self._current, #self._endpoints
  if n == 1 or handle:state(cur) ~= "TRANSIENT_FAILURE" then return cur end
  for k = 1, n - 1 do
    local i = (cur + k - 1) % n + 1
    if handle:state(i, true) ~= "TRANSIENT_FAILURE" then
      self._current = i
      return i
    end
  end
  return cur
end

--- Runs one unary RPC: `req` is the request table, `timeout` the seconds
-- allowed (nil: the client's), `idempotent` whether a failure with
-- UNAVAILABLE may be retried on the next endpoint (reads: yes; writes:
-- never, once they may have reached a member).
-- Returns the response table or nil, err.
function Client:_request(fname, rpc, req, timeout, idempotent)
  local handle = self:_handle(fname)
  if self._precheck then
    local err = self._precheck()
    if err then return nil, err end
  end
  local deadline = now() + (timeout or self.timeout)
  local n = #self._endpoints
  local err
  for _ = 1, idempotent and n or 1 do
    local i = self:_pick(handle)
    local left = deadline - now()
    if left <= 0 then break end
    local call = handle:call(i, rpc, req, left)
    -- gRPC enforces the same deadline; a call not complete by then is
    -- cancelled here rather than waited for.
    local ready, werr = self._wait(self, call, deadline)
    if not ready then
      call:cancel()
      return nil, werr or errors.new("DEADLINE_EXCEEDED", 4, "deadline exceeded", rpc)
    end
    local res, code, status, message = call:result()
    if res then return res end
    err = errors.new(code, status, message, rpc)
    if code ~= "UNAVAILABLE" then return nil, err end
    -- This endpoint failed: the next request starts on the next one.
    if self._current == i then self._current = i % n + 1 end
  end
  return nil, err or errors.new("DEADLINE_EXCEEDED", 4, "deadline exceeded", rpc)
end

--- client:close(): ends every call and frees the connections. Idempotent;
-- also run by __gc (of the core handle) and __close.
function Client:close()
  check.self("close", self, "Client")
  self._core:close()
end

--- client:endpoints() -> { "host:port", … }
function Client:endpoints()
  check.self("endpoints", self, "Client")
  local list = {}
  for i, e in ipairs(self._endpoints) do list[i] = e end
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
