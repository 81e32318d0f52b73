/*
 * registration.h - a key kept under a lease by the engine itself (the
 * engine's "registration" service): client:register.
 */
#ifndef ETCD3_REGISTRATION_H
#define ETCD3_REGISTRATION_H

#include "compat.h"
#include "engine.h"

/* core client:register(key, value, ttl) -> etcd3.Registration */
int etcd3_registration_new(lua_State *L, etcd3_engine *e);
int etcd3_registration_open(lua_State *L);

#endif
