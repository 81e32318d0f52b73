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

--- Raises "etcd3.<fname>: <message>" at `level` (default: the caller's caller).
---@param fname string
---@param message string
---@param level? integer
function _M.fail(fname, message, level)
  error(("etcd3.%s: %s"):format(fname, message), level or USER)
end

--- What options() returns for nil: one shared empty table (a call without
-- options allocates nothing for them); read-only.
_M.NO_OPTIONS = setmetatable({}, { __newindex = function() error("etcd3: the empty options are read-only", 2) end })

local function is_integer(value)
  return type(value) == "number" and value == math_floor(value) and value > -2^63 and value < 2^63
end

--- Whether `value` is a lease/member ID: a hex string of 1-16 digits, or an
-- integer (exact on 5.3+).
local function is_id(value)
  if type(value) == "string" then return #value >= 1 and #value <= 16 and not value:find("[^%x]") end
  return is_integer(value)
end

local kinds = {
  integer = is_integer,
  id = is_id,
  -- NaN is no number an option can mean (a NaN timeout would never run out)
  number = function(value) return type(value) == "number" and value == value end,
  -- a list of strings (peer URLs): what the codec would refuse, refused here
  strings = function(value)
    if type(value) ~= "table" then return false end
    for i = 1, #value do
      if type(value[i]) ~= "string" then return false end
    end
    return true
  end,
  any = function() return true end,
}

local function kind_ok(kind, value)
  if type(kind) == "table" then return kind[value] ~= nil end
  local test = kinds[kind]
  if test then return test(value) end
  return type(value) == kind
end

local function kind_name(kind)
  if type(kind) ~= "table" then
    return kind == "id" and "ID (hex string or integer)" or kind == "strings" and "list of strings" or kind
  end
  local names = {}
  for name in pairs(kind) do names[#names + 1] = ("%q"):format(name) end
  table_sort(names)
  return "one of " .. table_concat(names, ", ")
end

--- Checks argument number `position` of `fname` against `kind`; returns it.
---@generic T
---@param value T
---@return T
function _M.arg(fname, position, value, kind, level)
  -- a plain type name that matches needs no test (the common case, cheap)
  if (type(value) ~= kind or kinds[kind]) and not kind_ok(kind, value) then
    error(("bad argument #%d to 'etcd3.%s' (%s expected, got %s)"):format(
      position, fname, kind_name(kind), value == nil and "nil" or type(value) == "number" and tostring(value) or type(value)),
      level or USER)
  end
  return value
end

--- Checks an options table (may be nil) against spec; returns a table.
---@param opts table?
---@param spec table<string, string|table> option name -> kind
---@return table
function _M.options(fname, opts, spec, level)
  level = level or USER
  if opts == nil then return _M.NO_OPTIONS end
  if type(opts) ~= "table" then
    error(("bad argument to 'etcd3.%s' (options table expected, got %s)"):format(fname, type(opts)), level)
  end
  for name, value in pairs(opts) do
    local kind = spec[name]
    if kind == nil then
      error(("etcd3.%s: unknown option '%s'"):format(fname, tostring(name)), level)
    end
    if (type(value) ~= kind or kinds[kind]) and not kind_ok(kind, value) then
      error(("etcd3.%s: option '%s': %s expected, got %s"):format(
        fname, name, kind_name(kind), type(value) == "string" and ("%q"):format(value) or type(value)), level)
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
