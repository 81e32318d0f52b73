--- Endpoints: the one reader of endpoint URLs, dialing, and auto_sync.
--
-- A client's endpoint set holds its "host:port" list in the order of the
-- core handle's channels (index i is channel i) and the ones auto_sync
-- found removed from the cluster (kept in the list, because channel
-- indexes never move). Which member a request goes to is the engine's
-- request policy (src/policy.h), the same for Lua's calls and the
-- engine's background services: pick/failed here only ask it, and a
-- removed member is handed to it (retire) so nobody picks it.
local core = require "etcd3.core"
local check = require "etcd3.check"
local errors = require "etcd3.error"
local wait = require "etcd3.wait"

local type, ipairs, setmetatable, pcall, tostring = type, ipairs, setmetatable, pcall, tostring
local os_getenv, table_concat = os.getenv, table.concat
local now = core.now

local _M = {}

local DEFAULT = "127.0.0.1:2379"

--- "host:port", "http://host:port[/]" or "https://…" -> "host:port", and
-- the scheme in lower case (nil when there is none). The only place that
-- takes a URL apart: config endpoints, endpoints given to a method and the
-- client URLs members advertise all go through it.
---@param url string
---@return string address "host:port"
---@return string? scheme "http", "https", … (lower case)
function _M.address(url)
  local scheme, rest = url:match("^(%a+)://(.*)$")
  return ((rest or url):gsub("/+$", "")), scheme and scheme:lower()
end
local address = _M.address

-- Raises at the user's call of etcd3.new: check.fail -> parse_one ->
-- parse -> Client.new -> user.
local NEW_USER = 5

--- An endpoint URL -> "host:port" and whether it asked for TLS, or nil
-- and what is wrong with it.
local function normalise(url)
  local host_port, scheme = address(url)
  if scheme and scheme ~= "http" and scheme ~= "https" then
    return nil, ("endpoint '%s': unknown scheme '%s'"):format(url, scheme)
  end
  if not host_port:match("^[%w%.%-_%[%]:]+:%d+$") then
    return nil, ("endpoint '%s': host:port expected"):format(host_port)
  end
  return host_port, scheme == "https"
end

--- Raises, naming `fname`, unless `url` is an endpoint (a string that
-- normalises to host:port).
function _M.check(fname, url, level)
  local ok, why = normalise(url)
  if not ok then check.fail(fname, why, level) end
end

--- One configured endpoint -> "host:port", and whether it asked for TLS.
local function parse_one(url)
  if type(url) ~= "string" then
    check.fail("new", ("endpoints: strings expected, got %s"):format(type(url)), NEW_USER)
  end
  local host_port, tls_or_why = normalise(url)
  if not host_port then check.fail("new", tls_or_why, NEW_USER) end
  return host_port, tls_or_why
end

--- The config's `endpoints` (a list or a comma-separated string; nil:
-- $ETCDCTL_ENDPOINTS or 127.0.0.1:2379) -> { "host:port", … }, and whether
-- any of them asked for TLS (https://). Raises for etcd3.new.
---@param value string|string[]|nil
---@return string[] list
---@return boolean https
function _M.parse(value)
  if value == nil then value = os_getenv("ETCDCTL_ENDPOINTS") or DEFAULT end
  local urls
  if type(value) == "string" then
    urls = {}
    for url in value:gmatch("[^,%s]+") do urls[#urls + 1] = url end
  elseif type(value) == "table" then
    urls = value
  else
    check.fail("new", ("option 'endpoints': list or string expected, got %s"):format(type(value)), NEW_USER - 1)
  end
  local list, https = {}, false
  for i, url in ipairs(urls) do
    local host_port, tls = parse_one(url)
    list[i], https = host_port, https or tls
  end
  if #list == 0 then check.fail("new", "option 'endpoints': no endpoint given", NEW_USER - 1) end
  return list, https
end

-- The endpoint set of one client -------------------------------------------

---@class etcd3.EndpointSet
---@field list string[] every "host:port", index = the core handle's channel
---@field retired table<integer, true> indexes auto_sync found removed
---@field sync_interval number? auto_sync: seconds between refreshes
---@field next_sync number? auto_sync: when the next refresh is due
---@field syncing boolean? auto_sync: a refresh is running (its own request must not start another)
local EndpointSet = {}
EndpointSet.__index = EndpointSet

---@param list string[]
---@return etcd3.EndpointSet
function _M.new_set(list)
  return setmetatable({ list = list, retired = {} }, EndpointSet)
end

--- The index of an endpoint given as "host:port" or a URL, or nil when it
-- is not one of this client's (or was removed from the cluster).
---@param url string
---@return integer?
function EndpointSet:index(url)
  local target = address(url)
  for i, host_port in ipairs(self.list) do
    if host_port == target and not self.retired[i] then return i end
  end
  return nil
end

--- The endpoints in use.
---@return string[]
function EndpointSet:live()
  local list = {}
  for i, host_port in ipairs(self.list) do
    if not self.retired[i] then list[#list + 1] = host_port end
  end
  return list
end

function EndpointSet:__tostring()
  return table_concat(self.list, ",")
end

--- gRPC's message, with the likely cause when a TLS member closed the
-- connection right after the handshake: what one that demands a client
-- certificate does (with TLS 1.3 the client has finished its side by then,
-- so gRPC reports only "Endpoint read failed").
---@param client etcd3.Client
---@param message string?
---@return string?
function _M.explain(client, message)
  if client._tls_cert ~= nil and message and message:find("Endpoint read failed", 1, true) then
    return message .. (client._tls_cert
      and " (the server refused the TLS handshake: does it trust this client certificate?)"
      or " (the server refused the TLS handshake: no client certificate? it may require tls.cert and tls.key)")
  end
  return message
end

--- Why endpoint i does not answer, as " (reason)", or "" when gRPC knows
-- no reason. A fail-fast call carries gRPC's last connection error
-- (refused, TLS handshake failed and on what, an HTTP/1 server, a gRPC
-- server without etcd's services, …) at once; a channel still connecting
-- (a peer that accepted and never spoke) would only run the probe into
-- its deadline, so it is named as such.
---@param client etcd3.Client
---@param i integer
---@return string
function _M.why(client, i)
  local handle = client._core
  if handle:state(i) == "CONNECTING" then
    return " (still connecting: the peer never completed the HTTP/2 handshake)"
  end
  local probe = handle:call(i, "Maintenance.Status", {}, 0.5)
  if wait.plain(client, probe, now() + 1) then
    local _, code, _, message = probe:result()
    if code and message and message ~= "" then return " (" .. _M.explain(client, message) .. ")" end
  end
  return ""
end

--- Waits until some endpoint of `client` is connected; makes it the
-- current one. true | nil, err (UNAVAILABLE with gRPC's reason).
function _M.dial(client, dial_timeout)
  local handle, set = client._core, client._endpoints
  local op = wait.polling_op(function()
    for i = 1, #set.list do
      if handle:state(i, true) == "READY" then
        handle:prefer(i)
        return true
      end
    end
    return false
  end)
  local ready, err = client._wait(client, op, now() + dial_timeout)
  if ready then return true end
  if err then return nil, err end
  return nil, errors.new("UNAVAILABLE",
    ("no endpoint answered within dial_timeout (%gs): %s%s"):format(dial_timeout, tostring(set),
      _M.why(client, handle:pick())), "new")
end

-- auto_sync ---------------------------------------------------------------
-- The endpoint list follows the cluster's members, refreshed at most every
-- `interval` seconds, when the client is used (Lua has no background; the
-- refresh is one member_list call).

function EndpointSet:start_auto_sync(interval)
  self.sync_interval = interval
  self.next_sync = now() + interval
end

--- Adds the members' client URLs not known yet (a new channel each),
-- revives known ones, retires the endpoints no member advertises.
local function merge_members(set, handle, members)
  local live = {}
  for _, member in ipairs(members or {}) do
    for _, url in ipairs(member.client_urls or {}) do
      local target = address(url)
      live[target] = true
      local known = false
      for i, host_port in ipairs(set.list) do
        if host_port == target then known = true; set.retired[i] = nil; handle:retire(i, false) end
      end
      if not known then
        local index = handle:add_endpoint(target)
        if index then set.list[index] = target end
      end
    end
  end
  for i, host_port in ipairs(set.list) do
    if not live[host_port] then set.retired[i] = true; handle:retire(i, true) end
  end
end

local function sync(client)
  local set = client._endpoints
  set.next_sync = now() + set.sync_interval
  local res = client:member_list()
  if res then merge_members(set, client._core, res.members) end
end

--- Refreshes the endpoint list when auto_sync is on and a refresh is due.
-- A failed refresh changes nothing (the request goes on as it would have).
function _M.auto_sync(client)
  local set = client._endpoints
  if set.sync_interval and not set.syncing and now() >= set.next_sync then
    set.syncing = true
    pcall(sync, client)
    set.syncing = false
  end
end

return _M
