/*
 * lease.c - lease liveness and keepalive, run by the engine thread.
 *
 * Every lease the Lua side holds has a C record here (the etcd3.LeaseState
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
 * Records are shared by the Lua userdata and the engine's keepalive list,
 * counted in `refs` under the engine mutex.
 */
#include <stdlib.h>
#include <string.h>

#include "etcd3.h"
#include "rpc.pb-c.h"

#define LEASE_MT "etcd3.LeaseState"
#define MIN_BACKOFF 0.1
#define MAX_BACKOFF 1.0

typedef struct etcd3_lease {
  etcd3_engine *engine;        /* first: see etcd3_check_record */
  int refs;
  int64_t id;
  int64_t ttl;            /* last TTL etcd granted or acknowledged */
  double expires_at;      /* monotonic: when it runs out without renewal */
  double last_send;       /* when the last renewal request left */
  double next_renew;
  int keepalive;          /* in the engine's keepalive list */
  const char *lost;       /* why it is lost, or NULL while alive */
  int signaled;           /* counted in engine->uncollected */
  struct etcd3_lease *next;
} etcd3_lease;

typedef struct lease_hub {
  etcd3_stream *stream;
  etcd3_lease *leases;    /* under keepalive */
  double reopen_at;
  double backoff;
  size_t channel;
} lease_hub;

static lease_hub *hub_of(etcd3_engine *e) {
  if (!e->lease_hub) {
    lease_hub *h = (lease_hub *)calloc(1, sizeof *h);
    if (!h) return NULL;
    h->backoff = MIN_BACKOFF;
    e->lease_hub = h;
  }
  return (lease_hub *)e->lease_hub;
}

/* The record's engine reference belongs to the Lua userdata (released
 * in __gc); the keepalive list never outlives the engine. */
static void lease_unref(etcd3_lease *l) {
  if (--l->refs == 0) free(l);
}

/* Marks the lease lost and wakes Lua; mutex held. */
static void lose(etcd3_lease *l, const char *why) {
  if (l->lost) return;
  l->lost = why;
  etcd3_signal(l->engine, &l->signaled);
}

/* Takes the lease off the keepalive list; drops the list's reference
 * unless keep_ref (the caller then drops it with its own). */
static void unlink_lease(lease_hub *h, etcd3_lease *l, int keep_ref) {
  etcd3_lease **p = &h->leases;
  while (*p && *p != l) p = &(*p)->next;
  if (!*p) return;
  *p = l->next;
  l->next = NULL;
  l->keepalive = 0;
  if (keep_ref) l->refs--;
  else lease_unref(l);
}

static void on_keepalive(void *owner, etcd3_stream *s, ProtobufCMessage *msg) {
  etcd3_engine *e = (etcd3_engine *)owner;
  lease_hub *h = (lease_hub *)e->lease_hub;
  Etcdserverpb__LeaseKeepAliveResponse *r = (Etcdserverpb__LeaseKeepAliveResponse *)msg;
  (void)s;
  h->backoff = MIN_BACKOFF;
  for (etcd3_lease *l = h->leases; l; l = l->next) {
    if (l->id != r->id) continue;
    if (r->ttl <= 0) {
      lose(l, "etcd says the lease expired or was revoked");
    } else if (!l->lost) {
      l->ttl = r->ttl;
      l->expires_at = l->last_send + (double)r->ttl;
      l->next_renew = l->last_send + (double)r->ttl / 3.0;
    }
  }
  protobuf_c_message_free_unpacked(msg, NULL);
}

static void on_keepalive_closed(void *owner, etcd3_stream *s, grpc_status_code status,
                                const char *details) {
  etcd3_engine *e = (etcd3_engine *)owner;
  lease_hub *h = (lease_hub *)e->lease_hub;
  double now = etcd3_now();
  (void)s; (void)status; (void)details;
  h->stream = NULL;
  /* Try the next endpoint, after a short backoff; renew at once there. */
  h->channel = etcd3_engine_next_channel(e, h->channel);
  h->reopen_at = now + h->backoff;
  h->backoff = h->backoff * 2 > MAX_BACKOFF ? MAX_BACKOFF : h->backoff * 2;
  for (etcd3_lease *l = h->leases; l; l = l->next) l->next_renew = 0;
}

static const etcd3_stream_ops keepalive_ops = {
  &etcdserverpb__lease_keep_alive_response__descriptor, on_keepalive, on_keepalive_closed,
};

/* Renews what is due, notices what ran out, keeps the stream open while
 * leases need it. Returns the next time it wants to run (0: none).
 * Mutex held; engine thread or Lua thread. */
double etcd3_lease_tick(etcd3_engine *e, double now) {
  lease_hub *h = (lease_hub *)e->lease_hub;
  double next = 0;
  etcd3_lease *l, *following;
  if (!h || e->closed) return 0;
  for (l = h->leases; l; l = following) {
    following = l->next;
    if (!l->lost && now >= l->expires_at) lose(l, "the TTL ran out without a renewal");
    if (l->lost) unlink_lease(h, l, 0);
  }
  if (!h->leases) {
    if (h->stream) {
      etcd3_stream_close(h->stream);
      h->stream = NULL;
    }
    return 0;
  }
  if (!h->stream && now >= h->reopen_at) {
    h->stream = etcd3_stream_open(e, h->channel, "/etcdserverpb.Lease/LeaseKeepAlive", 0,
                                  &keepalive_ops, e);
    if (!h->stream) h->reopen_at = now + h->backoff;
  }
  for (l = h->leases; l; l = l->next) {
    if (h->stream && now >= l->next_renew) {
      Etcdserverpb__LeaseKeepAliveRequest req = ETCDSERVERPB__LEASE_KEEP_ALIVE_REQUEST__INIT;
      req.id = l->id;
      if (etcd3_stream_send(h->stream, &req.base)) {
        l->last_send = now;
        /* ask again after a third of the TTL even if no answer comes */
        l->next_renew = now + (l->ttl > 3 ? (double)l->ttl / 3.0 : 1.0);
      }
    }
    if (next == 0 || l->next_renew < next) next = l->next_renew;
    if (l->expires_at < next) next = l->expires_at;
  }
  if (!h->stream && (next == 0 || h->reopen_at < next)) next = h->reopen_at;
  return next;
}

/* Engine close: every lease under keepalive is let go. Mutex held. */
void etcd3_lease_shutdown(etcd3_engine *e) {
  lease_hub *h = (lease_hub *)e->lease_hub;
  if (!h) return;
  if (h->stream) etcd3_stream_close(h->stream);
  h->stream = NULL;
  while (h->leases) unlink_lease(h, h->leases, 0);
}

void etcd3_lease_free_hub(etcd3_engine *e) {
  free(e->lease_hub);
  e->lease_hub = NULL;
}

/* ---- Lua ------------------------------------------------------------- */

static etcd3_lease *check_lease(lua_State *L) {
  return (etcd3_lease *)etcd3_check_record(L, LEASE_MT, "lease");
}

/* Clears the pollfd signal once Lua has seen the loss; mutex held. */
static void seen(etcd3_lease *l) {
  if (l->lost) etcd3_unsignal(l->engine, &l->signaled);
}

/* core client:lease(id, ttl) -> state: liveness of a granted lease, counted
 * from now. */
int etcd3_lease_new(lua_State *L, etcd3_engine *e, int64_t id, int64_t ttl) {
  etcd3_lease *l = (etcd3_lease *)etcd3_new_record(L, LEASE_MT, sizeof *l, e);
  l->refs = 1;
  l->id = id;
  l->ttl = ttl;
  l->last_send = etcd3_now();
  l->expires_at = l->last_send + (double)ttl;
  pthread_mutex_lock(&e->mu);
  e->refs++;
  pthread_mutex_unlock(&e->mu);
  return 1;
}

/* state:keepalive(): renew in the background from now on. */
static int l_keepalive(lua_State *L) {
  etcd3_lease *l = check_lease(L);
  etcd3_engine *e = l->engine;
  lease_hub *h;
  int ok = 1;
  pthread_mutex_lock(&e->mu);
  h = hub_of(e);
  if (e->closed || !h) ok = 0;
  else if (!l->keepalive && !l->lost) {
    l->keepalive = 1;
    l->refs++;
    l->next_renew = 0;
    l->next = h->leases;
    h->leases = l;
    etcd3_lease_tick(e, etcd3_now()); /* the first renewal leaves now */
  }
  pthread_mutex_unlock(&e->mu);
  if (!ok) return luaL_error(L, "etcd3: client is closed");
  lua_pushboolean(L, !l->lost);
  return 1;
}

/* state:stop(): no more renewals (the lease then expires on its own). */
static int l_stop(lua_State *L) {
  etcd3_lease *l = check_lease(L);
  etcd3_engine *e = l->engine;
  pthread_mutex_lock(&e->mu);
  /* the userdata still holds a reference: the record stays */
  if (l->keepalive && e->lease_hub) unlink_lease((lease_hub *)e->lease_hub, l, 1);
  pthread_mutex_unlock(&e->mu);
  return 0;
}

/* state:renewed(ttl, sent_at): a keepalive_once answer (ttl <= 0: gone). */
static int l_renewed(lua_State *L) {
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
static int l_lose(lua_State *L) {
  etcd3_lease *l = check_lease(L);
  luaL_checkstring(L, 2);
  pthread_mutex_lock(&l->engine->mu);
  /* the reason must outlive the Lua string: use fixed texts */
  lose(l, strcmp(lua_tostring(L, 2), "revoked") == 0 ? "the lease was revoked"
                                                     : "etcd says the lease expired or was revoked");
  pthread_mutex_unlock(&l->engine->mu);
  return 0;
}

/* state:alive() -> boolean, state:remaining() -> seconds, and why lost */
static int l_status(lua_State *L) {
  etcd3_lease *l = check_lease(L);
  double now = etcd3_now();
  int alive;
  double remaining;
  pthread_mutex_lock(&l->engine->mu);
  if (!l->lost && now >= l->expires_at) lose(l, "the TTL ran out without a renewal");
  alive = !l->lost;
  remaining = alive ? l->expires_at - now : 0;
  if (!alive) seen(l);
  lua_pushboolean(L, alive);
  lua_pushnumber(L, remaining);
  if (l->lost) lua_pushstring(L, l->lost);
  else lua_pushnil(L);
  lua_pushboolean(L, l->keepalive);
  pthread_mutex_unlock(&l->engine->mu);
  return 4;
}

/* Lost yet? Noticing a TTL that ran out here; wakes at the expiry. */
static int lost_or_expired(void *arg, double now, double *until) {
  etcd3_lease *l = (etcd3_lease *)arg;
  if (!l->lost && now >= l->expires_at) lose(l, "the TTL ran out without a renewal");
  if (l->expires_at < *until) *until = l->expires_at;
  return l->lost != NULL;
}

/* state:wait(seconds): blocks until lost or the time passes. */
static int l_wait(lua_State *L) {
  etcd3_lease *l = check_lease(L);
  etcd3_wait_until(l->engine, luaL_checknumber(L, 2), lost_or_expired, l);
  return 0;
}

static int l_gc(lua_State *L) {
  etcd3_lease *l = (etcd3_lease *)etcd3_take_record(L, LEASE_MT);
  etcd3_engine *e;
  if (!l) return 0;
  e = l->engine;
  pthread_mutex_lock(&e->mu);
  etcd3_unsignal(e, &l->signaled);
  if (l->keepalive && e->lease_hub) unlink_lease((lease_hub *)e->lease_hub, l, 1);
  lease_unref(l);
  pthread_mutex_unlock(&e->mu);
  etcd3_engine_release(e);
  return 0;
}

int etcd3_lease_open(lua_State *L) {
  static const luaL_Reg methods[] = {
    {"keepalive", l_keepalive}, {"stop", l_stop}, {"renewed", l_renewed},
    {"lose", l_lose}, {"status", l_status}, {"wait", l_wait}, {NULL, NULL},
  };
  etcd3_register_type(L, LEASE_MT, methods, l_gc);
  return 0;
}
