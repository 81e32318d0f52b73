rockspec_format = "3.0"
package = "lua-etcd3"
version = "scm-1"
-- Built from a checkout: `luarocks make rockspec/lua-etcd3-scm-1.rockspec`
-- (the build fetches etcd's .proto files, see the Makefile).
source = {
  url = "git+file://.",
}
description = {
  summary = "etcd v3 client for Lua 5.4 and LuaJIT/OpenResty, on the gRPC C core",
  detailed = [[
    A C module (etcd3.core) on the gRPC C core and protobuf-c, under a
    pure-Lua API: KV, transactions, leases kept alive in the background,
    watches that resume across member failures, auth, TLS, namespaces,
    cluster membership with endpoint auto-sync, maintenance, keys the
    engine keeps registered, and recipes (sessions, locks, elections,
    mirrors). Waits without blocking under OpenResty and cqueues. README.md
    lists every call.
  ]],
  license = "MIT",
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
