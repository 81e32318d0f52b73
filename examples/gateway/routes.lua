--- An API gateway's route table, kept current in every nginx worker from
-- etcd (the model of APISIX): routes under /gateway/routes/, each a JSON
-- value { "host": "a.example", "path": "/api", "upstream": "…" }, where
-- upstream is an address ("127.0.0.1:8081") or the name of an upstream
-- under /gateway/upstreams/ ({ "nodes": ["127.0.0.1:8081", …] }).
--
-- One etcd connection per prefix for the whole nginx (etcd3.ngx.mirror
-- writes each prefix into a lua_shared_dict); each worker follows the
-- routes' dict with view:changes(), applying only what changed since its
-- last revision, and reads everything again with view:pairs() when the
-- change log no longer reaches back (RESET). Values are decoded once per
-- worker per key revision (the views' decode). nginx.conf beside this file
-- shows the directives; README.md ("Shared dict mirror") explains the feed.
local ngxm = require "etcd3.ngx"
local cjson = require "cjson.safe"

-- luacheck: push ignore 113 (ngx: OpenResty's global)
local ngx = ngx
-- luacheck: pop
local pairs, ipairs, type, table_sort = pairs, ipairs, type, table.sort

local _M = { _VERSION = "0.1" }

_M.ROUTES, _M.UPSTREAMS = "/gateway/routes/", "/gateway/upstreams/"
_M.ROUTES_DICT, _M.UPSTREAMS_DICT = "gateway_routes", "gateway_upstreams"

--- A route's JSON -> { host, path, upstream } | nil, why. A route without
-- host matches every host.
local function decode_route(value)
  local route, err = cjson.decode(value)
  if type(route) ~= "table" then return nil, err or "not a JSON object" end
  if route.host ~= nil and type(route.host) ~= "string" then return nil, "host must be a string" end
  if type(route.path) ~= "string" or route.path:sub(1, 1) ~= "/" then return nil, "path must start with /" end
  if type(route.upstream) ~= "string" then return nil, "upstream must be a string" end
  return route
end

--- An upstream's JSON -> { nodes = { "addr:port", … } } | nil, why.
local function decode_upstream(value)
  local upstream, err = cjson.decode(value)
  if type(upstream) ~= "table" or type(upstream.nodes) ~= "table" or not upstream.nodes[1] then
    return nil, err or 'expected { "nodes": ["addr:port", …] }'
  end
  return upstream
end

-- This worker's table. hosts: host ("" for routes without one) -> { routes
-- = { [key] = route }, sorted = its routes, longest path first (built when
-- first matched after a change) }; keys: key -> its route.
local state = { rev = -1, keys = {}, hosts = {}, count = 0, reloads = 0, applies = 0 }

local function clear()
  state.keys, state.hosts, state.count = {}, {}, 0
end

local function remove(key)
  local route = state.keys[key]
  if not route then return end
  local host = state.hosts[route.host or ""]
  host.routes[key], host.sorted = nil, nil
  state.keys[key] = nil
  state.count = state.count - 1
end

local function add(key, route)
  local name = route.host or ""
  local host = state.hosts[name]
  if not host then
    host = { routes = {} }
    state.hosts[name] = host
  end
  host.routes[key], host.sorted = route, nil
  state.keys[key] = route
  state.count = state.count + 1
end

--- Brings this worker's table to the copy's revision: the changes since
-- the table's revision, or the whole copy again on RESET. Never yields,
-- so a request and the timer cannot interleave in it.
function _M.sync()
  local view = ngxm.view(_M.ROUTES_DICT, { decode = decode_route })
  local list, rev = view:changes(state.rev)
  if not list then
    -- rev is the RESET error: take the revision first, then read it all
    rev = view:revision()
    clear()
    -- (a value decode rejects gives key, nil, err: the view logged it)
    for key, route in view:pairs() do
      if route then add(key, route) end
    end
    state.reloads = state.reloads + 1
  elseif list[1] then
    for _, change in ipairs(list) do
      remove(change.key)
      -- the value now: it may be newer than the change (it then comes again)
      local route = change.type == "PUT" and view:get(change.key)
      if route then add(change.key, route) end
    end
    state.applies = state.applies + 1
  end
  state.rev = rev
end

local function longest_first(a, b) return #a.path > #b.path end

--- The route of `host`'s routes whose path is the longest prefix of `uri`
-- at a "/" boundary.
local function find(host, uri)
  if not host then return nil end
  if not host.sorted then
    host.sorted = {}
    for _, route in pairs(host.routes) do host.sorted[#host.sorted + 1] = route end
    table_sort(host.sorted, longest_first)
  end
  for _, route in ipairs(host.sorted) do
    local path = route.path
    if uri:sub(1, #path) == path and (#uri == #path or path:sub(-1) == "/" or uri:sub(#path + 1, #path + 1) == "/") then
      return route
    end
  end
end

--- match(host, uri) -> the upstream address ("addr:port") for a request,
-- or nil, why. Routes of the host first, then those without a host.
function _M.match(host, uri)
  _M.sync()
  local route = find(state.hosts[host], uri) or find(state.hosts[""], uri)
  if not route then return nil, "no route" end
  if route.upstream:match("^[%w.-]+:%d+$") then return route.upstream end
  local upstreams = ngxm.view(_M.UPSTREAMS_DICT, { decode = decode_upstream })
  local upstream, err = upstreams:get(_M.UPSTREAMS .. route.upstream)
  if not upstream then return nil, err and err.message or "no upstream " .. route.upstream end
  -- (a real gateway balances over the nodes, in balancer_by_lua*)
  return upstream.nodes[1]
end

--- This worker's table: its revision, how often it was read whole
-- (reloads) or changed by a list of changes (applies), its routes.
function _M.status()
  return { rev = state.rev, reloads = state.reloads, applies = state.applies, count = state.count,
    routes = state.keys }
end

--- This worker's follower: syncs its table, then waits until the routes'
-- copy moves (view:wait: woken by the process that writes it, no polling)
-- or 5 s pass, until the worker exits.
local function follow(premature)
  if premature then return end
  local view = ngxm.view(_M.ROUTES_DICT)
  while not ngx.worker.exiting() do
    local ok, err = pcall(_M.sync)
    if not ok then
      ngx.log(ngx.ERR, "gateway: syncing the routes: ", tostring(err))
      ngx.sleep(1)
    end
    view:wait(state.rev, 5)
  end
end

--- In init_worker_by_lua* of every worker: one mirror per prefix (one
-- process writes them, with a connection per prefix), and a timer that
-- follows the routes into this worker's table (requests sync too).
-- opts: endpoints (etcd's), log_size (the change log's length, default
-- etcd3.ngx's).
function _M.init_worker(opts)
  ngxm.mirror { dict = _M.ROUTES_DICT, prefix = _M.ROUTES, endpoints = opts.endpoints, log_size = opts.log_size }
  ngxm.mirror { dict = _M.UPSTREAMS_DICT, prefix = _M.UPSTREAMS, endpoints = opts.endpoints }
  assert(ngx.timer.at(0, follow))
end

return _M
