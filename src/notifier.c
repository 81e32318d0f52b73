/*
 * notifier.c - the engine's "notifier" service: news for Lua also reaches
 * an nginx worker, as one byte on a unix-domain connection the worker made.
 *
 * lua-nginx-module waits only on sockets it opens itself (cosockets), never
 * on a descriptor it is handed, so the client's pollfd cannot wake a parked
 * request. Instead the service listens on a unix socket in a directory of
 * its own (mkdtemp: mode 0700, so no other user can even reach the name),
 * the worker connects a cosocket to it, the service accepts that one
 * connection (SO_PEERCRED: it must come from this very process) and removes
 * the socket file and the directory at once. From then on a news post
 * writes one byte when the connection is armed and disarms it; Lua re-arms
 * after each byte and only then looks at what is ready, so no post is
 * missed and at most one byte is ever in flight, however busy the engine.
 * Each post also names its object (the address of its news flag, which
 * calls and watchers give Lua as `news_key`): Lua then asks only those
 * waiters whether they are ready, not every parked call.
 *
 * The Lua side (the light thread that reads the byte and wakes the waiting
 * coroutines) is in lua/etcd3/wait.lua.
 */
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/socket.h>
#include <sys/un.h>

#include "auxiliar.h"
#include "notifier.h"

/* The list of objects named grows by doubling from this size; it is
 * bounded by the number of objects (each posts once until Lua has seen
 * it). Only when it cannot grow does Lua look at every waiter: asking 1000
 * parked watchers at every wake-up of a burst cost more than the burst. */
#define NOTIFIER_KEYS 64

typedef struct notifier {
  etcd3_engine *engine;   /* NULL until first use initialises the rest */
  int listen_fd;          /* -1 unless listening for the worker's connect */
  int conn_fd;            /* -1 unless connected */
  int armed;              /* the next post writes a byte */
  int overflow;           /* keys could not grow (or none known): look at all */
  size_t n_keys, cap_keys;
  const int **keys;       /* posted since Lua last took them */
  const int **taken;      /* the last take's, which Lua reads unlocked */
  size_t cap_taken;
  char dir[PATH_MAX];     /* "" unless it exists */
  char path[sizeof(((struct sockaddr_un *)0)->sun_path)];
} notifier;

/* The Lua userdata's object: what it needs to reach the service. */
typedef struct notifier_ref {
  etcd3_engine *engine;
} notifier_ref;

/* The socket file and its directory go as soon as they served. */
static void drop_listener(notifier *n) {
  etcd3_unlisten_private(n->listen_fd, n->dir, n->path);
  n->listen_fd = -1;
}

static void drop_all(notifier *n) {
  drop_listener(n);
  if (n->conn_fd >= 0) close(n->conn_fd);
  n->conn_fd = -1;
  n->armed = 0;
  n->n_keys = 0;
}

ETCD3_LOCKED static void notifier_on_news(etcd3_engine *e, void *state, const int *posted) {
  notifier *n = (notifier *)state;
  static const char byte = 'n';
  (void)e;
  if (n->conn_fd < 0) return;
  if (n->n_keys == n->cap_keys) {
    size_t cap = n->cap_keys ? 2 * n->cap_keys : NOTIFIER_KEYS;
    const int **grown = (const int **)realloc((void *)n->keys, cap * sizeof *grown);
    if (grown) {
      n->keys = grown;
      n->cap_keys = cap;
    }
  }
  if (n->n_keys < n->cap_keys) n->keys[n->n_keys++] = posted;
  else n->overflow = 1;
  if (!n->armed) return;
  n->armed = 0;
  /* never blocks, never raises SIGPIPE; a failure shows as a closed socket */
  if (send(n->conn_fd, &byte, 1, MSG_DONTWAIT | MSG_NOSIGNAL) < 0 && errno != EAGAIN) {
    close(n->conn_fd);
    n->conn_fd = -1;
  }
}

/* The engine closes: the worker's read ends with "closed", which ends its
 * light thread. */
ETCD3_LOCKED static void notifier_shutdown(etcd3_engine *e, void *state) {
  notifier *n = (notifier *)state;
  (void)e;
  if (n->engine) drop_all(n);
}

static void notifier_free(void *state) {
  notifier *n = (notifier *)state;
  if (n->engine) drop_all(n);
  free((void *)n->keys);
  free((void *)n->taken);
  free(n);
}

static const etcd3_service_ops notifier_service = {
  .name = "notifier", .shutdown = notifier_shutdown, .free = notifier_free,
  .on_news = notifier_on_news,
};

/* The engine's notifier, registered on first use; NULL when the engine is
 * closed or out of memory. */
ETCD3_LOCKED static notifier *notifier_of(etcd3_engine *e) {
  notifier *n;
  if (e->closed) return NULL;
  n = (notifier *)etcd3_engine_service_get(e, &notifier_service, sizeof *n);
  if (n && !n->engine) {
    n->engine = e;
    n->listen_fd = n->conn_fd = -1;
  }
  return n;
}

static etcd3_engine *check_ref(lua_State *L) {
  return ((notifier_ref *)etcd3_bound_check(L, ETCD3_NOTIFIER_MT, "notifier"))->engine;
}

int etcd3_listen_private(const char *name, int backlog, char *dir, size_t dirlen, char *path,
                         size_t pathlen, char *err, size_t errlen) {
  const char *tmp = getenv("TMPDIR");
  struct sockaddr_un addr;
  int fd;
  path[0] = '\0';
  if (!tmp || !*tmp) tmp = "/tmp";
  if (snprintf(dir, dirlen, "%s/etcd3-XXXXXX", tmp) >= (int)dirlen || !mkdtemp(dir)) {
    snprintf(err, errlen, "cannot make a private directory in %s: %s", tmp, strerror(errno));
    dir[0] = '\0';
    return -1;
  }
  if (snprintf(path, pathlen, "%s/%s", dir, name) >= (int)pathlen ||
      strlen(path) >= sizeof addr.sun_path) {
    snprintf(err, errlen, "socket path too long: %s/%s", dir, name);
    path[0] = '\0';
    etcd3_unlisten_private(-1, dir, path);
    return -1;
  }
  memset(&addr, 0, sizeof addr);
  addr.sun_family = AF_UNIX;
  memcpy(addr.sun_path, path, strlen(path) + 1);
  fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0 || bind(fd, (struct sockaddr *)&addr, sizeof addr) != 0 || listen(fd, backlog) != 0) {
    snprintf(err, errlen, "cannot listen on %s: %s", path, strerror(errno));
    /* bind may have made the file: remove both */
    etcd3_unlisten_private(fd, dir, path);
    return -1;
  }
  return fd;
}

void etcd3_unlisten_private(int fd, char *dir, char *path) {
  if (fd >= 0) close(fd);
  if (path[0]) unlink(path);
  path[0] = '\0';
  if (dir[0]) rmdir(dir);
  dir[0] = '\0';
}

/* Opens the listening socket in a new private directory; 0 and a message
 * in err on failure (nothing left behind). */
ETCD3_LOCKED static int listen_private(notifier *n, char *err, size_t errlen) {
  n->listen_fd = etcd3_listen_private("n", 4, n->dir, sizeof n->dir, n->path, sizeof n->path, err, errlen);
  return n->listen_fd >= 0;
}

/* notifier:listen() -> path | nil, message: a new socket to connect to
 * (any previous connection is dropped: one reader at a time). Nothing
 * touches Lua under the engine mutex: an allocation may run a __gc that
 * takes it. */
static int notifier_listen(lua_State *L) {
  etcd3_engine *e = check_ref(L);
  notifier *n;
  char err[PATH_MAX + 128], path[sizeof(((struct sockaddr_un *)0)->sun_path)];
  int ok = 0, closed;
  pthread_mutex_lock(&e->mu);
  closed = e->closed;
  n = notifier_of(e);
  if (n) {
    drop_all(n);
    ok = listen_private(n, err, sizeof err);
    if (ok) memcpy(path, n->path, sizeof path);
  } else {
    snprintf(err, sizeof err, "%s", closed ? "client is closed" : "out of memory");
  }
  pthread_mutex_unlock(&e->mu);
  if (ok) {
    lua_pushstring(L, path);
    return 1;
  }
  lua_pushnil(L);
  lua_pushstring(L, err);
  return 2;
}

/* notifier:accept() -> true | nil, message: takes the connection the
 * worker made (it is queued already: connecting to a listening unix socket
 * completes at once) and removes the socket file and directory. */
static int notifier_accept(lua_State *L) {
  etcd3_engine *e = check_ref(L);
  notifier *n;
  const char *why = NULL;
  char err[128];
  pthread_mutex_lock(&e->mu);
  n = notifier_of(e);
  if (!n || n->listen_fd < 0) {
    why = n ? "not listening" : "client is closed";
  } else {
    for (;;) {
      struct ucred cred;
      socklen_t len = sizeof cred;
      int fd = accept4(n->listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
      if (fd < 0) {
        snprintf(err, sizeof err, "no connection to accept: %s", strerror(errno));
        why = err;
        break;
      }
      /* the directory is private already; this also rules out another
       * process of the same user */
      if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0 || cred.pid != getpid()) {
        close(fd);
        continue;
      }
      n->conn_fd = fd;
      n->armed = 0;
      n->overflow = 1; /* what was posted before is not known: look at all */
      n->n_keys = 0;
      break;
    }
    drop_listener(n);
  }
  pthread_mutex_unlock(&e->mu);
  if (!why) {
    lua_pushboolean(L, 1);
    return 1;
  }
  lua_pushnil(L);
  lua_pushstring(L, why);
  return 2;
}

/* notifier:take() -> { key = true, … } | nil | false: re-arms (the next
 * news post writes a byte) and hands over the objects posted since the
 * last take; nil: look at every waiter (too many, or not known); false:
 * not connected (any more). Called before Lua looks at what is ready, so a
 * post that comes meanwhile writes the next byte. */
static int notifier_take(lua_State *L) {
  etcd3_engine *e = check_ref(L);
  notifier *n;
  const int **keys = NULL;
  size_t n_keys = 0;
  int connected, all = 0;
  pthread_mutex_lock(&e->mu);
  n = notifier_of(e);
  connected = n && n->conn_fd >= 0;
  if (connected) {
    /* the two lists swap: the engine fills one while Lua reads the other
     * (only this reader takes; the notifier frees both, so a raise while
     * the table is built leaks nothing) */
    const int **mine = n->keys;
    size_t cap = n->cap_keys;
    all = n->overflow;
    n_keys = n->n_keys;
    keys = mine;
    n->keys = n->taken;
    n->cap_keys = n->cap_taken;
    n->taken = mine;
    n->cap_taken = cap;
    n->armed = 1;
    n->overflow = 0;
    n->n_keys = 0;
  }
  /* the table is made after: an allocation may run a __gc that locks */
  pthread_mutex_unlock(&e->mu);
  if (!connected) {
    lua_pushboolean(L, 0);
  } else if (all) {
    lua_pushnil(L);
  } else {
    lua_createtable(L, 0, (int)n_keys);
    for (size_t i = 0; i < n_keys; i++) {
      lua_pushlightuserdata(L, (void *)keys[i]);
      lua_pushboolean(L, 1);
      lua_rawset(L, -3);
    }
  }
  return 1;
}

/* notifier:close(): drops the connection (the worker's read sees it
 * closed) and anything left on disk. Idempotent. */
static int notifier_close(lua_State *L) {
  etcd3_engine *e = check_ref(L);
  notifier *n;
  pthread_mutex_lock(&e->mu);
  n = (notifier *)etcd3_engine_service(e, &notifier_service);
  if (n && n->engine) drop_all(n);
  pthread_mutex_unlock(&e->mu);
  return 0;
}

static int notifier_gc(lua_State *L) {
  notifier_ref *r = (notifier_ref *)etcd3_bound_take(L, ETCD3_NOTIFIER_MT);
  if (!r) return 0;
  etcd3_engine_release(r->engine);
  free(r);
  return 0;
}

int etcd3_notifier_new(lua_State *L, etcd3_engine *e) {
  etcd3_bound_new(L, ETCD3_NOTIFIER_MT, sizeof(notifier_ref), e);
  etcd3_engine_ref(e);
  return 1;
}

int etcd3_notifier_open(lua_State *L) {
  static const luaL_Reg methods[] = {
    {"listen", notifier_listen}, {"accept", notifier_accept},
    {"take", notifier_take}, {"close", notifier_close}, {NULL, NULL},
  };
  etcd3_register_type(L, ETCD3_NOTIFIER_MT, methods, notifier_gc);
  return 0;
}
