/*
 * notifier.h - news for an event loop that can only wait on sockets it
 * connects itself (an nginx worker): the engine's "notifier" service.
 */
#ifndef ETCD3_NOTIFIER_H
#define ETCD3_NOTIFIER_H

#include "compat.h"
#include "engine.h"

/* Listens on a unix socket named `name` in a new private directory
 * ($TMPDIR or /tmp, mkdtemp: mode 0700, so no other user can reach the
 * name), non-blocking: the descriptor, with `dir` and `path` filled; -1
 * and a message in `err` on failure, leaving nothing behind. */
int etcd3_listen_private(const char *name, int backlog, char *dir, size_t dirlen, char *path,
                         size_t pathlen, char *err, size_t errlen);
/* Closes `fd` (when >= 0) and removes `path` and `dir` (when not empty),
 * emptying both. */
void etcd3_unlisten_private(int fd, char *dir, char *path);

/* core client:notifier() -> etcd3.Notifier */
int etcd3_notifier_new(lua_State *L, etcd3_engine *e);
int etcd3_notifier_open(lua_State *L);

#endif
