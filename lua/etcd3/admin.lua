--- Auth administration, cluster membership and maintenance: thin methods
-- over etcd's Auth, Cluster and Maintenance RPCs (generated from a table,
-- so each is checked the same way).
local check = require "etcd3.check"
local errors = require "etcd3.error"
local kv = require "etcd3.kv"

local ipairs, select = ipairs, select

local _M = {}

local TIMEOUT_ONLY = { timeout = "number" }
local RANGE_OPTS = { prefix = "boolean", range_end = "string", timeout = "number" }
local PERMISSIONS = { read = "READ", write = "WRITE", readwrite = "READWRITE" }

local function range_end(fname, key, opts)
  if opts.prefix and opts.range_end then
    check.fail(fname, "options 'prefix' and 'range_end' exclude each other", 5)
  end
  return opts.prefix and kv.prefix_end(key) or opts.range_end
end

-- name -> { rpc, argument kinds, options spec, request builder, read-only }
-- The builder gets the checked arguments, then the options.
local SIMPLE = {
  auth_enable = { "Auth.AuthEnable", {}, TIMEOUT_ONLY, function() return {} end },
  auth_disable = { "Auth.AuthDisable", {}, TIMEOUT_ONLY, function() return {} end },
  user_add = { "Auth.UserAdd", { "string", "string" }, TIMEOUT_ONLY,
    function(name, password) return { name = name, password = password } end },
  user_delete = { "Auth.UserDelete", { "string" }, TIMEOUT_ONLY, function(name) return { name = name } end },
  user_get = { "Auth.UserGet", { "string" }, TIMEOUT_ONLY, function(name) return { name = name } end, true },
  user_list = { "Auth.UserList", {}, TIMEOUT_ONLY, function() return {} end, true },
  user_change_password = { "Auth.UserChangePassword", { "string", "string" }, TIMEOUT_ONLY,
    function(name, password) return { name = name, password = password } end },
  user_grant_role = { "Auth.UserGrantRole", { "string", "string" }, TIMEOUT_ONLY,
    function(user, role) return { user = user, role = role } end },
  user_revoke_role = { "Auth.UserRevokeRole", { "string", "string" }, TIMEOUT_ONLY,
    function(user, role) return { name = user, role = role } end },
  role_add = { "Auth.RoleAdd", { "string" }, TIMEOUT_ONLY, function(role) return { name = role } end },
  role_delete = { "Auth.RoleDelete", { "string" }, TIMEOUT_ONLY, function(role) return { role = role } end },
  role_get = { "Auth.RoleGet", { "string" }, TIMEOUT_ONLY, function(role) return { role = role } end, true },
  role_list = { "Auth.RoleList", {}, TIMEOUT_ONLY, function() return {} end, true },
  role_grant_permission = { "Auth.RoleGrantPermission", { "string", PERMISSIONS, "string" }, RANGE_OPTS,
    function(role, permission, key, opts)
      return { name = role, perm = { perm_type = PERMISSIONS[permission], key = key,
        range_end = range_end("role_grant_permission", key, opts) } }
    end },
  role_revoke_permission = { "Auth.RoleRevokePermission", { "string", "string" }, RANGE_OPTS,
    function(role, key, opts)
      return { role = role, key = key, range_end = range_end("role_revoke_permission", key, opts) }
    end },

  member_list = { "Cluster.MemberList", {}, TIMEOUT_ONLY, function() return {} end, true },
  member_add = { "Cluster.MemberAdd", { "table" }, { learner = "boolean", timeout = "number" },
    function(peer_urls, opts) return { peer_urls = peer_urls, is_learner = opts.learner } end },
  member_remove = { "Cluster.MemberRemove", { "id" }, TIMEOUT_ONLY, function(id) return { id = id } end },
  member_update = { "Cluster.MemberUpdate", { "id", "table" }, TIMEOUT_ONLY,
    function(id, peer_urls) return { id = id, peer_urls = peer_urls } end },
  member_promote = { "Cluster.MemberPromote", { "id" }, TIMEOUT_ONLY, function(id) return { id = id } end },

  alarm_list = { "Maintenance.Alarm", {}, TIMEOUT_ONLY,
    function() return { action = "GET", alarm = "NONE" } end, true },
}

-- Aimed at one member: (endpoint) first; nil means the current endpoint.
local AT_MEMBER = {
  status = { "Maintenance.Status", {}, TIMEOUT_ONLY, function() return {} end, true },
  defragment = { "Maintenance.Defragment", {}, TIMEOUT_ONLY, function() return {} end },
  hash_kv = { "Maintenance.HashKV", { "integer?" }, TIMEOUT_ONLY,
    function(revision) return { revision = revision or 0 } end, true },
}

local function checked_args(fname, kinds, ...)
  local args = { ... }
  for i, kind in ipairs(kinds) do
    local optional = type(kind) == "string" and kind:sub(-1) == "?"
    if not (optional and args[i] == nil) then
      check.arg(fname, i, args[i], optional and kind:sub(1, -2) or kind, 4)
    end
  end
  return args
end

--- Runs `spec` at the endpoint given (a temporary client when it is not one
-- of this client's, so the call reaches that member and no other).
local function at_endpoint(client, fname, endpoint, rpc, req, opts, readonly)
  if endpoint == nil then
    return client:_request(fname, rpc, req, opts.timeout, readonly)
  end
  local index = client:_endpoint_index(endpoint)
  if index then
    return client:_request(fname, rpc, req, opts.timeout, readonly, index)
  end
  local other, err = client:_sibling(endpoint)
  if not other then return nil, err end
  local res, rerr = other:_request(fname, rpc, req, opts.timeout, readonly)
  other:close()
  return res, rerr
end
_M.at_endpoint = at_endpoint

function _M.install(Client)
  for name, spec in pairs(SIMPLE) do
    local rpc, kinds, options, build, readonly = spec[1], spec[2], spec[3], spec[4], spec[5]
    Client[name] = function(self, ...)
      check.self(name, self, "Client")
      local n = #kinds
      local args = checked_args(name, kinds, ...)
      local opts = check.options(name, (select(n + 1, ...)), options)
      args[n + 1] = opts
      return self:_request(name, rpc, build((table.unpack or unpack)(args, 1, n + 1)), opts.timeout, readonly)
    end
  end

  for name, spec in pairs(AT_MEMBER) do
    local rpc, kinds, options, build, readonly = spec[1], spec[2], spec[3], spec[4], spec[5]
    Client[name] = function(self, endpoint, ...)
      check.self(name, self, "Client")
      if endpoint ~= nil then check.arg(name, 1, endpoint, "string") end
      local n = #kinds
      local args = checked_args(name, kinds, ...)
      local opts = check.options(name, (select(n + 1, ...)), options)
      args[n + 1] = opts
      return at_endpoint(self, name, endpoint, rpc,
        build((table.unpack or unpack)(args, 1, n + 1)), opts, readonly)
    end
  end

  --- client:auth_status() -> { enabled }: etcd 3.4 has no AuthStatus RPC;
  -- an Authenticate with a user that cannot exist tells (etcd answers
  -- "authentication is not enabled" only when it is off).
  function Client:auth_status(opts)
    check.self("auth_status", self, "Client")
    opts = check.options("auth_status", opts, TIMEOUT_ONLY)
    local _, err = self:_request("auth_status", "Auth.Authenticate",
      { name = "\1etcd3-auth-status-probe", password = "-" }, opts.timeout, true)
    if err and err.message == "etcdserver: authentication is not enabled" then
      return { enabled = false }
    elseif err and (err.code == "INVALID_ARGUMENT" or err.code == "FAILED_PRECONDITION") then
      return { enabled = true }
    end
    return nil, err or errors.new("UNKNOWN", 2, "unexpected answer to the auth probe", "Auth.Authenticate")
  end

  --- client:alarm_disarm([{ member_id, alarm }]) -> { header, alarms }:
  -- disarms the alarm given, or every raised alarm (as etcdctl does).
  function Client:alarm_disarm(opts)
    check.self("alarm_disarm", self, "Client")
    opts = check.options("alarm_disarm", opts,
      { member_id = "id", alarm = { nospace = "NOSPACE", corrupt = "CORRUPT" }, timeout = "number" })
    local targets
    if opts.member_id then
      targets = { { member_id = opts.member_id, alarm = opts.alarm and opts.alarm:upper() or "NOSPACE" } }
    else
      local list, err = self:alarm_list { timeout = opts.timeout }
      if not list then return nil, err end
      targets = list.alarms or {}
    end
    local res = { alarms = {} }
    for _, a in ipairs(targets) do
      local r, err = self:_request("alarm_disarm", "Maintenance.Alarm",
        { action = "DEACTIVATE", member_id = a.member_id, alarm = a.alarm }, opts.timeout, false)
      if not r then return nil, err end
      res.header = r.header
      for _, d in ipairs(r.alarms or {}) do res.alarms[#res.alarms + 1] = d end
    end
    return res
  end

  --- client:snapshot(path [, { endpoint, timeout }]) -> { size, revision }
  -- streams the member's backend database to `path` (written to
  -- path .. ".part", renamed when complete: no half file under `path`).
  function Client:snapshot(path, opts)
    check.self("snapshot", self, "Client")
    check.arg("snapshot", 1, path, "string")
    opts = check.options("snapshot", opts, { endpoint = "string", timeout = "number" })
    local handle = self:_handle("snapshot")
    local index = opts.endpoint and self:_endpoint_index(opts.endpoint)
    if opts.endpoint and not index then
      check.fail("snapshot", "option 'endpoint': not one of this client's endpoints")
    end
    local part = path .. ".part"
    local f, ferr = io.open(part, "wb")
    if not f then return nil, errors.new("UNKNOWN", 2, "cannot write the snapshot: " .. ferr, "Maintenance.Snapshot") end
    local stream = handle:snapshot(index or self:_pick(handle))
    local deadline = require("etcd3.core").now() + (opts.timeout or math.max(self.timeout, 60))
    local size, revision = 0, nil
    local err
    while true do
      local messages, ended, code, status, details = stream:poll()
      for _, m in ipairs(messages) do
        revision = revision or (m.header and m.header.revision)
        if m.blob then
          f:write(m.blob)
          size = size + #m.blob
        end
      end
      if ended then
        if code ~= "OK" then err = errors.new(code, status, details, "Maintenance.Snapshot") end
        break
      end
      local ready, werr = self._wait(self, stream, deadline)
      if not ready then
        err = werr or errors.new("DEADLINE_EXCEEDED", 4, "the snapshot did not complete in time", "Maintenance.Snapshot")
        break
      end
    end
    f:close()
    stream = nil -- luacheck: ignore 311 (collected: a stream cut short is cancelled)
    if err then
      os.remove(part)
      return nil, err
    end
    local ok, rerr = os.rename(part, path)
    if not ok then return nil, errors.new("UNKNOWN", 2, "cannot rename the snapshot: " .. rerr, "Maintenance.Snapshot") end
    return { size = size, revision = revision }
  end

  --- client:move_leader(id) -> { header }: sent to the current leader, as
  -- etcd requires.
  function Client:move_leader(id, opts)
    check.self("move_leader", self, "Client")
    check.arg("move_leader", 1, id, "id")
    opts = check.options("move_leader", opts, TIMEOUT_ONLY)
    local status, err = self:status(nil, opts)
    if not status then return nil, err end
    local members, merr = self:member_list(opts)
    if not members then return nil, merr end
    for _, m in ipairs(members.members or {}) do
      local url = m.id == status.leader and m.client_urls and m.client_urls[1]
      if url then
        return at_endpoint(self, "move_leader", url, "Maintenance.MoveLeader", { target_id = id }, opts, false)
      end
    end
    return nil, errors.new("UNAVAILABLE", 14, "the leader's client URL is unknown", "Maintenance.MoveLeader")
  end
end

return _M
