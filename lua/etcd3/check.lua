--- Argument and option checks shared by every public function.
--
-- Programmer errors raise a Lua error that names the function and the
-- argument; they are raised before anything is sent. Each public function
-- declares its options as a spec table: option name -> kind, where kind is
-- "boolean", "number", "integer", "string", "id", "function", "table", or an
-- enum table mapping the accepted strings to the proto's enum names.
local type, pairs, error, tostring = type, pairs, error, tostring
local math_floor, table_sort, table_concat = math.floor, table.sort, table.concat

local _M = {}

--- The options spec of a call whose only option is `timeout`.
_M.TIMEOUT_ONLY = { timeout = "number" }

-- The level that points at the user's call: check helper -> public
-- function -> user. Public functions that check through one more helper
-- pass their own level.
local USER = 3

--- Raises "etcd3.<fname>: <msg>" at `level` (default: the caller's caller).
---@param fname string
---@param msg string
---@param level? integer
function _M.fail(fname, msg, level)
  error(("etcd3.%s: %s"):format(fname, msg), level or USER)
end

local function is_integer(v)
  return type(v) == "number" and v == math_floor(v) and v > -2^63 and v < 2^63
end

--- Whether v is a lease/member ID: a hex string of 1-16 digits, or an
-- integer (exact on 5.3+).
local function is_id(v)
  if type(v) == "string" then return #v >= 1 and #v <= 16 and not v:find("[^%x]") end
  return is_integer(v)
end

local kinds = {
  integer = is_integer,
  id = is_id,
  any = function() return true end,
}

local function kind_ok(kind, v)
  if type(kind) == "table" then return kind[v] ~= nil end
  local f = kinds[kind]
  if f then return f(v) end
  return type(v) == kind
end

local function kind_name(kind)
  if type(kind) ~= "table" then
    return kind == "id" and "ID (hex string or integer)" or kind
  end
  local names = {}
  for k in pairs(kind) do names[#names + 1] = ("%q"):format(k) end
  table_sort(names)
  return "one of " .. table_concat(names, ", ")
end

--- Checks argument number `n` of `fname` against `kind`; returns it.
---@generic T
---@param v T
---@return T
function _M.arg(fname, n, v, kind, level)
  if not kind_ok(kind, v) then
    error(("bad argument #%d to 'etcd3.%s' (%s expected, got %s)"):format(
      n, fname, kind_name(kind), v == nil and "nil" or type(v) == "number" and tostring(v) or type(v)),
      level or USER)
  end
  return v
end

--- Checks an options table (may be nil) against spec; returns a table.
---@param opts table?
---@param spec table<string, string|table> option name -> kind
---@return table
function _M.options(fname, opts, spec, level)
  level = level or USER
  if opts == nil then return {} end
  if type(opts) ~= "table" then
    error(("bad argument to 'etcd3.%s' (options table expected, got %s)"):format(fname, type(opts)), level)
  end
  for k, v in pairs(opts) do
    local kind = spec[k]
    if kind == nil then
      error(("etcd3.%s: unknown option '%s'"):format(fname, tostring(k)), level)
    end
    if not kind_ok(kind, v) then
      error(("etcd3.%s: option '%s': %s expected, got %s"):format(
        fname, k, kind_name(kind), type(v) == "string" and ("%q"):format(v) or type(v)), level)
    end
  end
  return opts
end

--- The object a method was called on, which must be of `class` (its
-- __class field): catches cli.get() for cli:get().
function _M.self(fname, self, class, level)
  if type(self) ~= "table" or self.__class ~= class then
    error(("etcd3.%s: called without an object (use obj:%s(...))"):format(
      fname, fname:match("[^.:]+$")), level or USER)
  end
  return self
end

return _M
