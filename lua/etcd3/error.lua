--- Error objects: what every call that talks to etcd returns as `nil, err`.
--
-- `err.code` is the gRPC status name ("UNAVAILABLE", …) or a local code
-- ("TIMEOUT", "COMPACTED", "CLOSED"); `err.status` its number; `err.message`
-- etcd's own text; `err.rpc` the RPC ("KV.Range"). tostring gives one line,
-- and `..` works with strings on either side.
local setmetatable, getmetatable, tostring = setmetatable, getmetatable, tostring

local _M = {}

local Error = {}
Error.__index = Error

function Error.__tostring(e)
  local where = e.rpc and (e.rpc .. ": ") or ""
  return ("etcd3: %s%s: %s"):format(where, e.code, e.message or "")
end

function Error.__concat(a, b)
  return tostring(a) .. tostring(b)
end

-- Local codes borrow the number of the gRPC status closest in meaning.
local local_status = { TIMEOUT = 4, COMPACTED = 11, CLOSED = 1 }

--- A new error object; `fields` (optional) adds extra fields such as
-- compact_revision.
function _M.new(code, status, message, rpc, fields)
  local e = fields or {}
  e.code, e.status, e.message, e.rpc = code, status or local_status[code] or 2, message, rpc
  return setmetatable(e, Error)
end

function _M.is_error(v)
  return getmetatable(v) == Error
end

return _M
