/*
 * loader/core.c - etcd3.core as Lua loads it: a small module that loads
 * the real one (core_impl.so, built from src/, in the same directory) with lazy
 * binding, and hands over to its luaopen_etcd3_core.
 *
 * Lua (and LuaJIT) dlopen a C module with RTLD_NOW: every symbol reference
 * of the module and of the ~50 libraries it brings in (gRPC, abseil's many,
 * OpenSSL) is resolved at load. That was most of a cold start: of the 32 M
 * instructions of `require "etcd3.core"`, 28 M were the dynamic linker's
 * relocations, 17 588 of them symbol lookups (libgrpc alone holds 3 599
 * function references that can wait). RTLD_LAZY resolves a function on its
 * first call instead, and a script calls few of them. RTLD_LOCAL keeps
 * gRPC's symbols out of the process's global scope, as Lua does.
 */
#include <dlfcn.h>
#include <string.h>

#include "lauxlib.h"
#include "lua.h"

#define IMPL "core_impl.so"

int luaopen_etcd3_core(lua_State *L);
int luaopen_etcd3_core(lua_State *L) {
  Dl_info self;
  char path[4096];
  const char *slash;
  size_t dir;
  void *impl;
  lua_CFunction open;
  if (!dladdr((void *)luaopen_etcd3_core, &self) || !self.dli_fname)
    return luaL_error(L, "etcd3.core: cannot tell where it was loaded from");
  slash = strrchr(self.dli_fname, '/');
  dir = slash ? (size_t)(slash - self.dli_fname) + 1 : 0;
  if (dir + sizeof IMPL > sizeof path) return luaL_error(L, "etcd3.core: path too long: %s", self.dli_fname);
  memcpy(path, self.dli_fname, dir);
  memcpy(path + dir, IMPL, sizeof IMPL);
  impl = dlopen(path, RTLD_LAZY | RTLD_LOCAL);
  if (!impl) return luaL_error(L, "etcd3.core: %s", dlerror());
  /* (POSIX's way from dlsym's object pointer to a function pointer) */
  *(void **)(&open) = dlsym(impl, "luaopen_etcd3_core");
  if (!open) return luaL_error(L, "etcd3.core: %s has no luaopen_etcd3_core", path);
  return open(L);
}
