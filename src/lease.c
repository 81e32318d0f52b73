/*
 * lease.c - lease liveness and keepalive, run by the engine thread.
 *
 * Every lease the Lua side holds has a C object here (the etcd3.LeaseState
 * userdata) that knows when the lease runs out: etcd's last acknowledged
 * TTL counted from the moment that renewal was sent. Leases under
 * keepalive are renewed every ttl/3 over one LeaseKeepAlive stream per
 * client, by the engine thread, whatever the Lua code is doing (a CPU loop,
 * a blocking os.execute). When the stream breaks, it is re-opened on the
 * next endpoint while the leases live.
 *
 * A lease is lost when etcd answers ttl <= 0 (expired or revoked), when it
 * is revoked through this client, or when its TTL ran out locally since
 * the last acknowledged renewal (a frozen or partitioned member). Losing it
 * signals the pollfd, so event loops wake.
 *
 * The leases under keepalive and their stream are the engine's "lease
 * keepalive" service (registered on the first keepalive). Lease objects
 * are shared by the Lua userdata, that list and the renewals in flight,
 * counted in `refs` under the engine mutex.
 *
 * Cost at scale: a client keeping 1000 leases idles at a few wake-ups per
 * renewal interval. When one lease falls due, every lease due within a
 * quarter of its interval leaves with it (a renewal a little early is
 * harmless), so leases granted at different moments renew together from
 * their second renewal on. The engine runs every service's tick after each
 * completion (each renewal's send and answer is one): the tick returns at
 * once until the earliest time it asked for, unless something changed
 * (`rescan`), and an answer finds its lease in the queue of renewals in
 * flight, not by a walk over the list (bench/README.md, "Game-server
 * scale": 3 % of a core before, for 1000 leases with a 10 s TTL).
 */
#include <stdlib.h>
#include <string.h>

#include "auxiliar.h"
#include "lease.h"
#include "stream.h"
#include "rpc.pb-c.h"

struct etcd3_lease {
  etcd3_engine *engine;        /* first: an engine-bound object (auxiliar.h) */
  int refs;               /* the Lua userdata or the engine's owner, the list, renewals in flight */
  int64_t id;
  int64_t ttl;            /* last TTL etcd granted or acknowledged */
  double expires_at;      /* monotonic: when it runs out without renewal */
  double last_send;       /* when the last renewal request left */
  double next_renew;
  int keepalive;          /* in the engine's keepalive list */
  const char *lost;       /* why it is lost, or NULL while alive */
  int news;               /* the loss is posted, not yet seen by Lua */
  int internal;           /* the engine's own (a registration's): no news */
  int *lost_flag;         /* an internal lease's owner: set when it is lost */
  double renew_every;     /* seconds between renewals; 0: a third of the TTL */
  struct etcd3_lease *next;
};

/* A renewal on the stream, not yet answered; it holds a reference to its
 * lease, which its answer updates. */
typedef struct renewal {
  etcd3_lease *lease;
  double sent;
  double patience; /* how long it may go unanswered (answer_within) */
} renewal;

/* The leases the engine renews, over one stream. etcd answers a stream's
 * renewals one by one, in order, so the renewals in flight form a queue
 * (a ring) and each answer counts from its own request's departure: the
 * latest request's, which etcd may never have seen, would overstate the
 * lease's life by up to a renewal interval. The queue belongs to the
 * stream, not to the leases, so answers for a lease taken off the list
 * (and maybe put back) still leave it in step.
 *
 * A renewal still unanswered a third of the TTL after it left (and not
 * before its lease falls due again, nor within a second) means the stream
 * is stuck: its member lost its leader (a partition: etcd holds a
 * follower's renewal until its request timeout, 7 s by default, longer
 * than a short TTL lives) or the connection carries nothing any more
 * (noticed by gRPC keepalive only after keepalive_time + 5 s). The stream
 * then moves to the next endpoint at once, with about a third of the TTL
 * left. A member that is merely slow must not be taken for a stuck one:
 * the answers of a stream closed early are lost, so a member that always
 * answers late would never have one counted. The first renewal on a
 * stream is given half as long again, and later ones at least one and a
 * half times the slowest answer the stream has given. */
typedef struct keepalive_set {
  etcd3_engine *engine;
  etcd3_restream keepalive;
  etcd3_lease *leases;
  renewal *ring;
  size_t head, count, room;
  int astray;             /* an answer matched no renewal: this stream must end */
  double slowest;         /* the longest a renewal waited for its answer on
                           * this stream (0: none answered yet) */
  double next_due;        /* the tick has nothing to do before (0: look now) */
  int rescan;             /* the list, a lease's loss or the stream changed: look now */
} keepalive_set;

ETCD3_LOCKED static double keepalive_tick(etcd3_engine *e, void *state, double now);
ETCD3_LOCKED static void keepalive_shutdown(etcd3_engine *e, void *state);
static void keepalive_free(void *state);

/* token_changed is NULL on purpose: etcd 3.4 checks no token on
 * LeaseKeepAlive, so the open stream keeps renewing with the old one. */
static const etcd3_service_ops keepalive_service = {
  .name = "lease keepalive", .tick = keepalive_tick, .shutdown = keepalive_shutdown,
  .free = keepalive_free,
};

static const etcd3_stream_ops keepalive_ops;

/* The engine's keepalive set, registered on first use; NULL when closed or
 * out of memory. */
ETCD3_LOCKED static keepalive_set *keepalive_of(etcd3_engine *e) {
  keepalive_set *k = (keepalive_set *)etcd3_engine_service_get(e, &keepalive_service, sizeof *k);
  if (k && !k->engine) {
    k->engine = e;
    etcd3_restream_init(&k->keepalive, "/etcdserverpb.Lease/LeaseKeepAlive", 0, &keepalive_ops);
  }
  return k;
}

/* The object's engine reference belongs to the Lua userdata (released
 * in __gc); the keepalive list never outlives the engine. */
static void lease_unref(etcd3_lease *l) {
  if (--l->refs == 0) free(l);
}

/* Queues a renewal about to leave; 0 when out of memory (it must not
 * leave then: its answer would be counted from another's departure). */
ETCD3_LOCKED static int renewal_push(keepalive_set *k, etcd3_lease *l, double sent, double patience) {
  if (k->count == k->room) {
    size_t room = k->room ? k->room * 2 : 16;
    renewal *ring = (renewal *)malloc(room * sizeof *ring);
    if (!ring) return 0;
    for (size_t i = 0; i < k->count; i++) ring[i] = k->ring[(k->head + i) % k->room];
    free(k->ring);
    k->ring = ring;
    k->head = 0;
    k->room = room;
  }
  k->ring[(k->head + k->count++) % k->room] = (renewal){ l, sent, patience };
  l->refs++;
  return 1;
}

/* Takes the oldest renewal in flight off the queue; the caller drops its
 * lease reference. */
ETCD3_LOCKED static renewal renewal_pop(keepalive_set *k) {
  renewal oldest = k->ring[k->head];
  k->head = (k->head + 1) % k->room;
  k->count--;
  return oldest;
}

/* A third of the TTL, at least a second. */
static double third_of_ttl(const etcd3_lease *l) {
  return l->ttl > 3 ? (double)l->ttl / 3.0 : 1.0;
}

/* A third of the TTL, unless the owner chose. */
static double renew_interval(const etcd3_lease *l) {
  return l->renew_every > 0 ? l->renew_every : third_of_ttl(l);
}

/* How long a renewal may go unanswered before its stream counts as stuck
 * (before what the stream's answers so far allow). */
static double answer_within(const etcd3_lease *l) {
  double third = third_of_ttl(l), every = renew_interval(l);
  return every > third ? every : third;
}

/* When the stream counts as stuck if the oldest renewal in flight is still
 * unanswered (0: none in flight). */
ETCD3_LOCKED static double stuck_at(const keepalive_set *k) {
  const renewal *oldest;
  double wait;
  if (k->count == 0) return 0;
  oldest = &k->ring[k->head];
  if (k->slowest == 0) wait = 1.5 * oldest->patience;
  else wait = 1.5 * k->slowest > oldest->patience ? 1.5 * k->slowest : oldest->patience;
  return oldest->sent + wait;
}

/* How early a renewal may leave to go with others due: a quarter of the
 * interval keeps the lease's life, counted from its last answer, above
 * two thirds of its TTL (etcd's TTL is at least 5 s anyway). */
#define RENEW_EARLY 0.25

/* Marks the lease lost and wakes Lua (an internal lease: its owner). */
ETCD3_LOCKED static void lose(etcd3_lease *l, const char *why) {
  keepalive_set *k;
  if (l->lost) return;
  l->lost = why;
  if (!l->internal) etcd3_news_post(l->engine, &l->news);
  else if (l->lost_flag) *l->lost_flag = 1;
  /* off the list at the next tick */
  if (l->keepalive && (k = (keepalive_set *)etcd3_engine_service(l->engine, &keepalive_service)))
    k->rescan = 1;
}

/* Takes the lease off the keepalive list; drops the list's reference
 * unless keep_ref (the caller then drops it with its own). */
ETCD3_LOCKED static void unlink_lease(keepalive_set *k, etcd3_lease *l, int keep_ref) {
  etcd3_lease **p = &k->leases;
  while (*p && *p != l) p = &(*p)->next;
  if (!*p) return;
  *p = l->next;
  l->next = NULL;
  l->keepalive = 0;
  if (keep_ref) l->refs--;
  else lease_unref(l);
}

/* The stream ended: no answer comes for the renewals in flight; on the
 * next stream (the next endpoint, after a short backoff) every lease
 * renews at once. */
ETCD3_LOCKED static void renewals_forgotten(keepalive_set *k) {
  while (k->count > 0) lease_unref(renewal_pop(k).lease);
  k->astray = 0;
  k->slowest = 0;
  k->rescan = 1;
  for (etcd3_lease *l = k->leases; l; l = l->next) l->next_renew = 0;
}

/* etcd's answer `r` for lease `l` (under keepalive); `counted`: it
 * answers the renewal that left at `sent`. */
ETCD3_LOCKED static void renewal_answered(keepalive_set *k, etcd3_lease *l,
                                          const Etcdserverpb__LeaseKeepAliveResponse *r,
                                          int counted, double sent) {
  if (r->ttl <= 0) {
    lose(l, "etcd says the lease expired or was revoked");
  } else if (!l->lost) {
    l->ttl = r->ttl;
    if (counted && sent + (double)r->ttl > l->expires_at) l->expires_at = sent + (double)r->ttl;
    l->next_renew = l->last_send + (l->renew_every > 0 ? l->renew_every : (double)r->ttl / 3.0);
    if (l->next_renew < k->next_due) k->next_due = l->next_renew;
  }
}

ETCD3_LOCKED static void on_keepalive(void *owner, etcd3_stream *s, ProtobufCMessage *msg) {
  keepalive_set *k = (keepalive_set *)owner;
  Etcdserverpb__LeaseKeepAliveResponse *r = (Etcdserverpb__LeaseKeepAliveResponse *)msg;
  (void)s;
  if (!k->astray && k->count > 0 && k->ring[k->head].lease->id == r->id) {
    renewal done = renewal_pop(k);
    double waited = etcd3_now() - done.sent;
    if (waited > k->slowest) k->slowest = waited;
    etcd3_restream_healthy(&k->keepalive);
    /* a lease taken off the list since is no longer kept: left as it is */
    if (done.lease->keepalive) renewal_answered(k, done.lease, r, 1, done.sent);
    lease_unref(done.lease);
  } else {
    /* never seen: it extends nothing, and the next tick ends the stream */
    k->astray = 1;
    k->rescan = 1;
    for (etcd3_lease *l = k->leases; l; l = l->next)
      if (l->id == r->id) renewal_answered(k, l, r, 0, 0);
  }
  protobuf_c_message_free_unpacked(msg, NULL);
}

ETCD3_LOCKED static void on_keepalive_closed(void *owner, etcd3_stream *s, grpc_status_code status,
                                             const char *details) {
  keepalive_set *k = (keepalive_set *)owner;
  (void)s;
  etcd3_restream_broken(k->engine, &k->keepalive, status, details);
  renewals_forgotten(k);
}

static const etcd3_stream_ops keepalive_ops = {
  .response = &etcdserverpb__lease_keep_alive_response__descriptor,
  .on_message = on_keepalive, .on_closed = on_keepalive_closed,
};

/* Renews what is due (with what falls due soon), notices what ran out,
 * keeps the stream open while leases need it. Returns the next time it
 * wants to run (0: none); before then it returns at once, unless rescan. */
ETCD3_LOCKED static double keepalive_tick(etcd3_engine *e, void *state, double now) {
  keepalive_set *k = (keepalive_set *)state;
  etcd3_stream *stream;
  double next = 0;
  etcd3_lease *l, *following;
  if (e->closed) return 0;
  if (!k->rescan && k->next_due > 0 && now < k->next_due) return k->next_due;
  for (l = k->leases; l; l = following) {
    following = l->next;
    if (!l->lost && now >= l->expires_at) lose(l, "the TTL ran out without a renewal");
    if (l->lost) unlink_lease(k, l, 0);
  }
  /* out of step with etcd's answers, or stuck: as if it broke */
  if (k->astray || (k->count > 0 && now >= stuck_at(k))) {
    etcd3_restream_close(&k->keepalive);
    etcd3_restream_broken(e, &k->keepalive, GRPC_STATUS_UNAVAILABLE, NULL);
    renewals_forgotten(k);
  }
  if (!k->leases) {
    etcd3_restream_close(&k->keepalive);
    renewals_forgotten(k);
    k->rescan = 0;
    k->next_due = 0;
    return 0;
  }
  stream = etcd3_restream_open(e, &k->keepalive, k, now);
  for (l = k->leases; l; l = l->next) {
    if (stream && now >= l->next_renew - RENEW_EARLY * renew_interval(l)) {
      Etcdserverpb__LeaseKeepAliveRequest req = ETCDSERVERPB__LEASE_KEEP_ALIVE_REQUEST__INIT;
      req.id = l->id;
      if (renewal_push(k, l, now, answer_within(l))) {
        if (etcd3_stream_send(stream, &req.base)) {
          l->last_send = now;
          /* ask again after a third of the TTL even if no answer comes */
          l->next_renew = now + renew_interval(l);
        } else {
          k->count--; /* it did not leave */
          l->refs--;  /* (the list's reference is still there) */
        }
      }
    }
    if (next == 0 || l->next_renew < next) next = l->next_renew;
    if (l->expires_at < next) next = l->expires_at;
  }
  if (!stream && (next == 0 || k->keepalive.reopen_at < next)) next = k->keepalive.reopen_at;
  if (k->count > 0 && stuck_at(k) < next) next = stuck_at(k);
  k->next_due = next;
  k->rescan = 0; /* (losses found above are unlinked already) */
  return next;
}

/* Engine close: every lease under keepalive is let go. */
ETCD3_LOCKED static void keepalive_shutdown(etcd3_engine *e, void *state) {
  keepalive_set *k = (keepalive_set *)state;
  (void)e;
  etcd3_restream_close(&k->keepalive);
  renewals_forgotten(k);
  while (k->leases) unlink_lease(k, k->leases, 0);
}

static void keepalive_free(void *state) {
  keepalive_set *k = (keepalive_set *)state;
  while (k->count > 0) lease_unref(renewal_pop(k).lease); /* none after shutdown */
  free(k->ring);
  free(k);
}

/* A granted lease's liveness: `ttl` seconds from `since`, when the request
 * that granted (or renewed) it left. */
static void lease_start(etcd3_lease *l, int64_t id, int64_t ttl, double since) {
  l->id = id;
  l->ttl = ttl;
  l->last_send = since;
  l->expires_at = since + (double)ttl;
}

/* ---- the engine's own leases ------------------------------------------ */

ETCD3_LOCKED etcd3_lease *etcd3_lease_keep(etcd3_engine *e, int64_t id, int64_t ttl,
                                           double renew_every, double since, int *lost_flag) {
  keepalive_set *k = keepalive_of(e);
  etcd3_lease *l;
  if (!k || e->closed) return NULL;
  l = (etcd3_lease *)calloc(1, sizeof *l);
  if (!l) return NULL;
  l->engine = e;
  l->refs = 2; /* the caller's and the keepalive list's */
  lease_start(l, id, ttl, since);
  l->internal = 1;
  l->lost_flag = lost_flag;
  l->renew_every = renew_every;
  l->keepalive = 1;
  l->next = k->leases;
  k->leases = l;
  k->rescan = 1;
  keepalive_tick(e, k, etcd3_now()); /* the first renewal leaves now */
  return l;
}

ETCD3_LOCKED int etcd3_lease_alive(etcd3_lease *l, double now) {
  if (!l->lost && now >= l->expires_at) lose(l, "the TTL ran out without a renewal");
  return !l->lost;
}

ETCD3_LOCKED double etcd3_lease_expires_at(const etcd3_lease *l) { return l->expires_at; }

ETCD3_LOCKED void etcd3_lease_let_go(etcd3_lease *l) {
  if (l->keepalive) unlink_lease(etcd3_engine_service(l->engine, &keepalive_service), l, 1);
  lease_unref(l);
}

/* ---- Lua ------------------------------------------------------------- */

static etcd3_lease *check_lease(lua_State *L) {
  return (etcd3_lease *)etcd3_bound_check(L, ETCD3_LEASE_MT, "lease");
}

/* core client:lease(id, ttl, since) -> state: liveness of a granted lease,
 * counted from when its grant left. */
int etcd3_lease_new(lua_State *L, etcd3_engine *e, int64_t id, int64_t ttl, double since) {
  etcd3_lease *l = (etcd3_lease *)etcd3_bound_new(L, ETCD3_LEASE_MT, sizeof *l, e);
  l->refs = 1;
  lease_start(l, id, ttl, since);
  etcd3_engine_ref(e);
  return 1;
}

/* state:keepalive(): renew in the background from now on. */
static int lease_keepalive(lua_State *L) {
  etcd3_lease *l = check_lease(L);
  etcd3_engine *e = l->engine;
  keepalive_set *k;
  int ok = 1;
  pthread_mutex_lock(&e->mu);
  k = keepalive_of(e);
  if (e->closed || !k) ok = 0;
  else if (!l->keepalive && !l->lost) {
    l->keepalive = 1;
    l->refs++;
    l->next_renew = 0;
    l->next = k->leases;
    k->leases = l;
    k->rescan = 1;
    keepalive_tick(e, k, etcd3_now()); /* the first renewal leaves now */
  }
  pthread_mutex_unlock(&e->mu);
  if (!ok) return luaL_error(L, "etcd3: client is closed");
  lua_pushboolean(L, !l->lost);
  return 1;
}

/* state:stop(): no more renewals (the lease then expires on its own). */
static int lease_stop(lua_State *L) {
  etcd3_lease *l = check_lease(L);
  etcd3_engine *e = l->engine;
  pthread_mutex_lock(&e->mu);
  /* the userdata still holds a reference: the object stays */
  if (l->keepalive) unlink_lease(etcd3_engine_service(e, &keepalive_service), l, 1);
  pthread_mutex_unlock(&e->mu);
  return 0;
}

/* state:renewed(ttl, sent_at): a keepalive_once answer (ttl <= 0: gone). */
static int lease_renewed(lua_State *L) {
  etcd3_lease *l = check_lease(L);
  lua_Number ttl = luaL_checknumber(L, 2);
  lua_Number sent_at = luaL_checknumber(L, 3);
  pthread_mutex_lock(&l->engine->mu);
  if (ttl <= 0) lose(l, "etcd says the lease expired or was revoked");
  else if (!l->lost) {
    l->ttl = (int64_t)ttl;
    if (sent_at + ttl > l->expires_at) l->expires_at = sent_at + ttl;
  }
  pthread_mutex_unlock(&l->engine->mu);
  return 0;
}

/* state:lose(why): revoked or found gone by a call of the Lua side. */
static int lease_lose(lua_State *L) {
  etcd3_lease *l = check_lease(L);
  luaL_checkstring(L, 2);
  pthread_mutex_lock(&l->engine->mu);
  /* the reason must outlive the Lua string: use fixed texts */
  lose(l, strcmp(lua_tostring(L, 2), "revoked") == 0 ? "the lease was revoked"
                                                     : "etcd says the lease expired or was revoked");
  pthread_mutex_unlock(&l->engine->mu);
  return 0;
}

/* state:status() -> alive, remaining, why_lost, keepalive: whether the
 * lease is alive, the seconds left (0 once lost), why it was lost (nil
 * while alive) and whether the engine renews it. A TTL found run out here
 * loses the lease first; a loss, once reported, is no longer news. */
static int lease_status(lua_State *L) {
  etcd3_lease *l = check_lease(L);
  double now = etcd3_now();
  int alive, keepalive;
  double remaining;
  const char *lost;
  pthread_mutex_lock(&l->engine->mu);
  if (!l->lost && now >= l->expires_at) lose(l, "the TTL ran out without a renewal");
  alive = !l->lost;
  remaining = alive ? l->expires_at - now : 0;
  if (!alive) etcd3_news_seen(l->engine, &l->news);
  lost = l->lost; /* one of lose()'s fixed texts: outlives the lock */
  keepalive = l->keepalive;
  /* pushed after the lock: a push may run finalisers that take it */
  pthread_mutex_unlock(&l->engine->mu);
  lua_pushboolean(L, alive);
  lua_pushnumber(L, remaining);
  if (lost) lua_pushstring(L, lost);
  else lua_pushnil(L);
  lua_pushboolean(L, keepalive);
  return 4;
}

/* Lost yet? Noticing a TTL that ran out here; wakes at the expiry. */
ETCD3_LOCKED static int lost_or_expired(void *arg, double now, double *until) {
  etcd3_lease *l = (etcd3_lease *)arg;
  if (!l->lost && now >= l->expires_at) lose(l, "the TTL ran out without a renewal");
  if (l->expires_at < *until) *until = l->expires_at;
  return l->lost != NULL;
}

/* state:wait(seconds): blocks until lost or the time passes. */
static int lease_wait(lua_State *L) {
  etcd3_lease *l = check_lease(L);
  etcd3_engine_wait_until(l->engine, luaL_checknumber(L, 2), lost_or_expired, l);
  return 0;
}

static int lease_gc(lua_State *L) {
  etcd3_lease *l = (etcd3_lease *)etcd3_bound_take(L, ETCD3_LEASE_MT);
  etcd3_engine *e;
  if (!l) return 0;
  e = l->engine;
  pthread_mutex_lock(&e->mu);
  etcd3_news_seen(e, &l->news);
  if (l->keepalive) unlink_lease(etcd3_engine_service(e, &keepalive_service), l, 1);
  lease_unref(l);
  pthread_mutex_unlock(&e->mu);
  etcd3_engine_release(e);
  return 0;
}

int etcd3_lease_open(lua_State *L) {
  static const luaL_Reg methods[] = {
    {"keepalive", lease_keepalive}, {"stop", lease_stop}, {"renewed", lease_renewed},
    {"lose", lease_lose}, {"status", lease_status}, {"wait", lease_wait}, {NULL, NULL},
  };
  etcd3_register_type(L, ETCD3_LEASE_MT, methods, lease_gc);
  return 0;
}
