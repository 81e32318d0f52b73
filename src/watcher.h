/*
 * watcher.h - the etcd3.WatchState userdata (core client:watch): a
 * watcher on the engine's "watch" service (watch.c).
 */
#ifndef ETCD3_WATCHER_H
#define ETCD3_WATCHER_H

#include "compat.h"
#include "engine.h"

/* core client:watch(spec) -> etcd3.WatchState (spec at stack index `spec`:
 * key, range_end, start_revision, prev_kv, progress_notify, fragment,
 * noput, nodelete, max_queued; checked by the Lua layer). */
int etcd3_watcher_new(lua_State *L, etcd3_engine *e, int spec);
int etcd3_watcher_open(lua_State *L);

#endif
