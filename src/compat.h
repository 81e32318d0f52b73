/*
 * compat.h - the few Lua 5.2+/5.3+ C API pieces that Lua 5.1/LuaJIT lack.
 *
 * The module is written to the 5.3/5.4 API; this header maps what is missing
 * on older runtimes so one C source builds for lua5.4 and LuaJIT 2.1.
 */
#ifndef ETCD3_COMPAT_H
#define ETCD3_COMPAT_H

#include <lua.h>
#include <lauxlib.h>

#if LUA_VERSION_NUM < 502
#define lua_rawlen(L, i) lua_objlen((L), (i))
static inline int etcd3_absindex(lua_State *L, int i) {
  return (i > 0 || i <= LUA_REGISTRYINDEX) ? i : lua_gettop(L) + i + 1;
}
#define lua_absindex(L, i) etcd3_absindex((L), (i))
#endif

#if LUA_VERSION_NUM < 503
/* LuaJIT numbers are doubles: integers are exact below 2^53. */
#define ETCD3_HAS_INTEGERS 0
#else
#define ETCD3_HAS_INTEGERS 1
#endif

#endif
