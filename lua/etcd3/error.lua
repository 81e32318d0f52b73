--- Error objects: what every call that talks to etcd returns as `nil, err`.
--
-- `err.code` is the gRPC status name ("UNAVAILABLE", …) or a local code
-- ("TIMEOUT", "COMPACTED", "CLOSED", "RESET"); `err.status` its number, looked up
-- here from the code (so no caller repeats it); `err.message` etcd's own
-- text; `err.rpc` the RPC ("KV.Range"). tostring gives one line, and `..`
-- works with strings on either side.
local setmetatable, getmetatable, tostring = setmetatable, getmetatable, tostring

local _M = {}

---@alias etcd3.ErrorCode
---| "CANCELLED" | "UNKNOWN" | "INVALID_ARGUMENT" | "DEADLINE_EXCEEDED"
---| "NOT_FOUND" | "ALREADY_EXISTS" | "PERMISSION_DENIED" | "RESOURCE_EXHAUSTED"
---| "FAILED_PRECONDITION" | "ABORTED" | "OUT_OF_RANGE" | "UNIMPLEMENTED"
---| "INTERNAL" | "UNAVAILABLE" | "DATA_LOSS" | "UNAUTHENTICATED"
---| "TIMEOUT" # a wait ran out on a stream that is still alive
---| "COMPACTED" # a watch's revision was compacted (see compact_revision)
---| "RESET" # a shared dict's change log does not reach back that far (etcd3.ngx)
---| "CLOSED" # the client was closed under a stream
---| "SESSION_EXPIRED" # a recipe's session lease was lost while it waited
---| "NOT_LEADER" # proclaim/resign by a candidate that does not lead
---| "NO_LEADER" # an election has no leader
---| "TOO_MANY_CLIENTS" # more participants entered a double barrier than its count

--- What a call that talks to etcd returns as `nil, err`.
---@class etcd3.Error
---@field code etcd3.ErrorCode gRPC status name, or a local code
---@field status integer the gRPC status number of `code`
---@field message string? etcd's own text ("etcdserver: requested lease not found")
---@field rpc string? the RPC that failed ("KV.Range"), or the library function
---@field compact_revision integer? with COMPACTED: the oldest revision still kept
---@operator concat(string): string
local Error = {}
Error.__index = Error

function Error.__tostring(err)
  local where = err.rpc and (err.rpc .. ": ") or ""
  return ("etcd3: %s%s: %s"):format(where, err.code, err.message or "")
end

function Error.__concat(a, b)
  return tostring(a) .. tostring(b)
end

-- gRPC status name -> number (grpc/status.h). The local codes borrow the
-- number of the gRPC status closest in meaning.
local STATUS = {
  OK = 0, CANCELLED = 1, UNKNOWN = 2, INVALID_ARGUMENT = 3, DEADLINE_EXCEEDED = 4,
  NOT_FOUND = 5, ALREADY_EXISTS = 6, PERMISSION_DENIED = 7, RESOURCE_EXHAUSTED = 8,
  FAILED_PRECONDITION = 9, ABORTED = 10, OUT_OF_RANGE = 11, UNIMPLEMENTED = 12,
  INTERNAL = 13, UNAVAILABLE = 14, DATA_LOSS = 15, UNAUTHENTICATED = 16,
  TIMEOUT = 4, COMPACTED = 11, CLOSED = 1, RESET = 11,
  SESSION_EXPIRED = 9, NOT_LEADER = 9, NO_LEADER = 5, TOO_MANY_CLIENTS = 8,
}

--- A new error object; `fields` (optional) adds extra fields such as
-- compact_revision.
---@param code etcd3.ErrorCode
---@param message string?
---@param rpc string?
---@param fields table?
---@return etcd3.Error
function _M.new(code, message, rpc, fields)
  local err = fields or {}
  err.code, err.status, err.message, err.rpc = code, STATUS[code] or STATUS.UNKNOWN, message, rpc
  return setmetatable(err, Error)
end

--- Whether `value` is an error object.
---@param value any
---@return boolean
function _M.is_error(value)
  return getmetatable(value) == Error
end

return _M
