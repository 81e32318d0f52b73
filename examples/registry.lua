-- Service registration and discovery, as a game server node does it:
-- register under a lease that stays alive while the process lives, and
-- watch the prefix to learn when other nodes join or leave.
--
--   make run SCRIPT=examples/registry.lua ARGS="node-a 127.0.0.1:7001 10" [LUA=luajit]
--   (run several with different names; each prints the others joining and
--   leaving; etcd from $ETCDCTL_ENDPOINTS, default 127.0.0.1:2379), or:
--   . tools/env.sh; ETCDCTL_ENDPOINTS=127.0.0.1:2379 lua5.4 examples/registry.lua node-a 127.0.0.1:7001 10
local etcd3 = require "etcd3"

local name, address = arg[1] or "node-" .. os.time(), arg[2] or "127.0.0.1:7000"
local seconds = tonumber(arg[3]) or 10
local PREFIX = "/services/game/"

local cli = assert(etcd3.new {})

-- Register: a key under a lease that the C engine renews every ttl/3,
-- whatever this script is busy with.
local function register()
  local lease = assert(cli:grant(5))
  assert(lease:keepalive())
  assert(cli:put(PREFIX .. name, address, { lease = lease.id }))
  return lease
end
local lease = register()
print(("%s registered at %s (lease %s)"):format(name, address, lease.id))

-- Discover: the current members, then every change after that revision.
local res = assert(cli:get(PREFIX, { prefix = true }))
local nodes = {}
for _, kv in ipairs(res.kvs) do
  nodes[kv.key:sub(#PREFIX + 1)] = kv.value
  print("present: " .. kv.key:sub(#PREFIX + 1) .. " at " .. kv.value)
end
local watcher = assert(cli:watch(PREFIX, { prefix = true, start_revision = res.header.revision + 1 }))

local stop = os.time() + seconds
while os.time() < stop do
  -- liveness a game server can act on: re-register when the lease is lost
  if not lease:alive() then
    print("lease lost (" .. select(2, lease:alive()) .. "): registering again")
    lease = register()
  end
  local ev, err = watcher:next(0.5)
  if ev then
    local node = ev.kv.key:sub(#PREFIX + 1)
    if ev.type == "PUT" then
      if not nodes[node] then print("joined: " .. node .. " at " .. ev.kv.value) end
      nodes[node] = ev.kv.value
    else
      print("left: " .. node)
      nodes[node] = nil
    end
  elseif err.code ~= "TIMEOUT" then
    error("watch ended: " .. err)
  end
end

-- Deregister: revoking the lease deletes the key at once.
assert(lease:revoke())
watcher:cancel()
cli:close()
print(name .. " deregistered")
