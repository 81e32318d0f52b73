/*
 * engine.h - one completion queue, one thread, the channels and the timers
 * of a client; background services register with it.
 *
 * Ownership in one paragraph: an engine owns a gRPC completion queue, the
 * channels to every endpoint and the thread that waits on the queue. It is
 * reference counted: the client userdata holds one reference and every
 * object bound to it (call, lease, watcher, stream) holds one, so userdata
 * may be collected in any order. The engine thread never touches a
 * lua_State (this header does not include lua.h): it completes work under
 * the engine mutex, signals the condition variable, and counts news for Lua
 * on the eventfd that `client:pollfd()` exposes.
 *
 * Services (lease keepalive, watches, auth, calls, ...) are what run in the
 * background. Each registers an etcd3_service_ops table with its state; the
 * engine calls them through the table and never names one.
 *
 * Locking: a function or callback marked ETCD3_LOCKED is called with the
 * engine mutex (e->mu) held, and must not take it again.
 *
 * The lock rule: no Lua value is made while e->mu is held. Any Lua
 * allocation (a pushed string, a new table or userdata) may run the garbage
 * collector, whose finalisers (a dropped call's, a watcher's) take e->mu:
 * the thread would wait on itself. And a Lua API call may raise, leaving
 * the mutex locked. Read what is needed under the lock into C memory (or
 * Lua-owned memory allocated before taking it), unlock, then push.
 */
#ifndef ETCD3_ENGINE_H
#define ETCD3_ENGINE_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#include <grpc/grpc.h>

/* Documents that the caller holds e->mu (see above). */
#define ETCD3_LOCKED

/* Every completion queue tag starts with this: the thread that takes the
 * event off the queue calls `done` with its success flag. */
typedef struct etcd3_tag {
  void (*done)(struct etcd3_tag *tag, int ok);
} etcd3_tag;

typedef struct etcd3_channel {
  char *target;       /* host:port as handed to gRPC */
  grpc_channel *channel;
  int retired;        /* auto_sync found the member removed: never picked */
} etcd3_channel;

typedef struct etcd3_channel_options {
  int keepalive_ms;
  int max_recv_bytes;
  int tls;                      /* TLS channels, with these PEM texts: */
  const char *ca, *cert, *key;  /* NULL: system roots / no client cert */
  const char *server_name;      /* overrides the name checked (may be NULL) */
} etcd3_channel_options;

typedef struct etcd3_engine etcd3_engine;

/* A background service: every member may be NULL (nothing to do then).
 * Each service defines one static table by member name, leaving out what
 * it does not use (docs/extending.md):
 *   static const etcd3_service_ops auth_service = {
 *     .name = "auth", .metadata = auth_metadata, .free = auth_free,
 *   };
 * and registers its state on first use with etcd3_engine_service_get. */
typedef struct etcd3_service_ops {
  const char *name;
  /* Runs what is due at `now` (monotonic seconds); returns when it wants
   * to run again (0: no wish). Engine thread, or a Lua thread that wants
   * work to leave at once. The engine thread calls it after every
   * completion too, due or not: a service with many objects returns at
   * once before its time unless something changed (lease.c, registration.c). */
  ETCD3_LOCKED double (*tick)(etcd3_engine *e, void *state, double now);
  /* Fills up to `room` metadata entries every call and stream carries
   * (the auth token); returns how many. */
  ETCD3_LOCKED size_t (*metadata)(etcd3_engine *e, void *state, grpc_metadata *md, size_t room);
  /* The auth token changed: streams carry theirs from their start. */
  ETCD3_LOCKED void (*token_changed)(etcd3_engine *e, void *state);
  /* The engine closes: cancel what is under way, let go of Lua's objects. */
  ETCD3_LOCKED void (*shutdown)(etcd3_engine *e, void *state);
  /* The engine's last reference is gone (nobody else can run): free. */
  void (*free)(void *state);
  /* News was posted for Lua (etcd3_news_post): wake whoever waits for it
   * in a way the pollfd cannot reach (an nginx worker's event loop).
   * `posted` is the object's news flag: its address names the object (the
   * `news_key` of calls and watchers). */
  ETCD3_LOCKED void (*on_news)(etcd3_engine *e, void *state, const int *posted);
} etcd3_service_ops;

typedef struct etcd3_service {
  const etcd3_service_ops *ops;
  void *state;
} etcd3_service;

struct etcd3_engine {
  pthread_mutex_t mu;           /* guards everything below that changes */
  pthread_cond_t cond;          /* broadcast on every completion */
  grpc_completion_queue *cq;    /* the engine thread's */
  grpc_completion_queue *pluck_cq; /* plucked by blocking Lua calls (call.c) */
  pthread_t thread;
  int thread_started;
  int closed;                   /* set once by etcd3_engine_close */
  int resting;                  /* the engine thread is not polling */
  int polled;                   /* calls and streams the engine thread completes */
  int refs;                     /* client + bound objects + engine-owned calls */
  int eventfd;                  /* readable while `news` > 0 */
  unsigned long news;           /* posted news Lua has not seen */
  unsigned fork_generation;     /* forks seen when the engine was made */
  /* Both arrays below grow (realloc under mu) and never shrink: an index
   * stays valid, a pointer into them does not. The channels are added by
   * the Lua thread only, which may read them unlocked; other threads read
   * them under mu. Services are added under mu, also from a service's own
   * callback: a loop over them copies each entry out (the state a service
   * registered never moves). */
  size_t n_channels, channels_room;
  size_t current;               /* where requests start (policy.c) */
  etcd3_channel *channels;
  etcd3_channel_options channel_options; /* keepalive, max size, tls flag */
  size_t n_services, services_room;
  etcd3_service *services;
  int64_t seen_revision;        /* highest header revision of any response (atomic) */
};

/* Records a response header's revision (any thread, with or without the
 * mutex): watch.c starts a shared watcher above it. */
static inline void etcd3_engine_saw_revision(etcd3_engine *e, int64_t revision) {
  int64_t seen = __atomic_load_n(&e->seen_revision, __ATOMIC_RELAXED);
  while (revision > seen &&
         !__atomic_compare_exchange_n(&e->seen_revision, &seen, revision, 1, __ATOMIC_RELAXED,
                                      __ATOMIC_RELAXED)) {
  }
}

static inline int64_t etcd3_engine_seen_revision(etcd3_engine *e) {
  return __atomic_load_n(&e->seen_revision, __ATOMIC_RELAXED);
}

/* Lifetime */
etcd3_engine *etcd3_engine_new(const char *const *targets, size_t n,
                               const etcd3_channel_options *opts,
                               char *err, size_t errlen);
void etcd3_engine_close(etcd3_engine *e);    /* idempotent; not in a forked child */
void etcd3_engine_release(etcd3_engine *e);  /* drops one reference */
void etcd3_engine_ref(etcd3_engine *e);      /* takes one */
ETCD3_LOCKED void etcd3_engine_ref_locked(etcd3_engine *e);
ETCD3_LOCKED void etcd3_engine_unref_locked(etcd3_engine *e); /* never the last */
int etcd3_engine_forked(const etcd3_engine *e);

/* Services: the state registered with `ops`, or NULL. */
ETCD3_LOCKED void *etcd3_engine_service(etcd3_engine *e, const etcd3_service_ops *ops);
/* The state of the service, registered now as `size` zeroed bytes (the
 * engine frees it with ops->free) when it was not yet; NULL when the
 * engine is closed or out of memory. Any number of services may register. */
ETCD3_LOCKED void *etcd3_engine_service_get(etcd3_engine *e, const etcd3_service_ops *ops,
                                            size_t size);
ETCD3_LOCKED size_t etcd3_engine_metadata(etcd3_engine *e, grpc_metadata *md, size_t room);
ETCD3_LOCKED void etcd3_engine_token_changed(etcd3_engine *e);

/* Channels (which one a request takes is policy.h's) */
int etcd3_engine_add_channel(etcd3_engine *e, const char *target);
ETCD3_LOCKED grpc_completion_queue *etcd3_engine_pluck_queue(etcd3_engine *e);

/* The engine thread polls while something is `polled`; wake it when
 * adding work for it. */
ETCD3_LOCKED void etcd3_engine_wake(etcd3_engine *e);

/* News for Lua: each object keeps one flag; while it is set, the news is
 * counted once on the pollfd (readable while any count is left). A post
 * also runs every service's on_news. */
ETCD3_LOCKED void etcd3_news_post(etcd3_engine *e, int *posted);
ETCD3_LOCKED void etcd3_news_seen(etcd3_engine *e, int *posted);

/* Time and waiting */
double etcd3_now(void);                      /* monotonic seconds */
gpr_timespec etcd3_deadline(double seconds); /* from now, for gRPC */
ETCD3_LOCKED void etcd3_engine_cond_wait(etcd3_engine *e, double seconds);
/* Waits until ready(arg) or `seconds` passed; ready runs locked and may
 * return a sooner deadline in *until. Takes and releases e->mu. */
void etcd3_engine_wait_until(etcd3_engine *e, double seconds,
                             int (*ready)(void *arg, double now, double *until), void *arg);

#endif
