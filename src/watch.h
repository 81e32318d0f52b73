/*
 * watch.h - watchers multiplexed on one Watch stream per client (the
 * engine's "watch" service).
 */
#ifndef ETCD3_WATCH_H
#define ETCD3_WATCH_H

#include "compat.h"
#include "engine.h"

/* core client:watch(spec) -> etcd3.WatchState (spec at stack index `spec`:
 * key, range_end, start_revision, prev_kv, progress_notify, fragment,
 * noput, nodelete, max_queued; checked by the Lua layer). */
int etcd3_watch_new(lua_State *L, etcd3_engine *e, int spec);
int etcd3_watch_open(lua_State *L);

#endif
