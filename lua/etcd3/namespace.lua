--- Namespaces: every key sent gets the prefix, every key received loses
-- it, and no range or prefix escapes the namespace (as clientv3's
-- namespace package does). Requests are copied, never changed in place:
-- a txn builder commits the same description again.
local prefix_end = require("etcd3.kv").prefix_end

local type, pairs = type, pairs

local _M = {}

local function copy(t)
  local c = {}
  for k, v in pairs(t) do c[k] = v end
  return c
end

--- A key sent to etcd (for a range: see ranged).
function _M.key(ns, key, range_end)
  if key == "\0" and range_end then return ns end
  return ns .. key
end

--- A range end sent to etcd: "\0" (every key from the start) becomes the
-- end of the namespace.
function _M.range_end(ns, range_end)
  if range_end == nil then return nil end
  if range_end == "\0" then return prefix_end(ns) end
  return ns .. range_end
end

local function ranged(ns, req)
  local c = copy(req)
  -- "\0" with a range end: every key, which in the namespace starts at it
  c.key = (req.key == "\0" and req.range_end) and ns or ns .. req.key
  c.range_end = _M.range_end(ns, req.range_end)
  return c
end

local wrap_txn

local OP_FIELDS = {
  request_range = ranged, request_put = ranged, request_delete_range = ranged,
  request_txn = function(ns, req) return wrap_txn(ns, req) end,
}

function wrap_txn(ns, req)
  local c = { compare = {}, success = {}, failure = {} }
  for i, cmp in ipairs(req.compare or {}) do c.compare[i] = ranged(ns, cmp) end
  for _, side in ipairs { "success", "failure" } do
    for i, op in ipairs(req[side] or {}) do
      local field, body = next(op)
      c[side][i] = { [field] = OP_FIELDS[field](ns, body) }
    end
  end
  return c
end

local REQUESTS = {
  ["KV.Range"] = ranged, ["KV.Put"] = ranged, ["KV.DeleteRange"] = ranged,
  ["KV.Txn"] = wrap_txn,
}

--- The request as etcd must see it.
function _M.wrap_request(ns, rpc, req)
  local f = REQUESTS[rpc]
  return f and f(ns, req) or req
end

--- A key received from etcd, without the prefix.
function _M.strip(ns, key)
  if type(key) == "string" and key:sub(1, #ns) == ns then return key:sub(#ns + 1) end
  return key
end

local function strip_kv(ns, kv)
  if kv then kv.key = _M.strip(ns, kv.key) end
end
_M.strip_kv = strip_kv

local function strip_kvs(ns, kvs)
  for _, kv in ipairs(kvs or {}) do strip_kv(ns, kv) end
end

local unwrap_txn
local RESPONSE_FIELDS = {
  response_range = function(ns, r) strip_kvs(ns, r.kvs) end,
  response_put = function(ns, r) strip_kv(ns, r.prev_kv) end,
  response_delete_range = function(ns, r) strip_kvs(ns, r.prev_kvs) end,
  response_txn = function(ns, r) unwrap_txn(ns, r) end,
}

function unwrap_txn(ns, res)
  for _, r in ipairs(res.responses or {}) do
    local field, body = next(r)
    RESPONSE_FIELDS[field](ns, body)
  end
end

local RESPONSES = {
  ["KV.Range"] = function(ns, res) strip_kvs(ns, res.kvs) end,
  ["KV.Put"] = function(ns, res) strip_kv(ns, res.prev_kv) end,
  ["KV.DeleteRange"] = function(ns, res) strip_kvs(ns, res.prev_kvs) end,
  ["KV.Txn"] = unwrap_txn,
  ["Lease.LeaseTimeToLive"] = function(ns, res)
    for i, k in ipairs(res.keys or {}) do res.keys[i] = _M.strip(ns, k) end
  end,
}

--- Strips the prefix from every key of a response (in place).
function _M.unwrap_response(ns, rpc, res)
  local f = RESPONSES[rpc]
  if f then f(ns, res) end
  return res
end

return _M
