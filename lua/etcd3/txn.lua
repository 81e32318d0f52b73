--- Transactions: compares, ops and the builder, in pure Lua.
--
-- A transaction is described by Lua objects and encoded by the C core into
-- one TxnRequest:
--
--   local cmp, op = etcd3.compare, etcd3.op
--   cli:txn()
--     :when(cmp.value("/hi"):eq("hello"))
--     :success(op.get("/hi"))
--     :failure(op.get("/test/", { prefix = true }))
--     :commit()
--
-- Every check happens while the description is built, so a bad compare or
-- op raises before anything is sent.
local check = require "etcd3.check"
local kv = require "etcd3.kv"

local type, ipairs, select, setmetatable, getmetatable = type, ipairs, select, setmetatable, getmetatable
local tostring, next = tostring, next
local unpack = table.unpack or unpack -- luacheck: ignore

local function unpack_list(t) return unpack(t or {}) end

local _M = {}

-- Compares --------------------------------------------------------------

local Compare = {}
Compare.__index = Compare

-- target name -> proto enum, the oneof field holding the value, its kind
local TARGETS = {
  value = { "VALUE", "value", "string" },
  version = { "VERSION", "version", "integer" },
  create_revision = { "CREATE", "create_revision", "integer" },
  mod_revision = { "MOD", "mod_revision", "integer" },
  lease = { "LEASE", "lease", "id" },
}
-- clientv3's short names for the clientv3 form
TARGETS.create = TARGETS.create_revision
TARGETS.mod = TARGETS.mod_revision

local RESULTS = { eq = "EQUAL", ne = "NOT_EQUAL", lt = "LESS", gt = "GREATER" }
local OPERATORS = { ["="] = "eq", ["=="] = "eq", ["!="] = "ne", ["<"] = "lt", [">"] = "gt" }

local Target = {}
Target.__index = Target

local COMPARE_OPTS = { prefix = "boolean", range_end = "string" }

local function new_target(name, key, opts, level)
  local fname = "compare." .. name
  check.arg(fname, 1, key, "string", level)
  opts = check.options(fname, opts, COMPARE_OPTS, level)
  if opts.prefix and opts.range_end then
    check.fail(fname, "options 'prefix' and 'range_end' exclude each other", level)
  end
  return setmetatable({
    name = name, spec = TARGETS[name], key = key,
    range_end = opts.prefix and kv.prefix_end(key) or opts.range_end,
  }, Target)
end

local function compare_with(target, method, v, level)
  local spec = target.spec
  local fname = ("compare.%s(...):%s"):format(target.name, method)
  check.arg(fname, 1, v, spec[3], level)
  local req = { result = RESULTS[method], target = spec[1], key = target.key, range_end = target.range_end }
  req[spec[2]] = v
  return setmetatable({ req = req }, Compare)
end

for method in pairs(RESULTS) do
  Target[method] = function(self, v)
    if getmetatable(self) ~= Target then
      check.fail("compare", ("use cmp.<target>(key):%s(value)"):format(method))
    end
    return compare_with(self, method, v, 4)
  end
end

--- etcd3.compare: the targets as functions, and callable in clientv3's form
-- etcd3.compare(target, key, "=", v).
_M.compare = setmetatable({}, {
  __call = function(_, target, key, operator, v)
    if type(target) ~= "string" or not TARGETS[target] then
      check.fail("compare", ("unknown target %q (value, version, create_revision, mod_revision, lease)"):format(
        tostring(target)))
    end
    local method = OPERATORS[operator]
    if not method then
      check.fail("compare", ("unknown operator %q (=, !=, <, >)"):format(tostring(operator)))
    end
    return compare_with(new_target(target, key, nil, 4), method, v, 4)
  end,
})
for name in pairs(TARGETS) do
  _M.compare[name] = function(key, opts) return new_target(name, key, opts, 4) end
end

function _M.is_compare(v) return getmetatable(v) == Compare end

-- Ops -------------------------------------------------------------------

local Op = {}
Op.__index = Op

local function new_op(field, req, readonly)
  return setmetatable({ field = field, req = req, readonly = readonly }, Op)
end

-- An op's options are those of the plain call, less `timeout` (the
-- transaction has one deadline, commit's).
local function without_timeout(fname, opts)
  if type(opts) == "table" and opts.timeout ~= nil then
    check.fail(fname, "option 'timeout' belongs to commit(), not to an op", 5)
  end
end

_M.op = {}

function _M.op.get(key, opts)
  without_timeout("op.get", opts)
  return new_op("request_range", (kv.range_request("op.get", key, opts, 4)), true)
end

function _M.op.put(key, value, opts)
  without_timeout("op.put", opts)
  return new_op("request_put", (kv.put_request("op.put", key, value, opts, 4)), false)
end

function _M.op.delete(key, opts)
  without_timeout("op.delete", opts)
  return new_op("request_delete_range", (kv.delete_request("op.delete", key, opts, 4)), false)
end

function _M.is_op(v) return getmetatable(v) == Op end

-- The builder -----------------------------------------------------------

local Txn = {}
Txn.__index = Txn

local function append(self, fname, list, is_kind, what, ...)
  if getmetatable(self) ~= Txn then check.fail(fname, "use txn:" .. fname:match("%w+$") .. "(...)", 4) end
  for i = 1, select("#", ...) do
    local v = select(i, ...)
    if not is_kind(v) then
      check.fail(fname, ("argument #%d is not %s (got %s)"):format(i, what, type(v)), 4)
    end
    list[#list + 1] = v
  end
  return self
end

function Txn:when(...) return append(self, "txn:when", self.compares, _M.is_compare, "a compare", ...) end
function Txn:success(...) return append(self, "txn:success", self.on_success, _M.is_op, "an op", ...) end
function Txn:failure(...) return append(self, "txn:failure", self.on_failure, _M.is_op, "an op", ...) end
-- clientv3's names
Txn.If, Txn.Then, Txn.Else = Txn.when, Txn.success, Txn.failure

--- The TxnRequest table for this description; also whether every op in it
-- (nested ones too) only reads.
function Txn:request()
  local readonly = true
  local function ops(list)
    local out = {}
    for i, o in ipairs(list) do
      out[i] = { [o.field] = o.req }
      readonly = readonly and o.readonly
    end
    return out
  end
  local compares = {}
  for i, c in ipairs(self.compares) do compares[i] = c.req end
  local req = { compare = compares, success = ops(self.on_success), failure = ops(self.on_failure) }
  return req, readonly
end

local RESPONSE_TYPES = {
  response_range = "range", response_put = "put",
  response_delete_range = "delete", response_txn = "txn",
}

--- TxnResponse -> { header, succeeded, responses = { { type, ... }, … } }
local function shape(res)
  local responses = {}
  for i, r in ipairs(res.responses or {}) do
    local field, body = next(r)
    local out = RESPONSE_TYPES[field] == "txn" and shape(body) or body
    out.type = RESPONSE_TYPES[field]
    responses[i] = out
  end
  res.responses = responses
  return res
end

local COMMIT_OPTS = { timeout = "number" }

--- txn:commit([opts]) -> { header, succeeded, responses } | nil, err
-- May be called again: it sends the same transaction.
function Txn:commit(opts)
  if getmetatable(self) ~= Txn then check.fail("txn:commit", "use txn:commit()") end
  opts = check.options("txn:commit", opts, COMMIT_OPTS)
  local req, readonly = self:request()
  -- A transaction that only reads may be retried on another endpoint.
  local res, err = self.client:_request("txn", "KV.Txn", req, opts.timeout, readonly)
  if not res then return nil, err end
  return shape(res)
end

local function new_txn(client)
  return setmetatable({ client = client, compares = {}, on_success = {}, on_failure = {} }, Txn)
end

--- op.txn(builder): a nested transaction as an op.
function _M.op.txn(builder)
  if getmetatable(builder) ~= Txn then
    check.arg("op.txn", 1, builder, "txn builder")
  end
  local req, readonly = builder:request()
  return new_op("request_txn", req, readonly)
end

local TABLE_FORM = { compare = "table", success = "table", failure = "table", timeout = "number" }

function _M.install(Client)
  --- client:txn() -> builder, or client:txn { compare, success, failure }
  -- -> the committed result.
  function Client:txn(description)
    check.self("txn", self, "Client")
    local t = new_txn(self)
    if description == nil then return t end
    check.options("txn", description, TABLE_FORM)
    t:when(unpack_list(description.compare))
    t:success(unpack_list(description.success))
    t:failure(unpack_list(description.failure))
    return t:commit { timeout = description.timeout }
  end
end

return _M
