--- What the txn builder costs: one txn of 2 compares and 3 ops per loop,
-- built with the builder and committed ("builder"), built only ("build"),
-- or sent as the hand-written TxnRequest table it makes ("raw"). Count
-- instructions by the difference of two sizes (bench/README.md, "STM"):
--
--   . tools/env.sh lua5.4
--   lua5.4 tools/with-etcd.lua sh -c 'for n in 200 1000; do valgrind --tool=callgrind \
--     --callgrind-out-file=/tmp/txn-builder-$n.out lua5.4 bench/txn_builder.lua builder $n; done'
--
-- (the "Collected" totals' difference / 800 = instructions per txn)
local etcd3 = require "etcd3"

local mode, n = arg[1], tonumber(arg[2])
if not (mode == "builder" or mode == "build" or mode == "raw") or not n then
  io.stderr:write("usage: lua bench/txn_builder.lua builder|build|raw N (under tools/with-etcd.lua)\n")
  os.exit(2)
end
local cli = assert(etcd3.new { endpoints = assert(os.getenv("ETCDCTL_ENDPOINTS"), "no ETCDCTL_ENDPOINTS") })
local cmp, op = etcd3.compare, etcd3.op
assert(cli:put("/bench/txn/k", "v"))

local function build()
  return cli:txn():when(cmp.value("/bench/txn/k"):eq("v"), cmp.mod_revision("/bench/txn/k"):gt(0))
    :success(op.put("/bench/txn/k", "v"), op.get("/bench/txn/k2")):failure(op.get("/bench/txn/k"))
end

local RAW = {
  compare = { { result = "EQUAL", target = "VALUE", key = "/bench/txn/k", value = "v" },
              { result = "GREATER", target = "MOD", key = "/bench/txn/k", mod_revision = 0 } },
  success = { { request_put = { key = "/bench/txn/k", value = "v" } }, { request_range = { key = "/bench/txn/k2" } } },
  failure = { { request_range = { key = "/bench/txn/k" } } },
}

for _ = 1, n do
  if mode == "builder" then
    assert(assert(build():commit()).succeeded)
  elseif mode == "build" then
    build():request()
  else
    assert(assert(cli:_request("txn", "KV.Txn", RAW, nil, false)).succeeded)
  end
end
cli:close()
