--- KV: get, put, delete, compact, pages; the request builders that txn
-- ops reuse (lua/etcd3/txn.lua builds the same requests); and the one
-- reader of the range options (prefix / range_end / from_key) that every
-- call over a range of keys shares (kv, watch, txn compares, permissions).
local check = require "etcd3.check"

local pairs, ipairs, type, string_char = pairs, ipairs, type, string.char
local NO_OPTIONS = check.NO_OPTIONS

local _M = {}

---@class etcd3.Header
---@field cluster_id string hex, without leading zeros (as etcdctl prints it)
---@field member_id string hex, without leading zeros: the member that answered
---@field revision integer the store's revision when the request was served
---@field raft_term integer

---@class etcd3.KeyValue
---@field key string
---@field value string
---@field create_revision integer
---@field mod_revision integer
---@field version integer
---@field lease string? the lease ID (16 hex digits), absent without one

---@class etcd3.RangeResult
---@field header etcd3.Header
---@field kvs etcd3.KeyValue[]
---@field more boolean more keys in the range than returned (limit)
---@field count integer keys in the range

---@class etcd3.PutResult
---@field header etcd3.Header
---@field prev_kv etcd3.KeyValue? with `prev_kv = true`, the key as it was

---@class etcd3.DeleteResult
---@field header etcd3.Header
---@field deleted integer keys deleted
---@field prev_kvs etcd3.KeyValue[]? with `prev_kv = true`, the keys as they were

---@class etcd3.HeaderResult
---@field header etcd3.Header

---@class etcd3.TimeoutOptions
---@field timeout? number seconds, overriding the client's

---@class etcd3.RangeOptions
---@field prefix? boolean every key starting with `key`
---@field range_end? string the keys in [key, range_end)
---@field from_key? boolean every key >= `key`

---@class etcd3.GetOptions: etcd3.RangeOptions, etcd3.TimeoutOptions
---@field limit? integer
---@field revision? integer read the store as it was at that revision
---@field sort_order? "none"|"ascend"|"descend"
---@field sort_target? "key"|"version"|"create"|"mod"|"value"
---@field serializable? boolean served by the member asked, without consensus
---@field keys_only? boolean
---@field count_only? boolean
---@field min_mod_revision? integer
---@field max_mod_revision? integer
---@field min_create_revision? integer
---@field max_create_revision? integer

---@class etcd3.PutOptions: etcd3.TimeoutOptions
---@field lease? string|integer attach the key to this lease ID
---@field prev_kv? boolean return the key as it was
---@field ignore_value? boolean keep the current value (value may be nil)
---@field ignore_lease? boolean keep the current lease

---@class etcd3.DeleteOptions: etcd3.RangeOptions, etcd3.TimeoutOptions
---@field prev_kv? boolean return the keys as they were

---@class etcd3.CompactOptions: etcd3.TimeoutOptions
---@field physical? boolean return once the compaction is physically applied

---@class etcd3.PagesOptions: etcd3.GetOptions
---@field page_size? integer keys per page (1000)

--- The range end that covers every key starting with `prefix`: the prefix
-- with its last byte below 0xff incremented and what follows dropped; "\0"
-- (every key from `prefix` on) when there is no such byte.
---@param prefix string
---@return string range_end
function _M.prefix_end(prefix)
  check.arg("prefix_end", 1, prefix, "string")
  for i = #prefix, 1, -1 do
    local byte = prefix:byte(i)
    if byte < 0xff then return prefix:sub(1, i - 1) .. string_char(byte + 1) end
  end
  return "\0"
end

-- The range options ---------------------------------------------------------
-- Every function here that raises takes `level`: the error level of the
-- user's call as seen from that function (what it passes to check.*).

--- The range end asked for by the options prefix, range_end and (where the
-- call's `spec` accepts it) from_key: at most one of them; nil for a
-- single key.
---@param fname string the public function, for error messages
---@param key string
---@param opts etcd3.RangeOptions checked against `spec`
---@param spec table the call's options spec
---@param level integer
---@return string? range_end
function _M.range_end(fname, key, opts, spec, level)
  local prefix, range_end, from_key = opts.prefix, opts.range_end, opts.from_key
  -- a single key, the common case: nothing to count
  if not (prefix or range_end or from_key) then return nil end
  if (prefix and 1 or 0) + (range_end and 1 or 0) + (from_key and 1 or 0) > 1 then
    check.fail(fname, spec.from_key and "options 'prefix', 'range_end' and 'from_key' exclude each other"
      or "options 'prefix' and 'range_end' exclude each other", level)
  end
  if prefix then return _M.prefix_end(key) end
  if from_key then return "\0" end
  return range_end
end

--- etcd refuses an empty key: a prefix or from_key range over "" means
-- every key, which starts at "\0" (as clientv3's WithPrefix/WithFromKey).
local function range_key(key, opts)
  if key == "" and (opts.prefix or opts.from_key) then return "\0" end
  return key
end

--- Checks the key and the options of a call over a range (argument 1 is
-- the key); returns the options and the request's key and range end.
---@return table opts
---@return string key
---@return string? range_end
function _M.checked_range(fname, key, opts, spec, level)
  check.arg(fname, 1, key, "string", level)
  opts = check.options(fname, opts, spec, level)
  return opts, range_key(key, opts), _M.range_end(fname, key, opts, spec, level + 1)
end
local checked_range = _M.checked_range

-- Requests ------------------------------------------------------------------

local SORT_ORDER = { none = "NONE", ascend = "ASCEND", descend = "DESCEND" }
local SORT_TARGET = { key = "KEY", version = "VERSION", create = "CREATE", mod = "MOD", value = "VALUE" }

local GET_OPTIONS = {
  prefix = "boolean", range_end = "string", from_key = "boolean",
  limit = "integer", revision = "integer", sort_order = SORT_ORDER,
  sort_target = SORT_TARGET, serializable = "boolean", keys_only = "boolean",
  count_only = "boolean", min_mod_revision = "integer",
  max_mod_revision = "integer", min_create_revision = "integer",
  max_create_revision = "integer", timeout = "number",
}
-- GET_OPTIONS that are RangeRequest fields: true copies the value, a table
-- maps it to the enum's name (prefix, range_end, from_key: the range end;
-- timeout: the call's)
local RANGE_FIELDS = {
  limit = true, revision = true, sort_order = SORT_ORDER, sort_target = SORT_TARGET,
  serializable = true, keys_only = true, count_only = true, min_mod_revision = true,
  max_mod_revision = true, min_create_revision = true, max_create_revision = true,
}
local PUT_OPTIONS = {
  lease = "id", prev_kv = "boolean", ignore_value = "boolean",
  ignore_lease = "boolean", timeout = "number",
}
local DELETE_OPTIONS = {
  prefix = "boolean", range_end = "string", from_key = "boolean",
  prev_kv = "boolean", timeout = "number",
}
local COMPACT_OPTIONS = { physical = "boolean", timeout = "number" }
local PAGES_OPTIONS = { page_size = "integer" }
for k, v in pairs(GET_OPTIONS) do PAGES_OPTIONS[k] = v end

--- A RangeRequest and the checked options.
function _M.range_request(fname, key, opts, level)
  -- the common case, one key without options: nothing to read or check
  if opts == nil and type(key) == "string" then return { key = key }, NO_OPTIONS end
  local request_key, request_end
  opts, request_key, request_end = checked_range(fname, key, opts, GET_OPTIONS, level + 1)
  local req = { key = request_key, range_end = request_end }
  -- only the options given (checked above) reach the request
  for name, value in pairs(opts) do
    local field = RANGE_FIELDS[name]
    if field == true then req[name] = value elseif field then req[name] = field[value] end
  end
  return req, opts
end

--- A PutRequest and the checked options.
function _M.put_request(fname, key, value, opts, level)
  if opts == nil and type(key) == "string" and type(value) == "string" then
    return { key = key, value = value }, NO_OPTIONS
  end
  check.arg(fname, 1, key, "string", level)
  opts = check.options(fname, opts, PUT_OPTIONS, level)
  if opts.ignore_value then
    if value ~= nil then check.arg(fname, 2, value, "string", level) end
  else
    check.arg(fname, 2, value, "string", level)
  end
  return {
    key = key, value = value, lease = opts.lease, prev_kv = opts.prev_kv,
    ignore_value = opts.ignore_value, ignore_lease = opts.ignore_lease,
  }, opts
end

--- A DeleteRangeRequest and the checked options.
function _M.delete_request(fname, key, opts, level)
  local request_key, request_end
  opts, request_key, request_end = checked_range(fname, key, opts, DELETE_OPTIONS, level + 1)
  return { key = request_key, range_end = request_end, prev_kv = opts.prev_kv }, opts
end

-- The client's KV methods ---------------------------------------------------
-- (init.lua adds every service's methods to the client class)

local USER = 4 -- check -> builder -> method -> user

---@class etcd3.Client
local Client = {}
_M.client_methods = Client

--- Sends a request a builder made, with the options it checked.
local function send(client, fname, rpc, idempotent, req, opts)
  return client:_request(fname, rpc, req, opts.timeout, idempotent)
end

--- Reads one key, or a range with `prefix`, `range_end` or `from_key`.
---@param key string
---@param opts? etcd3.GetOptions
---@return etcd3.RangeResult? result
---@return etcd3.Error? err
function Client:get(key, opts)
  check.self("get", self, "Client")
  return send(self, "get", "KV.Range", true, _M.range_request("get", key, opts, USER))
end

--- Writes one key.
---@param key string
---@param value string? nil only with `ignore_value`
---@param opts? etcd3.PutOptions
---@return etcd3.PutResult? result
---@return etcd3.Error? err
function Client:put(key, value, opts)
  check.self("put", self, "Client")
  return send(self, "put", "KV.Put", false, _M.put_request("put", key, value, opts, USER))
end

--- Deletes one key, or a range with `prefix`, `range_end` or `from_key`.
---@param key string
---@param opts? etcd3.DeleteOptions
---@return etcd3.DeleteResult? result
---@return etcd3.Error? err
function Client:delete(key, opts)
  check.self("delete", self, "Client")
  return send(self, "delete", "KV.DeleteRange", false, _M.delete_request("delete", key, opts, USER))
end

--- Drops the history before `revision`.
---@param revision integer
---@param opts? etcd3.CompactOptions
---@return etcd3.HeaderResult? result
---@return etcd3.Error? err
function Client:compact(revision, opts)
  check.self("compact", self, "Client")
  check.arg("compact", 1, revision, "integer")
  opts = check.options("compact", opts, COMPACT_OPTIONS)
  return self:_request("compact", "KV.Compact",
    { revision = revision, physical = opts.physical }, opts.timeout, false)
end

--- An iterator over a large range, one page (an array of kv) per step, all
-- read at the revision of the first page. On failure the iterator
-- returns false, err once, then stops.
---@param key string
---@param opts? etcd3.PagesOptions
---@return fun(): (etcd3.KeyValue[]|false|nil), etcd3.Error?
function Client:pages(key, opts)
  check.self("pages", self, "Client")
  opts = check.options("pages", opts, PAGES_OPTIONS)
  for _, name in ipairs { "limit", "sort_order", "sort_target", "count_only" } do
    if opts[name] ~= nil then
      check.fail("pages", ("option '%s' does not apply to pages (they go by key, ascending)"):format(name))
    end
  end
  local page_size = opts.page_size or 1000
  if page_size < 1 then check.fail("pages", "option 'page_size' must be >= 1") end
  local get_opts = {}
  for k, v in pairs(opts) do if k ~= "page_size" then get_opts[k] = v end end
  local req = _M.range_request("pages", key, get_opts, USER)
  req.limit, req.sort_order, req.sort_target = page_size, "ASCEND", "KEY"
  local done = false
  return function()
    if done then return nil end
    local res, err = self:_request("pages", "KV.Range", req, get_opts.timeout, true)
    if not res then
      done = true
      return false, err
    end
    -- Pin every later page to the revision of the first (a response's
    -- header always carries the newest revision, so only the first counts).
    req.revision = req.revision or res.header.revision
    local kvs = res.kvs
    if not res.more or #kvs == 0 then
      done = true
      if #kvs == 0 then return nil end
    else
      req.key = kvs[#kvs].key .. "\0"
      if not req.range_end then done = true end
    end
    return kvs
  end
end

return _M
