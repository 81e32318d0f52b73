/*
 * sink.h - the etcd3.ngx writer's fast path: the engine thread writes a
 * watcher's batches into an nginx shared dict itself (sink.c).
 */
#ifndef ETCD3_SINK_H
#define ETCD3_SINK_H

#include <stdint.h>

#include "compat.h"

typedef struct etcd3_sink etcd3_sink;
struct event_batch;

/* Whether this process has lua-nginx-module's shared dict functions. */
int etcd3_sink_available(void);
/* A sink made from the arguments at idx (zone userdata, feed or nil,
 * state table; see watcher.c's state:sink), raising on a bad argument;
 * NULL with *why set when it cannot work here. */
etcd3_sink *etcd3_sink_new(lua_State *L, int idx, const char **why);
/* Writes the batch's events above `floor`: 1 when all of it is in the
 * dict; 0 when it could not (the sink is then off for good, and Lua writes
 * this batch and the next from the state the sink reports: the revision
 * it left did not move). Called with the engine mutex held. */
int etcd3_sink_apply(etcd3_sink *s, const struct event_batch *b, int64_t floor);
/* Pushes what the sink wrote up to (revision, and the log's head, tail,
 * from and the count of keys) and frees it. Without the engine mutex. */
int etcd3_sink_push_free(lua_State *L, etcd3_sink *s);
/* Frees the sink (any thread, no Lua). */
void etcd3_sink_free(etcd3_sink *s);

#endif
