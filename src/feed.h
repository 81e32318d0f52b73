/*
 * feed.h - a one-byte wake-up from the writer of an etcd3.ngx shared dict
 * to the nginx processes waiting on it (feed.c).
 */
#ifndef ETCD3_FEED_H
#define ETCD3_FEED_H

#include "compat.h"

/* Registers the feed's type and core.feed() in the module table on top. */
int etcd3_feed_open(lua_State *L);

#endif
