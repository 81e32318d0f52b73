/*
 * auxiliar.h - the Lua side of etcd3.core's C objects: every metatable
 * name, and the helpers for userdata that hold an engine-bound object.
 *
 * An engine-bound object (a lease's liveness, a watcher, a server stream)
 * is a C struct whose first member is its engine pointer, shared by a Lua
 * userdata (which holds a pointer to it) and the engine thread. The
 * userdata's __gc takes it out with etcd3_bound_take, so a release runs once.
 */
#ifndef ETCD3_AUXILIAR_H
#define ETCD3_AUXILIAR_H

#include <stddef.h>

#include "compat.h"
#include "engine.h"

#define ETCD3_CLIENT_MT "etcd3.Client"
#define ETCD3_CALL_MT "etcd3.Call"
#define ETCD3_ARENA_MT "etcd3.Arena"
#define ETCD3_DECODED_MT "etcd3.Decoded"
#define ETCD3_LEASE_MT "etcd3.LeaseState"
#define ETCD3_WATCH_MT "etcd3.WatchState"
#define ETCD3_SERVER_STREAM_MT "etcd3.ServerStream"
#define ETCD3_REGISTRATION_MT "etcd3.Registration"
#define ETCD3_NOTIFIER_MT "etcd3.Notifier"
#define ETCD3_FEED_MT "etcd3.Feed"

/* Pushes a userdata of metatable `mt` holding a new zeroed object of `size`
 * bytes bound to e (its first member); raises on out of memory, leaving an
 * empty userdata that __gc ignores. The caller takes the engine reference. */
void *etcd3_bound_new(lua_State *L, const char *mt, size_t size, etcd3_engine *e);
/* The object behind the userdata at index 1; raises when it was released
 * or is used in a forked child. `what` names it in the error. */
void *etcd3_bound_check(lua_State *L, const char *mt, const char *what);
/* For __gc: empties the userdata at index 1 and returns its object; NULL
 * when already released, or in a forked child (leaked on purpose: gRPC
 * must not be touched there). */
void *etcd3_bound_take(lua_State *L, const char *mt);

/* Registers metatable `mt`: the methods as __index, gc as __gc. */
void etcd3_register_type(lua_State *L, const char *mt, const luaL_Reg *methods, lua_CFunction gc);

#endif
