--- KV: get, put, delete, compact, pages, and the request builders that
-- txn ops reuse (lua/etcd3/txn.lua builds the same requests).
local check = require "etcd3.check"
local errors = require "etcd3.error"

local _M = {}

--- The range end that covers every key starting with `prefix`: the prefix
-- with its last byte below 0xff incremented and what follows dropped; "\0"
-- (every key from `prefix` on) when there is no such byte.
function _M.prefix_end(prefix)
  check.arg("prefix_end", 1, prefix, "string")
  for i = #prefix, 1, -1 do
    local b = prefix:byte(i)
    if b < 0xff then return prefix:sub(1, i - 1) .. string.char(b + 1) end
  end
  return "\0"
end

local SORT_ORDER = { none = "NONE", ascend = "ASCEND", descend = "DESCEND" }
local SORT_TARGET = { key = "KEY", version = "VERSION", create = "CREATE", mod = "MOD", value = "VALUE" }

local RANGE_KEYS = { prefix = "boolean", range_end = "string", from_key = "boolean" }

_M.GET_OPTS = {
  prefix = "boolean", range_end = "string", from_key = "boolean",
  limit = "integer", revision = "integer", sort_order = SORT_ORDER,
  sort_target = SORT_TARGET, serializable = "boolean", keys_only = "boolean",
  count_only = "boolean", min_mod_revision = "integer",
  max_mod_revision = "integer", min_create_revision = "integer",
  max_create_revision = "integer", timeout = "number",
}
_M.PUT_OPTS = {
  lease = "id", prev_kv = "boolean", ignore_value = "boolean",
  ignore_lease = "boolean", timeout = "number",
}
_M.DELETE_OPTS = {
  prefix = "boolean", range_end = "string", from_key = "boolean",
  prev_kv = "boolean", timeout = "number",
}
local COMPACT_OPTS = { physical = "boolean", timeout = "number" }
local PAGES_OPTS = { page_size = "integer" }
for k, v in pairs(_M.GET_OPTS) do PAGES_OPTS[k] = v end

--- range_end from the prefix / range_end / from_key options (at most one).
local function range_end(fname, key, opts, level)
  local given = 0
  for k in pairs(RANGE_KEYS) do if opts[k] then given = given + 1 end end
  if given > 1 then
    check.fail(fname, "options 'prefix', 'range_end' and 'from_key' exclude each other", level)
  end
  if opts.prefix then return _M.prefix_end(key) end
  if opts.from_key then return "\0" end
  return opts.range_end
end

--- etcd refuses an empty key: a prefix or from_key range over "" means
-- every key, which starts at "\0" (as clientv3's WithPrefix/WithFromKey).
function _M.range_key(key, opts)
  if key == "" and (opts.prefix or opts.from_key) then return "\0" end
  return key
end

-- Every builder checks at `level`, the error level that points at the
-- user's call through the public function that called it.

-- Checks key and options of a call over a range; returns the options
-- and the request's key and range end.
local function ranged(fname, key, opts, spec, level)
  check.arg(fname, 1, key, "string", level + 1)
  opts = check.options(fname, opts, spec, level + 1)
  return opts, _M.range_key(key, opts), range_end(fname, key, opts, level + 1)
end

function _M.range_request(fname, key, opts, level)
  local range_key, end_key
  opts, range_key, end_key = ranged(fname, key, opts, _M.GET_OPTS, level)
  return {
    key = range_key, range_end = end_key,
    limit = opts.limit, revision = opts.revision,
    sort_order = opts.sort_order and SORT_ORDER[opts.sort_order],
    sort_target = opts.sort_target and SORT_TARGET[opts.sort_target],
    serializable = opts.serializable, keys_only = opts.keys_only,
    count_only = opts.count_only,
    min_mod_revision = opts.min_mod_revision, max_mod_revision = opts.max_mod_revision,
    min_create_revision = opts.min_create_revision,
    max_create_revision = opts.max_create_revision,
  }, opts
end

function _M.put_request(fname, key, value, opts, level)
  check.arg(fname, 1, key, "string", level)
  opts = check.options(fname, opts, _M.PUT_OPTS, level)
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

function _M.delete_request(fname, key, opts, level)
  local range_key, end_key
  opts, range_key, end_key = ranged(fname, key, opts, _M.DELETE_OPTS, level)
  return { key = range_key, range_end = end_key, prev_kv = opts.prev_kv }, opts
end

-- Methods added to the client class -----------------------------------

local USER = 4 -- builder -> check -> method -> user

function _M.install(Client)
  --- client:get(key [, opts]) -> { header, kvs, more, count } | nil, err
  function Client:get(key, opts)
    check.self("get", self, "Client")
    local req
    req, opts = _M.range_request("get", key, opts, USER)
    return self:_request("get", "KV.Range", req, opts.timeout, true)
  end

  --- client:put(key, value [, opts]) -> { header, prev_kv } | nil, err
  function Client:put(key, value, opts)
    check.self("put", self, "Client")
    local req
    req, opts = _M.put_request("put", key, value, opts, USER)
    return self:_request("put", "KV.Put", req, opts.timeout, false)
  end

  --- client:delete(key [, opts]) -> { header, deleted, prev_kvs } | nil, err
  function Client:delete(key, opts)
    check.self("delete", self, "Client")
    local req
    req, opts = _M.delete_request("delete", key, opts, USER)
    return self:_request("delete", "KV.DeleteRange", req, opts.timeout, false)
  end

  --- client:compact(revision [, opts]) -> { header } | nil, err
  function Client:compact(revision, opts)
    check.self("compact", self, "Client")
    check.arg("compact", 1, revision, "integer")
    opts = check.options("compact", opts, COMPACT_OPTS)
    return self:_request("compact", "KV.Compact",
      { revision = revision, physical = opts.physical }, opts.timeout, false)
  end

  --- client:pages(key [, opts]) -> iterator over pages (arrays of kv), all
  -- read at the revision of the first page. On failure the iterator
  -- returns false, err once, then stops.
  function Client:pages(key, opts)
    check.self("pages", self, "Client")
    opts = check.options("pages", opts, PAGES_OPTS)
    for _, k in ipairs { "limit", "sort_order", "sort_target", "count_only" } do
      if opts[k] ~= nil then
        check.fail("pages", ("option '%s' does not apply to pages (they go by key, ascending)"):format(k))
      end
    end
    local page_size = opts.page_size or 1000
    if page_size < 1 then check.fail("pages", "option 'page_size' must be >= 1") end
    local get_opts = {}
    for k, v in pairs(opts) do if k ~= "page_size" then get_opts[k] = v end end
    local req = _M.range_request("pages", key, get_opts, 3)
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
end

_M.is_error = errors.is_error

return _M
