/*
 * feed.c - wakes the other processes of an nginx when the writer of an
 * etcd3.ngx shared dict moved the copy (lua/etcd3/ngx.lua's view:wait).
 *
 * nginx has no wake-up across its workers, and lua-nginx-module waits only
 * on sockets it connects itself (cosockets). So the writer listens on a
 * unix socket in a private directory (notifier.c's etcd3_listen_private:
 * mode 0700), whose path it keeps in the dict, and one light thread per
 * worker and dict connects a cosocket to it and reads. post(), after each
 * batch the writer put in the dict (and at each heartbeat, so that a
 * reader in an exiting worker gets to see it is exiting), accepts the
 * connections queued since the last post (a unix connect completes at
 * once: it waits in the listen queue) and writes one byte to every
 * connection. Connections from a process of another user are refused
 * (SO_PEERCRED); a connection whose reader went is dropped at the next
 * post. Nothing here touches the engine: the writer's Lua calls it.
 */
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <poll.h>
#include <unistd.h>
#include <sys/socket.h>
#include <sys/un.h>

#include "auxiliar.h"
#include "feed.h"
#include "notifier.h"

#define ETCD3_FEED_MT "etcd3.Feed"

/* Connections queued between two posts, at most (beyond, a worker's
 * reader fails to connect, and its views poll). */
#define FEED_BACKLOG 512

typedef struct feed {
  int fd;       /* -1 once closed */
  int *conns;   /* the readers' connections */
  size_t n_conns, cap_conns;
  char dir[PATH_MAX];
  char path[sizeof(((struct sockaddr_un *)0)->sun_path)];
} feed;

static feed *check_feed(lua_State *L) {
  return (feed *)luaL_checkudata(L, 1, ETCD3_FEED_MT);
}

/* core.feed() -> feed | nil, message: a new listening socket. */
static int feed_new(lua_State *L) {
  char err[PATH_MAX + 128];
  feed *f = (feed *)lua_newuserdata(L, sizeof *f);
  f->fd = -1;
  f->conns = NULL;
  f->n_conns = f->cap_conns = 0;
  f->dir[0] = f->path[0] = '\0';
  luaL_setmetatable(L, ETCD3_FEED_MT);
  f->fd = etcd3_listen_private("f", FEED_BACKLOG, f->dir, sizeof f->dir, f->path, sizeof f->path, err,
                               sizeof err);
  if (f->fd >= 0) return 1;
  lua_pushnil(L);
  lua_pushstring(L, err);
  return 2;
}

/* feed:path() -> the socket's path (nil once closed) */
static int feed_path(lua_State *L) {
  feed *f = check_feed(L);
  if (f->fd < 0) return 0;
  lua_pushstring(L, f->path);
  return 1;
}

/* Takes the connections queued since the last post. A poll first: an
 * accept with nothing queued still makes and frees a socket in the kernel,
 * which cost more than the rest of a post. */
static void accept_queued(feed *f) {
  uid_t me;
  struct pollfd p;
  p.fd = f->fd;
  p.events = POLLIN;
  p.revents = 0;
  if (poll(&p, 1, 0) != 1 || !(p.revents & POLLIN)) return;
  me = geteuid();
  for (;;) {
    struct ucred cred;
    socklen_t len = sizeof cred;
    int fd = accept4(f->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno == EINTR || errno == ECONNABORTED) continue;
      return; /* EAGAIN: no more (anything else: the next post tries again) */
    }
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0 || cred.uid != me) {
      close(fd);
      continue;
    }
    if (f->n_conns == f->cap_conns) {
      size_t cap = f->cap_conns ? 2 * f->cap_conns : 8;
      int *grown = (int *)realloc(f->conns, cap * sizeof *grown);
      if (!grown) {
        close(fd); /* its reader sees it closed: its views poll */
        continue;
      }
      f->conns = grown;
      f->cap_conns = cap;
    }
    f->conns[f->n_conns++] = fd;
  }
}

/* feed:post() -> the number of readers woken: one byte to each. Never
 * blocks; a reader with a byte still unread (EAGAIN) needs no other. */
static int feed_post(lua_State *L) {
  static const char byte = 'f';
  feed *f = check_feed(L);
  size_t kept = 0;
  lua_Integer woken = 0;
  if (f->fd >= 0) accept_queued(f);
  for (size_t i = 0; i < f->n_conns; i++) {
    int fd = f->conns[i];
    if (send(fd, &byte, 1, MSG_DONTWAIT | MSG_NOSIGNAL) == 1) {
      woken++;
    } else if (errno != EAGAIN && errno != EWOULDBLOCK) {
      close(fd); /* the reader went */
      continue;
    }
    f->conns[kept++] = fd;
  }
  f->n_conns = kept;
  lua_pushinteger(L, woken);
  return 1;
}

/* feed:close(): stops listening, closes every reader's connection (they
 * see it closed) and removes the socket file and its directory.
 * Idempotent; also __gc. */
static int feed_close(lua_State *L) {
  feed *f = check_feed(L);
  etcd3_unlisten_private(f->fd, f->dir, f->path);
  f->fd = -1;
  for (size_t i = 0; i < f->n_conns; i++) close(f->conns[i]);
  free(f->conns);
  f->conns = NULL;
  f->n_conns = f->cap_conns = 0;
  return 0;
}

int etcd3_feed_open(lua_State *L) {
  static const luaL_Reg methods[] = {
    {"path", feed_path}, {"post", feed_post}, {"close", feed_close}, {NULL, NULL},
  };
  etcd3_register_type(L, ETCD3_FEED_MT, methods, feed_close);
  lua_pushcfunction(L, feed_new);
  lua_setfield(L, -2, "feed");
  return 0;
}
