/*
 * auxiliar.c - userdata helpers shared by every C type of etcd3.core
 * (see auxiliar.h).
 */
#include <stdlib.h>

#include "auxiliar.h"

void *etcd3_bound_check(lua_State *L, const char *mt, const char *what) {
  void **u = (void **)luaL_checkudata(L, 1, mt);
  if (!*u) luaL_error(L, "etcd3: %s already released", what);
  if (etcd3_engine_forked(*(etcd3_engine **)*u))
    luaL_error(L, "etcd3: %s used in a forked child (create a new client after fork)", what);
  return *u;
}

void *etcd3_bound_new(lua_State *L, const char *mt, size_t size, etcd3_engine *e) {
  void **u = (void **)lua_newuserdata(L, sizeof(void *));
  void *object;
  *u = NULL;
  luaL_setmetatable(L, mt);
  object = calloc(1, size);
  if (!object) luaL_error(L, "etcd3: out of memory");
  *(etcd3_engine **)object = e;
  *u = object;
  return object;
}

void *etcd3_bound_take(lua_State *L, const char *mt) {
  void **u = (void **)luaL_checkudata(L, 1, mt);
  void *object = *u;
  *u = NULL;
  if (object && etcd3_engine_forked(*(etcd3_engine **)object)) return NULL;
  return object;
}

void etcd3_register_type(lua_State *L, const char *mt, const luaL_Reg *methods, lua_CFunction gc) {
  luaL_newmetatable(L, mt);
  lua_newtable(L);
  luaL_setfuncs(L, methods, 0);
  lua_setfield(L, -2, "__index");
  lua_pushcfunction(L, gc);
  lua_setfield(L, -2, "__gc");
  lua_pop(L, 1);
}
