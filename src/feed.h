/*
 * feed.h - a one-byte wake-up from the writer of an etcd3.ngx shared dict
 * to the nginx processes waiting on it (feed.c).
 */
#ifndef ETCD3_FEED_H
#define ETCD3_FEED_H

#include "compat.h"

#include <stddef.h>

typedef struct etcd3_feed etcd3_feed;

/* Registers the feed's type and core.feed() in the module table on top. */
int etcd3_feed_open(lua_State *L);
/* The feed of the userdata at idx (raises when it is not one), with a
 * reference the caller lets go of with etcd3_feed_unref; NULL when the
 * userdata holds none (core.feed() failed). */
etcd3_feed *etcd3_feed_ref(lua_State *L, int idx);
void etcd3_feed_unref(etcd3_feed *f);
/* One byte to every reader (any thread) -> the number woken; nothing once
 * the feed was closed. */
size_t etcd3_feed_post(etcd3_feed *f);

#endif
