--- Namespaces: every key sent gets the prefix, every key received loses
-- it, and no range or prefix escapes the namespace (as clientv3's
-- namespace package does). Requests are copied, never changed in place:
-- a txn builder commits the same description again.
local prefix_end = require("etcd3.kv").prefix_end

local type, pairs, ipairs, next = type, pairs, ipairs, next

local _M = {}

local function copy(t)
  local result = {}
  for k, v in pairs(t) do result[k] = v end
  return result
end

--- A key sent to etcd: "\0" with a range end means every key (from the
-- start), which in the namespace starts at the prefix itself.
function _M.key(prefix, key, range_end)
  if key == "\0" and range_end then return prefix end
  return prefix .. key
end

--- A range end sent to etcd: "\0" (every key from the start) becomes the
-- end of the namespace.
function _M.range_end(prefix, range_end)
  if range_end == nil then return nil end
  if range_end == "\0" then return prefix_end(prefix) end
  return prefix .. range_end
end

--- A copy of a request over a key or a range (or of a compare), in the
-- namespace.
local function ranged(prefix, req)
  local wrapped = copy(req)
  wrapped.key = _M.key(prefix, req.key, req.range_end)
  wrapped.range_end = _M.range_end(prefix, req.range_end)
  return wrapped
end

local wrap_txn

local OP_FIELDS = {
  request_range = ranged, request_put = ranged, request_delete_range = ranged,
  request_txn = function(prefix, req) return wrap_txn(prefix, req) end,
}

function wrap_txn(prefix, req)
  local wrapped = { compare = {}, success = {}, failure = {} }
  for i, compare in ipairs(req.compare or {}) do wrapped.compare[i] = ranged(prefix, compare) end
  for _, side in ipairs { "success", "failure" } do
    for i, op in ipairs(req[side] or {}) do
      local field, body = next(op)
      wrapped[side][i] = { [field] = OP_FIELDS[field](prefix, body) }
    end
  end
  return wrapped
end

local REQUESTS = {
  ["KV.Range"] = ranged, ["KV.Put"] = ranged, ["KV.DeleteRange"] = ranged,
  ["KV.Txn"] = wrap_txn,
}

--- The request as etcd must see it.
function _M.wrap_request(prefix, rpc, req)
  local wrap = REQUESTS[rpc]
  return wrap and wrap(prefix, req) or req
end

--- A key received from etcd, without the prefix.
local function strip(prefix, key)
  if type(key) == "string" and key:sub(1, #prefix) == prefix then return key:sub(#prefix + 1) end
  return key
end

local function strip_kv(prefix, kv)
  if kv then kv.key = strip(prefix, kv.key) end
end
_M.strip_kv = strip_kv

local function strip_kvs(prefix, kvs)
  for _, kv in ipairs(kvs or {}) do strip_kv(prefix, kv) end
end

local unwrap_txn
local RESPONSE_FIELDS = {
  response_range = function(prefix, res) strip_kvs(prefix, res.kvs) end,
  response_put = function(prefix, res) strip_kv(prefix, res.prev_kv) end,
  response_delete_range = function(prefix, res) strip_kvs(prefix, res.prev_kvs) end,
  response_txn = function(prefix, res) unwrap_txn(prefix, res) end,
}

function unwrap_txn(prefix, res)
  for _, response in ipairs(res.responses or {}) do
    local field, body = next(response)
    RESPONSE_FIELDS[field](prefix, body)
  end
end

local RESPONSES = {
  ["KV.Range"] = function(prefix, res) strip_kvs(prefix, res.kvs) end,
  ["KV.Put"] = function(prefix, res) strip_kv(prefix, res.prev_kv) end,
  ["KV.DeleteRange"] = function(prefix, res) strip_kvs(prefix, res.prev_kvs) end,
  ["KV.Txn"] = unwrap_txn,
  ["Lease.LeaseTimeToLive"] = function(prefix, res)
    for i, key in ipairs(res.keys or {}) do res.keys[i] = strip(prefix, key) end
  end,
}

--- Strips the prefix from every key of a response (in place).
function _M.unwrap_response(prefix, rpc, res)
  local unwrap = RESPONSES[rpc]
  if unwrap then unwrap(prefix, res) end
  return res
end

return _M
