/*
 * registration.c - a key the engine keeps registered under a lease,
 * whatever the Lua code is doing (client:register).
 *
 * Each registration owns its key and value in C memory. The engine thread
 * grants a lease (LeaseGrant), puts the key under it (Put), and renews the
 * lease (lease.c's keepalive, every RENEW_EVERY seconds so a revoke is
 * noticed quickly). When the lease is lost (etcd says it is gone: revoked,
 * or expired while no member answered; or its TTL ran out here, e.g. after
 * the process was stopped), the engine grants a new lease and puts the key
 * again as soon as a member answers: no Lua call is needed, so a process
 * stuck in a long computation stays registered. Grant and put follow the
 * client's request policy (policy.h): they go to the client's current
 * endpoint; both are safe to repeat, so a failed one is tried again after
 * the policy's backoff (on the next endpoint when the member failed); one
 * refused for its token renews it (the shared Authenticate) and is tried
 * again as soon as the new token is there.
 *
 * reg:set(value) replaces the value and the engine puts it under the same
 * lease; every value has a generation, and Lua can wait until the
 * generation it set has been put. reg:stop() takes the registration out
 * of the engine and hands the lease ID back to Lua, which deletes the key
 * and revokes the lease.
 *
 * Registrations are shared by the Lua userdata and the service's list;
 * a background call in flight holds a reference of its own (`refs`, under
 * the engine mutex).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "auxiliar.h"
#include "call.h"
#include "codec.h"
#include "lease.h"
#include "auth.h"
#include "policy.h"
#include "registration.h"
#include "rpc.pb-c.h"

#define RENEW_EVERY 0.5
#define CALL_TIMEOUT 5.0

typedef struct registration {
  etcd3_engine *engine;        /* first: an engine-bound object (auxiliar.h) */
  int refs;
  uint8_t *key, *value;
  size_t key_len, value_len;
  int64_t ttl;
  etcd3_lease *lease;          /* NULL while none is granted */
  int64_t lease_id;
  unsigned long value_generation; /* bumped by every set */
  unsigned long put_generation;   /* the generation under the current lease */
  unsigned long sending_generation;
  int granting, putting;       /* a background call is in flight */
  int awaiting_token;          /* refused for its token: waits for a new one */
  double grant_sent;           /* when the last LeaseGrant left */
  double put_sent;             /* when the last Put left */
  int stopped;                 /* out of the service: Lua let go */
  int alive;                   /* the key is put under a live lease */
  double retry_at;
  etcd3_backoff backoff;
  size_t channel;              /* where the call in flight went */
  char last_error[160];
  int news;
  struct registration *next;
} registration;

/* The engine runs this service's tick after every completion (each lease
 * renewal's send and answer among them): it returns at once before
 * `next_due` unless something changed (`rescan`: a call ended, a lease
 * was lost, Lua added or set one), so 1000 registrations cost no walk
 * over the list per renewal. */
typedef struct registration_list {
  registration *head;
  double next_due;        /* nothing to do before (0: look now) */
  int rescan;             /* look now */
} registration_list;

ETCD3_LOCKED static double registrations_tick(etcd3_engine *e, void *state, double now);
ETCD3_LOCKED static void registrations_token_changed(etcd3_engine *e, void *state);
ETCD3_LOCKED static void registrations_shutdown(etcd3_engine *e, void *state);

/* Each grant and put carries the token current when it starts; a new
 * token lets those that waited for it go at once. */
static const etcd3_service_ops registration_service = {
  .name = "registration", .tick = registrations_tick,
  .token_changed = registrations_token_changed, .shutdown = registrations_shutdown, .free = free,
};

/* Something changed: the next tick looks at every registration. */
ETCD3_LOCKED static void look_again(etcd3_engine *e) {
  registration_list *list = (registration_list *)etcd3_engine_service(e, &registration_service);
  if (list) list->rescan = 1;
}

static void registration_unref(registration *r) {
  if (--r->refs > 0) return;
  free(r->key);
  free(r->value);
  free(r);
}

ETCD3_LOCKED static void set_alive(registration *r, int alive) {
  if (r->alive == alive) return;
  r->alive = alive;
  etcd3_news_post(r->engine, &r->news);
}

/* A grant or put that left at `sent` failed: the policy says when and
 * where it goes again (both are safe to repeat). */
ETCD3_LOCKED static void failed(registration *r, const char *what, grpc_status_code status,
                                const char *details, double sent) {
  etcd3_engine *e = r->engine;
  look_again(e); /* when it goes again */
  snprintf(r->last_error, sizeof r->last_error, "%s failed: %s%s%s", what,
           etcd3_status_name((int)status), details && *details ? ": " : "",
           details ? details : "");
  if (etcd3_policy_verdict(status, details, 1, 1) == ETCD3_REAUTH) {
    switch (etcd3_auth_refresh(e, sent)) {
    case ETCD3_AUTH_RENEWED: /* a newer token is there already: go now */
      r->retry_at = 0;
      registrations_tick(e, etcd3_engine_service(e, &registration_service), etcd3_now());
      return;
    case ETCD3_AUTH_PENDING: /* token_changed lets it go, after a backoff */
      r->awaiting_token = 1;
      r->retry_at = etcd3_now() + CALL_TIMEOUT;
      return;
    default:
      snprintf(r->last_error, sizeof r->last_error, "%s failed: %s; Authenticate: %s", what,
               etcd3_status_name((int)status), etcd3_auth_failure(e));
      break;
    }
  } else if (etcd3_policy_member_failed(status)) {
    /* the engine repeats these calls whatever the error, on the next
     * member when this one failed them */
    etcd3_policy_failed(e, r->channel);
  }
  r->retry_at = etcd3_now() + etcd3_backoff_next(&r->backoff);
}

ETCD3_LOCKED static void drop_lease(registration *r) {
  if (!r->lease) return;
  etcd3_lease_let_go(r->lease);
  r->lease = NULL;
  r->lease_id = 0;
  set_alive(r, 0);
}

/* Engine thread, unlocked: a LeaseGrant answered. */
static void granted(etcd3_engine *e, void *arg, grpc_status_code status, const char *details,
                    grpc_byte_buffer *response) {
  registration *r = (registration *)arg;
  Etcdserverpb__LeaseGrantResponse *g = NULL;
  if (response)
    g = (Etcdserverpb__LeaseGrantResponse *)etcd3_unpack(
        &etcdserverpb__lease_grant_response__descriptor, response);
  pthread_mutex_lock(&e->mu);
  r->granting = 0;
  look_again(e);
  if (!g || g->id == 0 || (g->error && *g->error)) {
    if (g && g->error && *g->error) details = g->error;
    failed(r, "LeaseGrant", status == GRPC_STATUS_OK ? GRPC_STATUS_INTERNAL : status, details,
           r->grant_sent);
  } else if (r->stopped) {
    /* let go while the grant was under way: nothing may stay behind */
    Etcdserverpb__LeaseRevokeRequest revoke = ETCDSERVERPB__LEASE_REVOKE_REQUEST__INIT;
    revoke.id = g->id;
    if (!e->closed)
      etcd3_call_background(e, r->channel, "/etcdserverpb.Lease/LeaseRevoke",
                            etcd3_pack(&revoke.base), CALL_TIMEOUT, NULL, NULL);
  } else if (!e->closed) {
    registration_list *list = (registration_list *)etcd3_engine_service(e, &registration_service);
    r->lease = etcd3_lease_keep(e, g->id, g->ttl, RENEW_EVERY, r->grant_sent, &list->rescan);
    if (r->lease) {
      r->lease_id = g->id;
      r->put_generation = 0; /* a new lease: the key goes under it */
      r->retry_at = 0;
      registrations_tick(e, etcd3_engine_service(e, &registration_service), etcd3_now());
    }
  }
  registration_unref(r);
  pthread_mutex_unlock(&e->mu);
  if (g) protobuf_c_message_free_unpacked(&g->base, NULL);
}

/* Engine thread, unlocked: a Put answered. */
static void put_done(etcd3_engine *e, void *arg, grpc_status_code status, const char *details,
                     grpc_byte_buffer *response) {
  registration *r = (registration *)arg;
  (void)response;
  pthread_mutex_lock(&e->mu);
  r->putting = 0;
  look_again(e);
  if (status == GRPC_STATUS_OK) {
    r->put_generation = r->sending_generation;
    etcd3_backoff_reset(&r->backoff);
    r->last_error[0] = '\0';
    if (r->lease && etcd3_lease_alive(r->lease, etcd3_now())) set_alive(r, 1);
    etcd3_news_post(e, &r->news); /* a set() may wait for this generation */
  } else if (status == GRPC_STATUS_NOT_FOUND) {
    drop_lease(r); /* the lease went before the key got under it */
  } else {
    failed(r, "Put", status, details, r->put_sent);
  }
  registration_unref(r);
  pthread_mutex_unlock(&e->mu);
}

ETCD3_LOCKED static void start_grant(etcd3_engine *e, registration *r) {
  Etcdserverpb__LeaseGrantRequest req = ETCDSERVERPB__LEASE_GRANT_REQUEST__INIT;
  req.ttl = r->ttl;
  r->refs++;
  r->grant_sent = etcd3_now();
  r->channel = etcd3_policy_pick(e);
  r->granting = etcd3_call_background(e, r->channel, "/etcdserverpb.Lease/LeaseGrant",
                                      etcd3_pack(&req.base), CALL_TIMEOUT, granted, r);
  if (!r->granting) {
    r->refs--;
    failed(r, "LeaseGrant", GRPC_STATUS_UNAVAILABLE, NULL, r->grant_sent);
  }
}

ETCD3_LOCKED static void start_put(etcd3_engine *e, registration *r) {
  Etcdserverpb__PutRequest req = ETCDSERVERPB__PUT_REQUEST__INIT;
  req.key.data = r->key;
  req.key.len = r->key_len;
  req.value.data = r->value;
  req.value.len = r->value_len;
  req.lease = r->lease_id;
  r->sending_generation = r->value_generation;
  r->refs++;
  r->put_sent = etcd3_now();
  r->channel = etcd3_policy_pick(e);
  r->putting = etcd3_call_background(e, r->channel, "/etcdserverpb.KV/Put",
                                     etcd3_pack(&req.base), CALL_TIMEOUT, put_done, r);
  if (!r->putting) {
    r->refs--;
    failed(r, "Put", GRPC_STATUS_UNAVAILABLE, NULL, r->put_sent);
  }
}

/* Notices lost leases, grants and puts what is due. */
ETCD3_LOCKED static double registrations_tick(etcd3_engine *e, void *state, double now) {
  registration_list *list = (registration_list *)state;
  double next = 0;
  if (e->closed) return 0;
  if (!list->rescan && list->next_due > 0 && now < list->next_due) return list->next_due;
  list->rescan = 0; /* (what this walk changes, it sees) */
  for (registration *r = list->head; r; r = r->next) {
    if (r->lease && !etcd3_lease_alive(r->lease, now)) drop_lease(r);
    if (r->granting || r->putting) continue;
    if (now < r->retry_at) {
      if (next == 0 || r->retry_at < next) next = r->retry_at;
      continue;
    }
    if (!r->lease) start_grant(e, r);
    else if (r->put_generation < r->value_generation) start_put(e, r);
    if (r->lease) {
      double t = etcd3_lease_expires_at(r->lease);
      if (next == 0 || t < next) next = t;
    }
  }
  list->next_due = next;
  return next;
}

/* The shared Authenticate ended (with a new token or not): those waiting
 * for it go after their backoff (which grows while it keeps failing). */
ETCD3_LOCKED static void registrations_token_changed(etcd3_engine *e, void *state) {
  registration_list *list = (registration_list *)state;
  double now = etcd3_now();
  int any = 0;
  for (registration *r = list->head; r; r = r->next) {
    if (!r->awaiting_token) continue;
    r->awaiting_token = 0;
    r->retry_at = now + etcd3_backoff_next(&r->backoff);
    any = 1;
  }
  if (any) {
    list->rescan = 1;
    registrations_tick(e, list, now);
  }
}

ETCD3_LOCKED static void unlink_registration(registration_list *list, registration *r) {
  registration **p = &list->head;
  while (*p && *p != r) p = &(*p)->next;
  if (!*p) return;
  *p = r->next;
  r->next = NULL;
  registration_unref(r);
}

/* Takes the registration out of the engine; returns its lease ID (0: none). */
ETCD3_LOCKED static int64_t stop(registration *r) {
  int64_t id = r->lease_id;
  registration_list *list = (registration_list *)etcd3_engine_service(r->engine, &registration_service);
  if (r->stopped) return 0;
  r->stopped = 1;
  if (r->lease) etcd3_lease_let_go(r->lease);
  r->lease = NULL;
  r->lease_id = 0;
  r->alive = 0;
  if (list) unlink_registration(list, r);
  return id;
}

/* Engine close: every registration stops (the lease runs out by itself). */
ETCD3_LOCKED static void registrations_shutdown(etcd3_engine *e, void *state) {
  registration_list *list = (registration_list *)state;
  (void)e;
  while (list->head) stop(list->head);
}

/* ---- Lua ------------------------------------------------------------- */

static registration *check_registration(lua_State *L) {
  return (registration *)etcd3_bound_check(L, ETCD3_REGISTRATION_MT, "registration");
}

/* Copies the Lua string at idx into *bytes (malloc'd); 0 on out of memory. */
static int copy_string(lua_State *L, int idx, uint8_t **bytes, size_t *len) {
  const char *s = luaL_checklstring(L, idx, len);
  uint8_t *copy = (uint8_t *)malloc(*len + 1);
  if (!copy) return 0;
  memcpy(copy, s, *len);
  *bytes = copy;
  return 1;
}

int etcd3_registration_new(lua_State *L, etcd3_engine *e) {
  registration *r;
  registration_list *list;
  int64_t ttl = (int64_t)luaL_checkinteger(L, 4);
  luaL_checkstring(L, 2);
  luaL_checkstring(L, 3);
  r = (registration *)etcd3_bound_new(L, ETCD3_REGISTRATION_MT, sizeof *r, e);
  r->refs = 1;
  r->ttl = ttl;
  etcd3_backoff_reset(&r->backoff);
  r->value_generation = 1;
  r->stopped = 1; /* until it is listed */
  etcd3_engine_ref(e);
  if (!copy_string(L, 2, &r->key, &r->key_len) || !copy_string(L, 3, &r->value, &r->value_len))
    return luaL_error(L, "etcd3: out of memory");
  pthread_mutex_lock(&e->mu);
  list = (registration_list *)etcd3_engine_service_get(e, &registration_service, sizeof *list);
  if (list && !e->closed) {
    r->stopped = 0;
    r->refs++;
    r->next = list->head;
    list->head = r;
    list->rescan = 1;
    registrations_tick(e, list, etcd3_now()); /* the grant leaves now */
  }
  pthread_mutex_unlock(&e->mu);
  if (r->stopped) return luaL_error(L, "etcd3: client is closed");
  return 1;
}

/* reg:set(value) -> generation: the engine puts it under the same lease. */
static int registration_set(lua_State *L) {
  registration *r = check_registration(L);
  uint8_t *value;
  size_t len;
  unsigned long generation;
  if (!copy_string(L, 2, &value, &len)) return luaL_error(L, "etcd3: out of memory");
  pthread_mutex_lock(&r->engine->mu);
  free(r->value);
  r->value = value;
  r->value_len = len;
  generation = ++r->value_generation;
  if (!r->stopped) {
    registration_list *list = (registration_list *)etcd3_engine_service(r->engine, &registration_service);
    r->retry_at = 0;
    list->rescan = 1;
    registrations_tick(r->engine, list, etcd3_now()); /* the put leaves now */
  }
  pthread_mutex_unlock(&r->engine->mu);
  lua_pushnumber(L, (lua_Number)generation);
  return 1;
}

/* reg:status() -> alive, lease_id | nil, generation put, last error | nil
 * Read under the lock, pushed after it: a push may run the garbage
 * collector, whose finalisers (a call's, a watcher's) take the lock too. */
static int registration_status(lua_State *L) {
  registration *r = check_registration(L);
  char hex[17] = "";
  char last_error[sizeof r->last_error];
  int alive;
  lua_Number generation;
  pthread_mutex_lock(&r->engine->mu);
  etcd3_news_seen(r->engine, &r->news);
  alive = r->alive && r->lease && etcd3_lease_alive(r->lease, etcd3_now());
  if (r->lease_id) snprintf(hex, sizeof hex, "%016llx", (unsigned long long)r->lease_id);
  generation = (lua_Number)(r->lease ? r->put_generation : 0);
  memcpy(last_error, r->last_error, sizeof last_error);
  pthread_mutex_unlock(&r->engine->mu);
  lua_pushboolean(L, alive);
  if (hex[0]) lua_pushstring(L, hex);
  else lua_pushnil(L);
  lua_pushnumber(L, generation);
  if (last_error[0]) lua_pushstring(L, last_error);
  else lua_pushnil(L);
  return 4;
}

ETCD3_LOCKED static int has_news(void *arg, double now, double *until) {
  registration *r = (registration *)arg;
  (void)now; (void)until;
  return r->news || r->stopped;
}

/* reg:wait(seconds): until something changed, or the time passes. */
static int registration_wait(lua_State *L) {
  registration *r = check_registration(L);
  etcd3_engine_wait_until(r->engine, luaL_checknumber(L, 2), has_news, r);
  return 0;
}

/* reg:stop() -> lease ID | nil: the engine lets go; Lua deletes and revokes. */
static int registration_stop(lua_State *L) {
  registration *r = check_registration(L);
  int64_t id;
  pthread_mutex_lock(&r->engine->mu);
  id = stop(r);
  etcd3_news_seen(r->engine, &r->news);
  pthread_mutex_unlock(&r->engine->mu);
  if (id) {
    char hex[17];
    snprintf(hex, sizeof hex, "%016llx", (unsigned long long)id);
    lua_pushstring(L, hex);
  } else {
    lua_pushnil(L);
  }
  return 1;
}

static int registration_gc(lua_State *L) {
  registration *r = (registration *)etcd3_bound_take(L, ETCD3_REGISTRATION_MT);
  etcd3_engine *e;
  if (!r) return 0;
  e = r->engine;
  pthread_mutex_lock(&e->mu);
  stop(r);
  etcd3_news_seen(e, &r->news);
  registration_unref(r);
  pthread_mutex_unlock(&e->mu);
  etcd3_engine_release(e);
  return 0;
}

int etcd3_registration_open(lua_State *L) {
  static const luaL_Reg methods[] = {
    {"set", registration_set}, {"status", registration_status},
    {"wait", registration_wait}, {"stop", registration_stop}, {NULL, NULL},
  };
  etcd3_register_type(L, ETCD3_REGISTRATION_MT, methods, registration_gc);
  return 0;
}
