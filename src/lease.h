/*
 * lease.h - lease liveness and keepalive in the background (the engine's
 * "lease keepalive" service).
 */
#ifndef ETCD3_LEASE_H
#define ETCD3_LEASE_H

#include <stdint.h>

#include "compat.h"
#include "engine.h"

/* core client:lease(id, ttl, since) -> etcd3.LeaseState, alive for `ttl`
 * seconds from `since`: when the request that granted it (or renewed it)
 * left, so the count never starts after etcd's. */
int etcd3_lease_new(lua_State *L, etcd3_engine *e, int64_t id, int64_t ttl, double since);
int etcd3_lease_open(lua_State *L);

/* The engine's own leases (registrations), granted by a request that left
 * at `since`: renewed every `renew_every` seconds in the background; no
 * news for Lua when lost, but *lost_flag (when not NULL) is set to 1.
 * NULL when the engine is closed or out of memory. */
typedef struct etcd3_lease etcd3_lease;
ETCD3_LOCKED etcd3_lease *etcd3_lease_keep(etcd3_engine *e, int64_t id, int64_t ttl,
                                           double renew_every, double since,
                                           int *lost_flag);
ETCD3_LOCKED int etcd3_lease_alive(etcd3_lease *l, double now);
ETCD3_LOCKED double etcd3_lease_expires_at(const etcd3_lease *l);
ETCD3_LOCKED void etcd3_lease_let_go(etcd3_lease *l); /* stop renewing, forget */

#endif
