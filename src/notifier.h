/*
 * notifier.h - news for an event loop that can only wait on sockets it
 * connects itself (an nginx worker): the engine's "notifier" service.
 */
#ifndef ETCD3_NOTIFIER_H
#define ETCD3_NOTIFIER_H

#include "compat.h"
#include "engine.h"

/* core client:notifier() -> etcd3.Notifier */
int etcd3_notifier_new(lua_State *L, etcd3_engine *e);
int etcd3_notifier_open(lua_State *L);

#endif
