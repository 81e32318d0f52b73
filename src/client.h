/*
 * client.h - the etcd3.Client userdata: the low-level client the pure-Lua
 * layer (lua/etcd3/client.lua) drives.
 */
#ifndef ETCD3_CLIENT_H
#define ETCD3_CLIENT_H

#include "compat.h"

/* Registers etcd3.Client and sets `new` in the module table at -1. */
int etcd3_client_open(lua_State *L);

#endif
