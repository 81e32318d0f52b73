/*
 * auth.h - the auth token every call and stream carries, and
 * re-authentication in the background (the engine's "auth" service).
 */
#ifndef ETCD3_AUTH_H
#define ETCD3_AUTH_H

#include "compat.h"
#include "engine.h"

/* A request that left at `since` (etcd3_now) was refused for its token:
 *   ETCD3_AUTH_RENEWED  the token is newer than the request: try again now;
 *   ETCD3_AUTH_PENDING  the shared Authenticate is under way (started now,
 *                       or joined): the services hear when it ends
 *                       (token_changed), whether it succeeded or not;
 *   ETCD3_AUTH_CANNOT   no credentials, the client is closed, or etcd
 *                       refused the credentials (etcd3_auth_failure says). */
enum { ETCD3_AUTH_CANNOT = 0, ETCD3_AUTH_PENDING, ETCD3_AUTH_RENEWED };
ETCD3_LOCKED int etcd3_auth_refresh(etcd3_engine *e, double since);
/* Why there is no new token (for an error message); static or the
 * engine's, valid while the lock is held. */
ETCD3_LOCKED const char *etcd3_auth_failure(etcd3_engine *e);

/* Lua: methods of the core client (client.c registers them); arg 1 is the
 * client, already checked. */
int etcd3_auth_token(lua_State *L, etcd3_engine *e);
int etcd3_auth_set_token(lua_State *L, etcd3_engine *e);
int etcd3_auth_set_credentials(lua_State *L, etcd3_engine *e);
int etcd3_auth_reauth(lua_State *L, etcd3_engine *e);

#endif
