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

local type, pairs, ipairs, select, setmetatable, getmetatable = type, pairs, ipairs, select, setmetatable, getmetatable
local tostring, next = tostring, next
local unpack = table.unpack or unpack -- luacheck: ignore 143 (unpack: Lua 5.1's global)

local function unpack_list(t) return unpack(t or {}) end

local _M = {}

-- Compares --------------------------------------------------------------

--- One condition of a transaction (etcd3.compare): the Compare message
--- itself, marked by its metatable (no methods: its fields are the
--- message's, read as they are by the codec and namespaces).
---@class etcd3.Compare
local Compare = {}

-- target name -> the proto's enum name, the oneof field holding the value,
-- the value's kind
local TARGETS = {
  value = { enum = "VALUE", field = "value", kind = "string" },
  version = { enum = "VERSION", field = "version", kind = "integer" },
  create_revision = { enum = "CREATE", field = "create_revision", kind = "integer" },
  mod_revision = { enum = "MOD", field = "mod_revision", kind = "integer" },
  lease = { enum = "LEASE", field = "lease", kind = "id" },
}
-- clientv3's short names for the clientv3 form
TARGETS.create = TARGETS.create_revision
TARGETS.mod = TARGETS.mod_revision

local RESULTS = { eq = "EQUAL", ne = "NOT_EQUAL", lt = "LESS", gt = "GREATER" }
local OPERATORS = { ["="] = "eq", ["=="] = "eq", ["!="] = "ne", ["<"] = "lt", [">"] = "gt" }

--- What a compare looks at (cmp.value(key), …), before its operator.
---@class etcd3.CompareTarget
local Target = {}
Target.__index = Target

---@class etcd3.CompareOptions
---@field prefix? boolean every key starting with `key`
---@field range_end? string the keys in [key, range_end)
local COMPARE_OPTIONS = { prefix = "boolean", range_end = "string" }

-- The names errors give, made once (a txn is built in a hot path):
-- target -> "compare.value", and target -> method -> "compare.value(...):eq"
local TARGET_FNAMES, METHOD_FNAMES = {}, {}
for name in pairs(TARGETS) do
  TARGET_FNAMES[name], METHOD_FNAMES[name] = "compare." .. name, {}
  for method in pairs(RESULTS) do METHOD_FNAMES[name][method] = ("compare.%s(...):%s"):format(name, method) end
end

local function new_target(name, key, opts, level)
  local range_end
  if opts ~= nil or type(key) ~= "string" then -- (one key, no options: nothing to check)
    local fname = TARGET_FNAMES[name]
    check.arg(fname, 1, key, "string", level)
    opts = check.options(fname, opts, COMPARE_OPTIONS, level)
    range_end = kv.range_end(fname, key, opts, COMPARE_OPTIONS, level + 1)
  end
  return setmetatable({ name = name, encoding = TARGETS[name], key = key, range_end = range_end }, Target)
end

local function compare_with(target, method, value, level)
  local encoding = target.encoding
  if type(value) ~= encoding.kind then -- ("integer" and "id" are checked there)
    check.arg(METHOD_FNAMES[target.name][method], 1, value, encoding.kind, level)
  end
  local req = { result = RESULTS[method], target = encoding.enum, key = target.key, range_end = target.range_end }
  req[encoding.field] = value
  return setmetatable(req, Compare)
end

-- target:eq(v), :ne(v), :lt(v), :gt(v) -> etcd3.Compare
for method in pairs(RESULTS) do
  Target[method] = function(self, value)
    if getmetatable(self) ~= Target then
      check.fail("compare", ("use cmp.<target>(key):%s(value)"):format(method))
    end
    -- not a tail call: the error level counts this function's frame
    return (compare_with(self, method, value, 4))
  end
end
---@class etcd3.CompareTarget
---@field eq fun(self: etcd3.CompareTarget, value: string|integer): etcd3.Compare
---@field ne fun(self: etcd3.CompareTarget, value: string|integer): etcd3.Compare
---@field lt fun(self: etcd3.CompareTarget, value: string|integer): etcd3.Compare
---@field gt fun(self: etcd3.CompareTarget, value: string|integer): etcd3.Compare

---@alias etcd3.CompareTargetFunction fun(key: string, opts?: etcd3.CompareOptions): etcd3.CompareTarget

--- The compare targets, also callable in clientv3's form
--- `etcd3.compare(target, key, "=", value)`.
---@class etcd3.CompareModule
---@field value etcd3.CompareTargetFunction
---@field version etcd3.CompareTargetFunction
---@field create_revision etcd3.CompareTargetFunction
---@field mod_revision etcd3.CompareTargetFunction
---@field lease etcd3.CompareTargetFunction
---@field create etcd3.CompareTargetFunction clientv3's name of create_revision
---@field mod etcd3.CompareTargetFunction clientv3's name of mod_revision
---@overload fun(target: string, key: string, operator: "="|"=="|"!="|"<"|">", value: string|integer): etcd3.Compare

--- etcd3.compare: the targets as functions, and callable in clientv3's form
-- etcd3.compare(target, key, "=", v).
---@type etcd3.CompareModule
_M.compare = setmetatable({}, {
  __call = function(_, target, key, operator, value)
    if type(target) ~= "string" or not TARGETS[target] then
      check.fail("compare", ("unknown target %q (value, version, create_revision, mod_revision, lease)"):format(
        tostring(target)))
    end
    local method = OPERATORS[operator]
    if not method then
      check.fail("compare", ("unknown operator %q (=, !=, <, >)"):format(tostring(operator)))
    end
    return (compare_with(new_target(target, key, nil, 4), method, value, 4))
  end,
})
for name in pairs(TARGETS) do
  _M.compare[name] = function(key, opts) return (new_target(name, key, opts, 4)) end
end

local function is_compare(value) return getmetatable(value) == Compare end

-- Ops -------------------------------------------------------------------

--- One operation of a transaction (etcd3.op): the RequestOp message
--- itself ({ request_put = PutRequest }, …), marked by its metatable:
--- ReadOp when it only reads, else WriteOp (no methods: namespaces read
--- its one field with next()).
---@class etcd3.Op
local ReadOp, WriteOp = {}, {}

local function new_op(field, req, readonly)
  return setmetatable({ [field] = req }, readonly and ReadOp or WriteOp)
end

-- An op's options are those of the plain call, less `timeout` (the
-- transaction has one deadline, commit's).
local function without_timeout(fname, opts)
  if type(opts) == "table" and opts.timeout ~= nil then
    check.fail(fname, "option 'timeout' belongs to commit(), not to an op", 4) -- fail -> here -> op -> user
  end
end

--- The ops, built as the plain calls' requests (same checks, same options
--- less `timeout`).
---@class etcd3.OpModule
_M.op = {}

---@param key string
---@param opts? etcd3.GetOptions without timeout
---@return etcd3.Op
function _M.op.get(key, opts)
  without_timeout("op.get", opts)
  return new_op("request_range", (kv.range_request("op.get", key, opts, 4)), true)
end

---@param key string
---@param value string?
---@param opts? etcd3.PutOptions without timeout
---@return etcd3.Op
function _M.op.put(key, value, opts)
  without_timeout("op.put", opts)
  return new_op("request_put", (kv.put_request("op.put", key, value, opts, 4)), false)
end

---@param key string
---@param opts? etcd3.DeleteOptions without timeout
---@return etcd3.Op
function _M.op.delete(key, opts)
  without_timeout("op.delete", opts)
  return new_op("request_delete_range", (kv.delete_request("op.delete", key, opts, 4)), false)
end

local function is_op(value)
  local mt = getmetatable(value)
  return mt == ReadOp or mt == WriteOp
end

-- The builder -----------------------------------------------------------

--- A transaction being described: when(...) the compares, success(...) the
--- ops if they all hold, failure(...) the ops otherwise; then commit().
---@class etcd3.Txn
---@field client etcd3.Client
---@field compares etcd3.Compare[]
---@field on_success etcd3.Op[]
---@field on_failure etcd3.Op[]
local Txn = {}
Txn.__index = Txn

local function append(self, fname, list, is_kind, what, ...)
  if getmetatable(self) ~= Txn then check.fail(fname, "use txn:" .. fname:match("%w+$") .. "(...)", 4) end
  for i = 1, select("#", ...) do
    local item = select(i, ...)
    if not is_kind(item) then
      check.fail(fname, ("argument #%d is not %s (got %s)"):format(i, what, type(item)), 4)
    end
    list[#list + 1] = item
  end
  return self
end

--- Adds compares, all of which must hold for the success ops to run.
---@param ... etcd3.Compare
---@return etcd3.Txn self
function Txn:when(...) return append(self, "txn:when", self.compares, is_compare, "a compare", ...) end
--- Adds ops run when every compare holds.
---@param ... etcd3.Op
---@return etcd3.Txn self
function Txn:success(...) return append(self, "txn:success", self.on_success, is_op, "an op", ...) end
--- Adds ops run when a compare fails.
---@param ... etcd3.Op
---@return etcd3.Txn self
function Txn:failure(...) return append(self, "txn:failure", self.on_failure, is_op, "an op", ...) end
-- clientv3's names
Txn.If, Txn.Then, Txn.Else = Txn.when, Txn.success, Txn.failure

-- copy(list, readonly) -> a copy of a list of compares or ops (the builder
-- may grow after a nested op.txn took its request), and readonly unless an
-- op in it writes
local function copy(list, readonly)
  local out = {}
  for i = 1, #list do
    local o = list[i]
    out[i] = o
    readonly = readonly and getmetatable(o) ~= WriteOp
  end
  return out, readonly
end

--- The TxnRequest table for this description; also whether every op in it
-- (nested ones too) only reads.
---@return table request
---@return boolean readonly
function Txn:request()
  local compares = copy(self.compares, true)
  local success, readonly = copy(self.on_success, true)
  local failure
  failure, readonly = copy(self.on_failure, readonly)
  return { compare = compares, success = success, failure = failure }, readonly
end

local RESPONSE_TYPES = {
  response_range = "range", response_put = "put",
  response_delete_range = "delete", response_txn = "txn",
}

---@class etcd3.TxnResponse: etcd3.RangeResult, etcd3.PutResult, etcd3.DeleteResult, etcd3.TxnResult
---@field type "range"|"put"|"delete"|"txn" which fields of the result it carries

---@class etcd3.TxnResult
---@field header etcd3.Header
---@field succeeded boolean whether every compare held
---@field responses etcd3.TxnResponse[] one per op run, in order

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

--- Sends the transaction. May be called again: it sends the same one.
---@param opts? etcd3.TimeoutOptions
---@return etcd3.TxnResult? result
---@return etcd3.Error? err
function Txn:commit(opts)
  if getmetatable(self) ~= Txn then check.fail("txn:commit", "use txn:commit()") end
  opts = check.options("txn:commit", opts, check.TIMEOUT_ONLY)
  local req, readonly = self:request()
  -- A transaction that only reads may be retried on another endpoint.
  local res, err = self.client:_request("txn", "KV.Txn", req, opts.timeout, readonly)
  if not res then return nil, err end
  return shape(res)
end

local function new_txn(client)
  return setmetatable({ client = client, compares = {}, on_success = {}, on_failure = {} }, Txn)
end

--- A nested transaction as an op.
---@param builder etcd3.Txn
---@return etcd3.Op
function _M.op.txn(builder)
  if getmetatable(builder) ~= Txn then
    check.arg("op.txn", 1, builder, "txn builder")
  end
  local req, readonly = builder:request()
  return new_op("request_txn", req, readonly)
end

---@class etcd3.TxnDescription: etcd3.TimeoutOptions
---@field compare? etcd3.Compare[]
---@field success? etcd3.Op[]
---@field failure? etcd3.Op[]
local TABLE_FORM = { compare = "table", success = "table", failure = "table", timeout = "number" }

-- The client's txn method (init.lua adds it to the client class) ------------

---@class etcd3.Client
local Client = {}
_M.client_methods = Client

--- A transaction builder; or, given a description, the committed result.
---@param description? etcd3.TxnDescription
---@return etcd3.Txn|etcd3.TxnResult|nil
---@return etcd3.Error? err
---@overload fun(self: etcd3.Client): etcd3.Txn
---@overload fun(self: etcd3.Client, description: etcd3.TxnDescription): etcd3.TxnResult?, etcd3.Error?
function Client:txn(description)
  check.self("txn", self, "Client")
  local txn = new_txn(self)
  if description == nil then return txn end
  check.options("txn", description, TABLE_FORM)
  txn:when(unpack_list(description.compare))
  txn:success(unpack_list(description.success))
  txn:failure(unpack_list(description.failure))
  return txn:commit { timeout = description.timeout }
end

return _M
