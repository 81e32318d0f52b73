rockspec_format = "3.0"
package = "lua-etcd3"
version = "0.1.0-1"
-- The release: `make dist` builds lua-etcd3-0.1.0-1.src.rock from the
-- checkout, and `luarocks install lua-etcd3-0.1.0-1.src.rock` builds it
-- offline with only libgrpc-dev, libprotobuf-c-dev and pkg-config present
-- (the rock carries the protobuf-c sources generated from etcd's protos, in
-- proto/generated/, so the Makefile fetches nothing and runs no protoc-c).
-- rockspec/lua-etcd3-scm-1.rockspec stays for building from a checkout.
source = {
  -- The project's public repository address is not known yet: this URL is a
  -- placeholder (".invalid" never resolves), to be replaced by the real one
  -- when the repository is published, with the tag v0.1.0 made on the
  -- release commit. Installing the source rock never reads it: the rock
  -- holds the sources in lua-etcd3/, which is `dir` below.
  url = "git+https://example.invalid/lua-etcd3.git",
  tag = "v0.1.0",
  dir = "lua-etcd3",
}
description = {
  summary = "etcd v3 client for Lua 5.1-5.4 and LuaJIT/OpenResty, on the gRPC C core",
  detailed = [[
    A C module (etcd3.core) on the gRPC C core and protobuf-c, under a
    pure-Lua API: KV, transactions, leases kept alive in the background,
    watches that resume across member failures, auth, TLS, namespaces,
    cluster membership with endpoint auto-sync, maintenance, and one
    request policy (retries, backoff, re-authentication) for every call.
    Recipes: sessions, mutexes, read-write locks, elections, software
    transactional memory (STM, with clientv3's four isolation levels),
    queues, priority queues, barriers and double barriers. A prefix mirrored
    into a Lua table, and keys the engine keeps registered for service
    discovery. Under OpenResty, etcd3.ngx waits without blocking and keeps a
    prefix in a shared dict with a change feed for gateways, one copy for
    every nginx worker; cqueues is supported too. README.md documents every
    call with a runnable example; CHANGELOG.md says what each release holds.
  ]],
  license = "MIT",
  labels = { "etcd", "grpc", "openresty" },
}
dependencies = {
  "lua >= 5.1",
}
external_dependencies = {
  GRPC = { header = "grpc/grpc.h" },
  PROTOBUFC = { header = "protobuf-c/protobuf-c.h" },
}
build = {
  type = "make",
  -- WERROR empty: a user's compiler or gRPC, newer than the project's,
  -- may warn where ours does not; the build shows it and goes on
  build_variables = {
    WERROR = "",
    CFLAGS = "$(CFLAGS)",
    LIBFLAG = "$(LIBFLAG)",
    LUA_INCDIR = "$(LUA_INCDIR)",
    LUA = "$(LUA)",
  },
  install_variables = {
    WERROR = "",
    INST_LIBDIR = "$(LIBDIR)",
    INST_LUADIR = "$(LUADIR)",
    LUA = "$(LUA)",
    LUA_INCDIR = "$(LUA_INCDIR)",
    CFLAGS = "$(CFLAGS)",
    LIBFLAG = "$(LIBFLAG)",
  },
}
