--- Auth administration, cluster membership and maintenance: thin methods
-- over etcd's Auth, Cluster and Maintenance RPCs (generated from a table,
-- so each is checked the same way). Signing in is auth.lua's.
local core = require "etcd3.core"
local check = require "etcd3.check"
local errors = require "etcd3.error"
local kv = require "etcd3.kv"
local endpoints = require "etcd3.endpoints"

local type, pairs, ipairs, select = type, pairs, ipairs, select
local io_open, os_remove, os_rename, math_max = io.open, os.remove, os.rename, math.max
local unpack = table.unpack or unpack -- luacheck: ignore 143 (unpack: Lua 5.1's global)
local now = core.now

local _M = {}

---@class etcd3.Member
---@field id string hex, without leading zeros (as `etcdctl member list` prints it)
---@field name string
---@field peer_urls string[]
---@field client_urls string[]
---@field is_learner boolean?

---@class etcd3.MemberListResult
---@field header etcd3.Header
---@field members etcd3.Member[]

---@class etcd3.MemberResult
---@field header etcd3.Header
---@field member etcd3.Member? the member added
---@field members etcd3.Member[] the members after the change

---@class etcd3.StatusResult
---@field header etcd3.Header
---@field version string etcd's version
---@field db_size integer
---@field leader string the leader's member ID
---@field raft_index integer
---@field raft_term integer

---@class etcd3.HashKvResult
---@field header etcd3.Header
---@field hash integer
---@field compact_revision integer

---@class etcd3.Alarm
---@field member_id string
---@field alarm "NOSPACE"|"CORRUPT"

---@class etcd3.AlarmResult
---@field header etcd3.Header
---@field alarms etcd3.Alarm[]

---@class etcd3.AlarmDisarmOptions: etcd3.TimeoutOptions
---@field member_id? string|integer with `alarm`: disarm this one alarm only
---@field alarm? "nospace"|"corrupt"

---@class etcd3.SnapshotOptions: etcd3.TimeoutOptions
---@field endpoint? string one of the client's endpoints (default: the current one)

---@class etcd3.SnapshotResult
---@field size integer bytes written
---@field revision integer? the store's revision in the snapshot

---@class etcd3.PermissionOptions: etcd3.TimeoutOptions
---@field prefix? boolean every key starting with `key`
---@field range_end? string the keys in [key, range_end)

---@class etcd3.MemberAddOptions: etcd3.TimeoutOptions
---@field learner? boolean add the member as a learner

---@alias etcd3.Permission "read"|"write"|"readwrite"
---@alias etcd3.Response table|etcd3.HeaderResult etcd's response, with etcd's field names

local TIMEOUT_ONLY = check.TIMEOUT_ONLY
local PERMISSION_OPTIONS = { prefix = "boolean", range_end = "string", timeout = "number" }
local PERMISSIONS = { read = "READ", write = "WRITE", readwrite = "READWRITE" }

-- Raises at the user's call:
-- fail -> range_end -> builder -> checked_request -> method -> user
local BUILDER_USER = 6

local function permission_range_end(fname, key, opts)
  return kv.range_end(fname, key, opts, PERMISSION_OPTIONS, BUILDER_USER)
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
  role_grant_permission = { "Auth.RoleGrantPermission", { "string", PERMISSIONS, "string" }, PERMISSION_OPTIONS,
    function(role, permission, key, opts)
      return { name = role, perm = { perm_type = PERMISSIONS[permission], key = key,
        range_end = permission_range_end("role_grant_permission", key, opts) } }
    end },
  role_revoke_permission = { "Auth.RoleRevokePermission", { "string", "string" }, PERMISSION_OPTIONS,
    function(role, key, opts)
      return { role = role, key = key, range_end = permission_range_end("role_revoke_permission", key, opts) }
    end },

  member_list = { "Cluster.MemberList", {}, TIMEOUT_ONLY, function() return {} end, true },
  member_add = { "Cluster.MemberAdd", { "strings" }, { learner = "boolean", timeout = "number" },
    function(peer_urls, opts) return { peer_urls = peer_urls, is_learner = opts.learner } end },
  member_remove = { "Cluster.MemberRemove", { "id" }, TIMEOUT_ONLY, function(id) return { id = id } end },
  member_update = { "Cluster.MemberUpdate", { "id", "strings" }, TIMEOUT_ONLY,
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

-- Checks the arguments `kinds` describes (a kind ending in "?" may be
-- nil), then the options table after them; returns the request `build`
-- makes of them, and the options.
local function checked_request(fname, kinds, options, build, ...)
  local count = #kinds
  local args = { ... }
  for i, kind in ipairs(kinds) do
    local optional = type(kind) == "string" and kind:sub(-1) == "?"
    if not (optional and args[i] == nil) then
      check.arg(fname, i, args[i], optional and kind:sub(1, -2) or kind, 4) -- check -> here -> method -> user
    end
  end
  local opts = check.options(fname, (select(count + 1, ...)), options, 4)
  args[count + 1] = opts
  return build(unpack(args, 1, count + 1)), opts
end

--- Runs the RPC at the endpoint given (a temporary client when it is not
-- one of this client's, so the call reaches that member and no other).
local function at_endpoint(client, fname, endpoint, rpc, req, opts, readonly)
  if endpoint == nil then
    return client:_request(fname, rpc, req, opts.timeout, readonly)
  end
  local index = client._endpoints:index(endpoint)
  if index then
    return client:_request(fname, rpc, req, opts.timeout, readonly, index)
  end
  -- check -> endpoints.check -> at_endpoint -> the admin method -> user
  endpoints.check(fname, endpoint, 5)
  local other, err = client:_sibling(endpoint)
  if not other then return nil, err end
  local res, request_err = other:_request(fname, rpc, req, opts.timeout, readonly)
  other:close()
  return res, request_err
end

-- The client's admin methods (init.lua adds them to the client class) -------

-- luacheck: push no max line length (one annotation a line)
--- Generated from the tables above:
---@class etcd3.Client
---@field auth_enable fun(self: etcd3.Client, opts?: etcd3.TimeoutOptions): etcd3.HeaderResult?, etcd3.Error?
---@field auth_disable fun(self: etcd3.Client, opts?: etcd3.TimeoutOptions): etcd3.HeaderResult?, etcd3.Error?
---@field user_add fun(self: etcd3.Client, name: string, password: string, opts?: etcd3.TimeoutOptions): etcd3.HeaderResult?, etcd3.Error?
---@field user_delete fun(self: etcd3.Client, name: string, opts?: etcd3.TimeoutOptions): etcd3.HeaderResult?, etcd3.Error?
---@field user_get fun(self: etcd3.Client, name: string, opts?: etcd3.TimeoutOptions): { header: etcd3.Header, roles: string[] }?, etcd3.Error?
---@field user_list fun(self: etcd3.Client, opts?: etcd3.TimeoutOptions): { header: etcd3.Header, users: string[] }?, etcd3.Error?
---@field user_change_password fun(self: etcd3.Client, name: string, password: string, opts?: etcd3.TimeoutOptions): etcd3.HeaderResult?, etcd3.Error?
---@field user_grant_role fun(self: etcd3.Client, user: string, role: string, opts?: etcd3.TimeoutOptions): etcd3.HeaderResult?, etcd3.Error?
---@field user_revoke_role fun(self: etcd3.Client, user: string, role: string, opts?: etcd3.TimeoutOptions): etcd3.HeaderResult?, etcd3.Error?
---@field role_add fun(self: etcd3.Client, role: string, opts?: etcd3.TimeoutOptions): etcd3.HeaderResult?, etcd3.Error?
---@field role_delete fun(self: etcd3.Client, role: string, opts?: etcd3.TimeoutOptions): etcd3.HeaderResult?, etcd3.Error?
---@field role_get fun(self: etcd3.Client, role: string, opts?: etcd3.TimeoutOptions): { header: etcd3.Header, perm: table[] }?, etcd3.Error?
---@field role_list fun(self: etcd3.Client, opts?: etcd3.TimeoutOptions): { header: etcd3.Header, roles: string[] }?, etcd3.Error?
---@field role_grant_permission fun(self: etcd3.Client, role: string, permission: etcd3.Permission, key: string, opts?: etcd3.PermissionOptions): etcd3.HeaderResult?, etcd3.Error?
---@field role_revoke_permission fun(self: etcd3.Client, role: string, key: string, opts?: etcd3.PermissionOptions): etcd3.HeaderResult?, etcd3.Error?
---@field member_list fun(self: etcd3.Client, opts?: etcd3.TimeoutOptions): etcd3.MemberListResult?, etcd3.Error?
---@field member_add fun(self: etcd3.Client, peer_urls: string[], opts?: etcd3.MemberAddOptions): etcd3.MemberResult?, etcd3.Error?
---@field member_remove fun(self: etcd3.Client, id: string|integer, opts?: etcd3.TimeoutOptions): etcd3.MemberResult?, etcd3.Error?
---@field member_update fun(self: etcd3.Client, id: string|integer, peer_urls: string[], opts?: etcd3.TimeoutOptions): etcd3.MemberResult?, etcd3.Error?
---@field member_promote fun(self: etcd3.Client, id: string|integer, opts?: etcd3.TimeoutOptions): etcd3.MemberResult?, etcd3.Error?
---@field alarm_list fun(self: etcd3.Client, opts?: etcd3.TimeoutOptions): etcd3.AlarmResult?, etcd3.Error?
---@field status fun(self: etcd3.Client, endpoint?: string, opts?: etcd3.TimeoutOptions): etcd3.StatusResult?, etcd3.Error?
---@field defragment fun(self: etcd3.Client, endpoint?: string, opts?: etcd3.TimeoutOptions): etcd3.HeaderResult?, etcd3.Error?
---@field hash_kv fun(self: etcd3.Client, endpoint?: string, revision?: integer, opts?: etcd3.TimeoutOptions): etcd3.HashKvResult?, etcd3.Error?
local Client = {}
-- luacheck: pop
_M.client_methods = Client

for name, spec in pairs(SIMPLE) do
  local rpc, kinds, options, build, readonly = spec[1], spec[2], spec[3], spec[4], spec[5]
  Client[name] = function(self, ...)
    check.self(name, self, "Client")
    local req, opts = checked_request(name, kinds, options, build, ...)
    return self:_request(name, rpc, req, opts.timeout, readonly)
  end
end

for name, spec in pairs(AT_MEMBER) do
  local rpc, kinds, options, build, readonly = spec[1], spec[2], spec[3], spec[4], spec[5]
  Client[name] = function(self, endpoint, ...)
    check.self(name, self, "Client")
    if endpoint ~= nil then check.arg(name, 1, endpoint, "string") end
    local req, opts = checked_request(name, kinds, options, build, ...)
    return at_endpoint(self, name, endpoint, rpc, req, opts, readonly)
  end
end

--- Whether auth is enabled. etcd 3.4 has no AuthStatus RPC: an
-- Authenticate with a user that cannot exist tells (etcd answers
-- "authentication is not enabled" only when it is off).
---@param opts? etcd3.TimeoutOptions
---@return { enabled: boolean }? result
---@return etcd3.Error? err
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
  return nil, err or errors.new("UNKNOWN", "unexpected answer to the auth probe", "Auth.Authenticate")
end

--- Disarms the alarm given, or every raised alarm (as etcdctl does).
---@param opts? etcd3.AlarmDisarmOptions
---@return etcd3.AlarmResult? result the alarms disarmed
---@return etcd3.Error? err
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
  for _, alarm in ipairs(targets) do
    local disarmed, err = self:_request("alarm_disarm", "Maintenance.Alarm",
      { action = "DEACTIVATE", member_id = alarm.member_id, alarm = alarm.alarm }, opts.timeout, false)
    if not disarmed then return nil, err end
    res.header = disarmed.header
    for _, each in ipairs(disarmed.alarms or {}) do res.alarms[#res.alarms + 1] = each end
  end
  return res
end

local function snapshot_error(message)
  return errors.new("UNKNOWN", message, "Maintenance.Snapshot")
end

--- Streams the member's backend database to `path` (written to
-- path .. ".part", renamed when complete: no half file under `path`).
---@param path string
---@param opts? etcd3.SnapshotOptions
---@return etcd3.SnapshotResult? result
---@return etcd3.Error? err
function Client:snapshot(path, opts)
  check.self("snapshot", self, "Client")
  check.arg("snapshot", 1, path, "string")
  opts = check.options("snapshot", opts, { endpoint = "string", timeout = "number" })
  local handle = self:_handle("snapshot")
  local index = opts.endpoint and self._endpoints:index(opts.endpoint)
  if opts.endpoint and not index then
    check.fail("snapshot", "option 'endpoint': not one of this client's endpoints")
  end
  local part = path .. ".part"
  local file, open_err = io_open(part, "wb")
  if not file then return nil, snapshot_error("cannot write the snapshot: " .. open_err) end
  local stream = handle:snapshot(index or handle:pick())
  local deadline = now() + (opts.timeout or math_max(self.timeout, 60))
  local size, revision = 0, nil
  local err
  while true do
    local messages, ended, code, _, details = stream:poll()
    for _, message in ipairs(messages) do
      revision = revision or (message.header and message.header.revision)
      if message.blob then
        file:write(message.blob)
        size = size + #message.blob
      end
    end
    if ended then
      if code ~= "OK" then err = errors.new(code, details, "Maintenance.Snapshot") end
      break
    end
    local ready, wait_err = self._wait(self, stream, deadline)
    if not ready then
      err = wait_err or errors.new("DEADLINE_EXCEEDED", "the snapshot did not complete in time", "Maintenance.Snapshot")
      break
    end
  end
  file:close()
  stream = nil -- luacheck: ignore 311 (collected: a stream cut short is cancelled)
  if err then
    os_remove(part)
    return nil, err
  end
  local ok, rename_err = os_rename(part, path)
  if not ok then return nil, snapshot_error("cannot rename the snapshot: " .. rename_err) end
  return { size = size, revision = revision }
end

--- Makes member `id` the leader; sent to the current leader, as etcd
-- requires.
---@param id string|integer member ID
---@param opts? etcd3.TimeoutOptions
---@return etcd3.HeaderResult? result
---@return etcd3.Error? err
function Client:move_leader(id, opts)
  check.self("move_leader", self, "Client")
  check.arg("move_leader", 1, id, "id")
  opts = check.options("move_leader", opts, TIMEOUT_ONLY)
  local status, err = self:status(nil, opts)
  if not status then return nil, err end
  local members, members_err = self:member_list(opts)
  if not members then return nil, members_err end
  for _, member in ipairs(members.members or {}) do
    local url = member.id == status.leader and member.client_urls and member.client_urls[1]
    if url then
      return at_endpoint(self, "move_leader", url, "Maintenance.MoveLeader", { target_id = id }, opts, false)
    end
  end
  return nil, errors.new("UNAVAILABLE", "the leader's client URL is unknown", "Maintenance.MoveLeader")
end

return _M
