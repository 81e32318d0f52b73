/*
 * auth.h - the auth token every call and stream carries, and
 * re-authentication in the background (the engine's "auth" service).
 */
#ifndef ETCD3_AUTH_H
#define ETCD3_AUTH_H

#include "compat.h"
#include "engine.h"

/* Whether the engine keeps credentials to authenticate again with; then
 * *generation is the current token's generation (bumped on every token). */
ETCD3_LOCKED int etcd3_auth_can_refresh(etcd3_engine *e, unsigned *generation);
/* Authenticates again in the background unless that is under way; the
 * engine's services hear of the new token (token_changed). */
ETCD3_LOCKED void etcd3_auth_refresh(etcd3_engine *e);

/* Lua: methods of the core client (client.c registers them); arg 1 is the
 * client, already checked. */
int etcd3_auth_token(lua_State *L, etcd3_engine *e);
int etcd3_auth_set_token(lua_State *L, etcd3_engine *e);
int etcd3_auth_set_credentials(lua_State *L, etcd3_engine *e);
int etcd3_auth_start(lua_State *L, etcd3_engine *e, size_t channel, double timeout);

#endif
