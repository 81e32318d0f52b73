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
 * (SO_PEERCRED), but for one case: a writer that runs as root (OpenResty's
 * privileged agent keeps the master's user, root, while the workers run
 * as nginx's `user`) opens the directory to be crossed and the socket to
 * be connected to by anyone, and takes a process of another user when it
 * has the same parent, the nginx master. A connection whose reader went is
 * dropped at the next post. The writer's Lua posts after its batches; the
 * engine thread posts after a batch it wrote itself (sink.c), so the feed
 * is shared: a mutex guards it, and the userdata and the sink each hold a
 * reference.
 */
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <poll.h>
#include <pthread.h>
#include <unistd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>

#include "auxiliar.h"
#include "feed.h"
#include "notifier.h"

/* Connections queued between two posts, at most (beyond, a worker's
 * reader fails to connect, and its views poll). */
#define FEED_BACKLOG 512

struct etcd3_feed {
  pthread_mutex_t mu; /* guards what follows */
  int refs;
  int fd;       /* -1 once closed */
  int *conns;   /* the readers' connections */
  size_t n_conns, cap_conns;
  char dir[PATH_MAX];
  char path[sizeof(((struct sockaddr_un *)0)->sun_path)];
};

typedef struct etcd3_feed feed;

/* What the userdata holds: NULL only when the feed could not be made. */
typedef struct feed_box {
  feed *f;
} feed_box;

static feed *check_feed(lua_State *L) {
  feed *f = ((feed_box *)luaL_checkudata(L, 1, ETCD3_FEED_MT))->f;
  if (!f) luaL_argerror(L, 1, "not a feed");
  return f;
}

feed *etcd3_feed_ref(lua_State *L, int idx) {
  feed *f = ((feed_box *)luaL_checkudata(L, idx, ETCD3_FEED_MT))->f;
  if (!f) return NULL;
  pthread_mutex_lock(&f->mu);
  f->refs++;
  pthread_mutex_unlock(&f->mu);
  return f;
}

/* Closes the socket and the connections; f->mu held. */
static void close_locked(feed *f) {
  etcd3_unlisten_private(f->fd, f->dir, f->path);
  f->fd = -1;
  for (size_t i = 0; i < f->n_conns; i++) close(f->conns[i]);
  free(f->conns);
  f->conns = NULL;
  f->n_conns = f->cap_conns = 0;
}

void etcd3_feed_unref(feed *f) {
  int last;
  if (!f) return;
  pthread_mutex_lock(&f->mu);
  last = --f->refs == 0;
  if (last) close_locked(f);
  pthread_mutex_unlock(&f->mu);
  if (!last) return;
  pthread_mutex_destroy(&f->mu);
  free(f);
}

/* core.feed() -> feed | nil, message: a new listening socket. */
static int feed_new(lua_State *L) {
  char err[PATH_MAX + 128];
  feed_box *box = (feed_box *)lua_newuserdata(L, sizeof *box);
  feed *f;
  box->f = NULL;
  luaL_setmetatable(L, ETCD3_FEED_MT);
  f = (feed *)calloc(1, sizeof *f);
  if (!f) return luaL_error(L, "out of memory");
  pthread_mutex_init(&f->mu, NULL);
  f->refs = 1;
  f->fd = -1;
  box->f = f;
  f->fd = etcd3_listen_private("f", FEED_BACKLOG, f->dir, sizeof f->dir, f->path, sizeof f->path, err,
                               sizeof err);
  /* root's readers may be another user (see the top) */
  if (f->fd >= 0 && geteuid() == 0 && (chmod(f->dir, 0711) != 0 || chmod(f->path, 0666) != 0)) {
    snprintf(err, sizeof err, "cannot open %s to the workers: %s", f->path, strerror(errno));
    etcd3_unlisten_private(f->fd, f->dir, f->path);
    f->fd = -1;
  }
  if (f->fd >= 0) return 1;
  lua_pushnil(L);
  lua_pushstring(L, err);
  return 2;
}

/* feed:path() -> the socket's path (nil once closed) */
static int feed_path(lua_State *L) {
  feed *f = check_feed(L);
  char path[sizeof f->path];
  int open;
  /* copied under the mutex, pushed after it: a push may raise (out of
   * memory) or run a __gc that frees a sink, which takes this mutex */
  pthread_mutex_lock(&f->mu);
  open = f->fd >= 0;
  if (open) memcpy(path, f->path, sizeof path);
  pthread_mutex_unlock(&f->mu);
  if (open) lua_pushstring(L, path);
  return open;
}

/* Whether process `pid` has the same parent as this one (/proc/PID/stat:
 * the parent's pid follows the state, after the name's closing paren). */
static int sibling(pid_t pid) {
  char name[64], text[512], *end;
  FILE *file;
  size_t n;
  long ppid;
  snprintf(name, sizeof name, "/proc/%ld/stat", (long)pid);
  file = fopen(name, "re");
  if (!file) return 0;
  n = fread(text, 1, sizeof text - 1, file);
  fclose(file);
  text[n] = '\0';
  end = strrchr(text, ')');
  if (!end || sscanf(end + 1, " %*c %ld", &ppid) != 1) return 0;
  return ppid == (long)getppid();
}

/* Takes the connections queued since the last post (f->mu held). A poll first: an
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
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0 ||
        (cred.uid != me && !(me == 0 && sibling(cred.pid)))) {
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

size_t etcd3_feed_post(feed *f) {
  static const char byte = 'f';
  size_t kept = 0, woken = 0;
  pthread_mutex_lock(&f->mu);
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
  pthread_mutex_unlock(&f->mu);
  return woken;
}

/* feed:post() -> the number of readers woken: one byte to each. Never
 * blocks; a reader with a byte still unread (EAGAIN) needs no other. */
static int feed_post(lua_State *L) {
  lua_pushinteger(L, (lua_Integer)etcd3_feed_post(check_feed(L)));
  return 1;
}

/* feed:close(): stops listening, closes every reader's connection (they
 * see it closed) and removes the socket file and its directory.
 * Idempotent; a sink that holds the feed posts nothing after it. */
static int feed_close(lua_State *L) {
  feed *f = check_feed(L);
  pthread_mutex_lock(&f->mu);
  close_locked(f);
  pthread_mutex_unlock(&f->mu);
  return 0;
}

/* __gc: closes the feed, unless a sink still holds it (then its last
 * reference does). */
static int feed_gc(lua_State *L) {
  feed_box *box = (feed_box *)luaL_checkudata(L, 1, ETCD3_FEED_MT);
  etcd3_feed_unref(box->f);
  box->f = NULL;
  return 0;
}

int etcd3_feed_open(lua_State *L) {
  static const luaL_Reg methods[] = {
    {"path", feed_path}, {"post", feed_post}, {"close", feed_close}, {NULL, NULL},
  };
  etcd3_register_type(L, ETCD3_FEED_MT, methods, feed_gc);
  lua_pushcfunction(L, feed_new);
  lua_setfield(L, -2, "feed");
  return 0;
}
