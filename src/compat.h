/*
 * compat.h - the few Lua 5.2+/5.3+ C API pieces that Lua 5.1/LuaJIT lack.
 *
 * The module is written to the 5.3/5.4 API; this header maps what is missing
 * on older runtimes so one C source builds for Lua 5.1 to 5.4 and LuaJIT 2.1.
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

/* PUC Lua 5.1 (LuaJIT 2.1 has these two; its lauxlib.h defines luaL_newlib). */
#if LUA_VERSION_NUM < 502 && !defined(luaL_newlib)
static inline void etcd3_setfuncs(lua_State *L, const luaL_Reg *l, int nup) {
  for (; l->name; l++) {
    int i;
    for (i = 0; i < nup; i++) lua_pushvalue(L, -nup);
    lua_pushcclosure(L, l->func, nup);
    lua_setfield(L, -(nup + 2), l->name);
  }
  lua_pop(L, nup);
}
#define luaL_setfuncs(L, l, nup) etcd3_setfuncs((L), (l), (nup))
#define luaL_setmetatable(L, tname) \
  (luaL_getmetatable((L), (tname)), lua_setmetatable((L), -2))
#endif

#if LUA_VERSION_NUM < 503
/* LuaJIT numbers are doubles: integers are exact below 2^53. */
#define ETCD3_HAS_INTEGERS 0
#else
#define ETCD3_HAS_INTEGERS 1
#endif

#endif
