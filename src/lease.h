/*
 * lease.h - lease liveness and keepalive in the background (the engine's
 * "lease keepalive" service).
 */
#ifndef ETCD3_LEASE_H
#define ETCD3_LEASE_H

#include <stdint.h>

#include "compat.h"
#include "engine.h"

/* core client:lease(id, ttl) -> etcd3.LeaseState, alive from now. */
int etcd3_lease_new(lua_State *L, etcd3_engine *e, int64_t id, int64_t ttl);
int etcd3_lease_open(lua_State *L);

#endif
