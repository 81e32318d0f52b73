-- A tour of lua-etcd3, printed the way etcdctl prints the same commands.
-- Run from the checkout, without installing:
--   make demo [LUA=luajit]                              (starts a throwaway etcd)
--   make run SCRIPT=examples/demo.lua [LUA=luajit]      (your etcd: $ETCDCTL_ENDPOINTS,
--                                                        default 127.0.0.1:2379)
--   . tools/env.sh; ETCDCTL_ENDPOINTS=127.0.0.1:2379 lua5.4 examples/demo.lua
local etcd3 = require "etcd3"

local cli = assert(etcd3.new {}) -- endpoints from $ETCDCTL_ENDPOINTS
print("# connected to " .. table.concat(cli:endpoints(), ","))

local function show(cmd) print("$ etcdctl " .. cmd) end

-- etcdctl put /demo/greeting hello  ->  OK
show("put /demo/greeting hello")
assert(cli:put("/demo/greeting", "hello"))
print("OK")
for _, node in ipairs { "alpha", "beta", "gamma" } do
  show(("put /demo/nodes/%s up"):format(node))
  assert(cli:put("/demo/nodes/" .. node, "up"))
  print("OK")
end

-- etcdctl get /demo/greeting  ->  key, then value
show("get /demo/greeting")
local res = assert(cli:get("/demo/greeting"))
for _, kv in ipairs(res.kvs) do print(kv.key); print(kv.value) end

-- etcdctl get /demo/nodes/ --prefix
show("get /demo/nodes/ --prefix")
res = assert(cli:get("/demo/nodes/", { prefix = true }))
for _, kv in ipairs(res.kvs) do print(kv.key); print(kv.value) end

-- etcdctl del /demo/ --prefix  ->  the number deleted
show("del /demo/ --prefix")
res = assert(cli:delete("/demo/", { prefix = true }))
print(res.deleted)

-- etcdctl get /demo/ --prefix -w fields  ->  ... "Count" : 0
-- (etcdctl 3.4 has no --count-only flag, 3.5 added it; count_only = true
-- asks etcd for the count alone)
show("get /demo/ --prefix -w fields   # the \"Count\" line")
print(assert(cli:get("/demo/", { prefix = true, count_only = true })).count)

cli:close()
