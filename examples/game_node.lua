-- A game-server node: it registers itself (name, address, load) under a
-- lease that the engine keeps alive by itself, keeps a mirror of every
-- node, and prints the nodes that join and leave.
--
--   make run SCRIPT="examples/game_node.lua node-a 127.0.0.1:7001 30"
--   (run several with different names against one etcd: ETCDCTL_ENDPOINTS
--   says where it is; each prints the others joining and leaving)
--
-- Arguments: name, address, seconds to run (default 30; 0 = forever).
local etcd3 = require "etcd3"

local name = arg[1] or "node-" .. os.time()
local address = arg[2] or "127.0.0.1:7000"
local seconds = tonumber(arg[3]) or 30
local PREFIX = "/game/nodes/"
local TTL = 5 -- a node that stops answering is gone for the others after this

local cli = assert(etcd3.new {}) -- endpoints from $ETCDCTL_ENDPOINTS

-- What a node publishes: "address load", load being 0-100.
local function describe(load) return ("%s %d"):format(address, load) end

-- Registered until close: if the lease is lost (this process was stopped,
-- etcd revoked it), the engine grants a new one and puts the key again,
-- even while this script is busy elsewhere.
local reg = assert(cli:register(PREFIX .. name, describe(0), { ttl = TTL }))
print(("%s registered at %s (lease %s)"):format(name, address, reg:lease_id()))

-- Every node, kept up to date: a snapshot, then a watch from its revision.
local nodes = assert(cli:mirror(PREFIX))
for key, value in nodes:pairs() do
  print(("present: %s at %s"):format(key:sub(#PREFIX + 1), value:match("^%S+")))
end
io.stdout:flush()

local stop = seconds > 0 and os.time() + seconds or math.huge
local load = 0
while os.time() < stop do
  -- up to one second for changes; load updates of other nodes are quiet
  local changes = assert(nodes:update(1))
  for _, change in ipairs(changes) do
    local node = change.key:sub(#PREFIX + 1)
    if change.type == "DELETE" then
      print("left: " .. node)
    elseif not change.prev_value then
      print(("joined: %s at %s"):format(node, change.value:match("^%S+")))
    end
  end
  io.stdout:flush()
  load = (load + 7) % 101
  -- false only while the key is not in etcd (this process was stopped
  -- beyond its TTL, no member answers): the engine registers it again
  -- by itself, with the newest value
  local ok, err = reg:set(describe(load), { timeout = 0.5 })
  if not ok then print("not registered right now: " .. err.message) end
end

nodes:close()
assert(reg:close()) -- the key is deleted at once, the lease revoked
cli:close()
print(name .. " deregistered")
