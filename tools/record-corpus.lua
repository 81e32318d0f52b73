-- usage: lua tools/record-corpus.lua OUT.lua
--
-- Records real etcd replies for the decode fuzzer's seed corpus: starts a
-- throwaway member on 127.0.0.1, sends it requests of every RPC the client
-- uses, and writes each reply as the codec decoded it, as a Lua table:
--   return { { rpc = "KV.Range", response = { ... } }, ... }
-- fuzz/seed.c encodes them back to wire bytes (nothing binary is kept in
-- the repository; `make fuzz` records afresh). Stream replies (Watch,
-- LeaseKeepAlive) are put together from the events and leases etcd sent.
local etcd3 = require "etcd3"
local helper = require "spec.helpers.etcd"

local out_path = assert(arg[1], "usage: record-corpus.lua OUT.lua")

local function dump(v, out)
  local t = type(v)
  if t == "table" then
    out[#out + 1] = "{"
    for k, x in pairs(v) do
      out[#out + 1] = "["
      dump(k, out)
      out[#out + 1] = "]="
      dump(x, out)
      out[#out + 1] = ","
    end
    out[#out + 1] = "}"
  elseif t == "string" then
    out[#out + 1] = ("%q"):format(v)
  elseif t == "number" then
    out[#out + 1] = (math.type and math.type(v) == "integer") and ("%d"):format(v) or ("%.17g"):format(v)
  else
    out[#out + 1] = tostring(v)
  end
end

local member = helper.single()
local ok, err = pcall(function()
  local cli = assert(etcd3.new { endpoints = member.endpoint })
  local records = {}
  local function rec(rpc, req)
    local res = assert(cli:_request("record", rpc, req, 5, false))
    records[#records + 1] = { rpc = rpc, response = res }
    return res
  end

  local lease = rec("Lease.LeaseGrant", { ttl = 60 })
  local w = assert(cli:watch("/corpus/", { prefix = true, prev_kv = true }))
  rec("KV.Put", { key = "/corpus/a", value = "1" })
  rec("KV.Put", { key = "/corpus/b", value = "\0\1\255binary", lease = lease.id })
  rec("KV.Put", { key = "/corpus/a", value = "2", prev_kv = true })
  rec("KV.Range", { key = "/corpus/", range_end = etcd3.prefix_end("/corpus/") })
  rec("KV.Range", { key = "/corpus/", range_end = etcd3.prefix_end("/corpus/"), count_only = true })
  rec("KV.Range", { key = "/corpus/", range_end = etcd3.prefix_end("/corpus/"), keys_only = true, limit = 1 })
  rec("KV.Range", { key = "/corpus/none" })
  rec("KV.Txn", {
    compare = { { key = "/corpus/a", target = "VALUE", result = "EQUAL", value = "2" } },
    success = {
      { request_range = { key = "/corpus/a" } },
      { request_put = { key = "/corpus/c", value = "3", prev_kv = true } },
      { request_txn = { success = { { request_delete_range = { key = "/corpus/d", prev_kv = true } } } } },
    },
    failure = { { request_range = { key = "/corpus/b" } } },
  })
  rec("KV.DeleteRange", { key = "/corpus/a", prev_kv = true })
  local status = rec("Maintenance.Status", {})
  rec("KV.Compact", { revision = status.header.revision - 1 })
  rec("Lease.LeaseTimeToLive", { id = lease.id, keys = true })
  rec("Lease.LeaseLeases", {})
  records[#records + 1] = { rpc = "Lease.LeaseKeepAlive",
    response = { header = lease.header, id = lease.id, ttl = lease.ttl } }
  rec("Lease.LeaseRevoke", { id = lease.id })
  for _ = 1, 5 do
    local ev = w:next(5)
    if not ev then break end
    records[#records + 1] = { rpc = "Watch.Watch",
      response = { header = status.header, watch_id = 1, events = { ev } } }
  end
  records[#records + 1] = { rpc = "Watch.Watch",
    response = { header = status.header, watch_id = 2, created = true } }
  records[#records + 1] = { rpc = "Watch.Watch",
    response = { header = status.header, watch_id = 2, canceled = true, compact_revision = 3,
      cancel_reason = "etcdserver: mvcc: required revision has been compacted" } }
  w:cancel()
  rec("Cluster.MemberList", {})
  rec("Maintenance.Alarm", { action = "GET" })
  rec("Maintenance.Hash", {})
  rec("Maintenance.HashKV", {})
  rec("Auth.UserAdd", { name = "root", password = "pw" })
  rec("Auth.RoleAdd", { name = "reader" })
  rec("Auth.RoleGrantPermission", { name = "reader",
    perm = { perm_type = "READ", key = "/corpus/", range_end = etcd3.prefix_end("/corpus/") } })
  rec("Auth.UserGrantRole", { user = "root", role = "root" })
  rec("Auth.UserGrantRole", { user = "root", role = "reader" })
  rec("Auth.UserGet", { name = "root" })
  rec("Auth.RoleGet", { role = "reader" })
  rec("Auth.UserList", {})
  rec("Auth.RoleList", {})
  rec("Auth.AuthEnable", {})
  rec("Auth.Authenticate", { name = "root", password = "pw" })
  cli:close()

  local out = { "return " }
  dump(records, out)
  local f = assert(io.open(out_path, "w"))
  f:write(table.concat(out), "\n")
  f:close()
  io.write(("recorded %d replies into %s\n"):format(#records, out_path))
end)
member:stop()
if not ok then
  io.stderr:write("record-corpus: " .. tostring(err) .. "\n")
  os.exit(1)
end
