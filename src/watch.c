/*
 * watch.c - watchers multiplexed on one Watch stream per client, run by
 * the engine thread.
 *
 * Every watcher gets a watch_id chosen here (etcd 3.4 accepts the client's
 * own), so responses are routed without guessing. The engine thread
 * receives responses, reassembles fragments, drops anything at or below
 * the watcher's last revision (so a resume never repeats an event), and
 * queues whole WatchResponse messages for Lua to turn into tables.
 *
 * When the stream breaks (member killed, frozen and found dead by
 * keepalive pings, or refusing because it lost its leader: the stream asks
 * for `hasleader`), it is re-opened on the next endpoint and every watcher
 * is created again from its last revision + 1. A compacted revision ends
 * the watcher with COMPACTED; a consumer that falls too far behind ends
 * its watcher alone, which is then cancelled on the server.
 *
 * The stream and its watchers are the engine's "watch" service (registered
 * on the first watch). Watcher objects are shared by the Lua userdata
 * (etcd3.WatchState) and the service's list, counted in `refs` under the
 * engine mutex. A watcher dropped by Lua stays listed until etcd confirms
 * the cancel.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "auth.h"
#include "auxiliar.h"
#include "codec.h"
#include "stream.h"
#include "watch.h"
#include "rpc.pb-c.h"

typedef struct response_node {
  Etcdserverpb__WatchResponse *resp;
  struct response_node *next;
} response_node;

typedef struct response_list {
  response_node *head, *tail;
} response_list;

typedef struct etcd3_watcher {
  etcd3_engine *engine;        /* first: an engine-bound object (auxiliar.h) */
  int refs;
  int64_t id;
  uint8_t *key, *range_end;
  size_t key_len, range_end_len;
  int has_range_end, prev_kv, progress_notify, fragment, noput, nodelete;
  int64_t start_revision;
  int64_t revision;            /* last revision seen, once known */
  int knows_revision;          /* start_revision given, or etcd confirmed */
  int created, on_stream, cancel_wanted, ended;
  int news;                    /* posted, not yet seen by Lua */
  int confirmed;               /* etcd answered the create on this stream */
  uint64_t create_seq;         /* order of the create on this stream */
  unsigned auth_generation;    /* token generation of the last auth retry */
  int awaiting_auth;           /* not re-created until the new token is in */
  const char *end_code;        /* NULL: ended without error (cancel) */
  char end_message[256];
  int64_t compact_revision;
  response_list queue, fragments;
  size_t queued, max_queued;
  int listed;                  /* in the service's list and index */
  struct etcd3_watcher *prev, *next; /* the list */
  struct etcd3_watcher *same_slot;   /* the index's chain */
} etcd3_watcher;

/* The watchers of one engine, multiplexed on one Watch stream. */
/* Every per-watcher step costs the same whatever the number of watchers:
 * watchers are found by ID in a hash index, leave the list in O(1), and
 * only a new stream makes the tick look at all of them. */
typedef struct watch_mux {
  etcd3_engine *engine;
  etcd3_restream watch;
  etcd3_watcher *watchers;     /* doubly linked, newest first */
  etcd3_watcher **index;       /* by ID: index_size chains (a power of 2) */
  size_t index_size, count;
  int creates_due;             /* a new stream: every watcher is created on it */
  int64_t next_id;
  uint64_t creates_sent;
} watch_mux;

ETCD3_LOCKED static double watch_tick(etcd3_engine *e, void *state, double now);
ETCD3_LOCKED static void watch_restart(etcd3_engine *e, void *state);
ETCD3_LOCKED static void watch_shutdown(etcd3_engine *e, void *state);

static void watch_free(void *state) {
  free(((watch_mux *)state)->index);
  free(state);
}

static const etcd3_service_ops watch_service = {
  "watch", watch_tick, NULL, watch_restart, watch_shutdown, watch_free, NULL,
};

static const etcd3_stream_ops watch_ops;

/* The engine's watch service, registered on first use; NULL when closed
 * or out of memory. */
ETCD3_LOCKED static watch_mux *mux_of(etcd3_engine *e) {
  watch_mux *m = (watch_mux *)etcd3_engine_service_get(e, &watch_service, sizeof *m);
  if (m && !m->engine) {
    m->engine = e;
    m->next_id = 1;
    etcd3_restream_init(&m->watch, "/etcdserverpb.Watch/Watch", 1, &watch_ops);
  }
  return m;
}

static void list_free(response_list *l) {
  while (l->head) {
    response_node *n = l->head;
    l->head = n->next;
    protobuf_c_message_free_unpacked(&n->resp->base, NULL);
    free(n);
  }
  l->tail = NULL;
}

static void list_append(response_list *to, response_list *from) {
  if (!from->head) return;
  if (to->tail) to->tail->next = from->head;
  else to->head = from->head;
  to->tail = from->tail;
  from->head = from->tail = NULL;
}

static void watcher_unref(etcd3_watcher *w) {
  if (--w->refs > 0) return;
  list_free(&w->queue);
  list_free(&w->fragments);
  free(w->key);
  free(w->range_end);
  free(w);
}

ETCD3_LOCKED static void notify(etcd3_watcher *w) { etcd3_news_post(w->engine, &w->news); }

static size_t index_slot(const watch_mux *m, int64_t id) {
  return (size_t)(((uint64_t)id * 0x9E3779B97F4A7C15ULL) >> 32) & (m->index_size - 1);
}

ETCD3_LOCKED static etcd3_watcher *find_watcher(const watch_mux *m, int64_t id) {
  etcd3_watcher *w;
  if (!m->index_size) return NULL;
  for (w = m->index[index_slot(m, id)]; w && w->id != id; w = w->same_slot) {
  }
  return w;
}

/* Doubles the index when it holds as many watchers as chains; 0 on out of
 * memory. */
ETCD3_LOCKED static int grow_index(watch_mux *m) {
  size_t size = m->index_size ? m->index_size * 2 : 64;
  etcd3_watcher **index = (etcd3_watcher **)calloc(size, sizeof *index);
  etcd3_watcher **old = m->index;
  size_t old_size = m->index_size;
  if (!index) return 0;
  m->index = index;
  m->index_size = size;
  for (size_t i = 0; i < old_size; i++) {
    etcd3_watcher *w = old[i], *following;
    for (; w; w = following) {
      following = w->same_slot;
      w->same_slot = index[index_slot(m, w->id)];
      index[index_slot(m, w->id)] = w;
    }
  }
  free(old);
  return 1;
}

/* Lists the watcher (taking a reference); 0 on out of memory. */
ETCD3_LOCKED static int link_watcher(watch_mux *m, etcd3_watcher *w) {
  size_t slot;
  if (m->count >= m->index_size && !grow_index(m)) return 0;
  slot = index_slot(m, w->id);
  w->same_slot = m->index[slot];
  m->index[slot] = w;
  w->prev = NULL;
  w->next = m->watchers;
  if (m->watchers) m->watchers->prev = w;
  m->watchers = w;
  m->count++;
  w->listed = 1;
  w->refs++;
  return 1;
}

ETCD3_LOCKED static void unlink_watcher(watch_mux *m, etcd3_watcher *w) {
  etcd3_watcher **p;
  if (!w->listed) return;
  for (p = &m->index[index_slot(m, w->id)]; *p != w; p = &(*p)->same_slot) {
  }
  *p = w->same_slot;
  if (w->prev) w->prev->next = w->next;
  else m->watchers = w->next;
  if (w->next) w->next->prev = w->prev;
  w->prev = w->next = w->same_slot = NULL;
  w->listed = 0;
  m->count--;
  watcher_unref(w);
}

/* Ends the watcher (code NULL: cancelled, no error). */
ETCD3_LOCKED static void end_watcher(etcd3_watcher *w, const char *code, const char *message,
                        int64_t compact_revision) {
  if (w->ended) return;
  w->ended = 1;
  w->end_code = code;
  snprintf(w->end_message, sizeof w->end_message, "%s", message ? message : "");
  w->compact_revision = compact_revision;
  list_free(&w->fragments);
  notify(w);
}

ETCD3_LOCKED static void send_cancel(watch_mux *m, etcd3_watcher *w) {
  Etcdserverpb__WatchCancelRequest c = ETCDSERVERPB__WATCH_CANCEL_REQUEST__INIT;
  Etcdserverpb__WatchRequest r = ETCDSERVERPB__WATCH_REQUEST__INIT;
  c.watch_id = w->id;
  r.request_union_case = ETCDSERVERPB__WATCH_REQUEST__REQUEST_UNION_CANCEL_REQUEST;
  r.cancel_request = &c;
  etcd3_stream_send(m->watch.stream, &r.base);
}

ETCD3_LOCKED static void send_create(watch_mux *m, etcd3_watcher *w) {
  Etcdserverpb__WatchCreateRequest c = ETCDSERVERPB__WATCH_CREATE_REQUEST__INIT;
  Etcdserverpb__WatchRequest r = ETCDSERVERPB__WATCH_REQUEST__INIT;
  Etcdserverpb__WatchCreateRequest__FilterType filters[2];
  size_t n = 0;
  c.key.data = w->key;
  c.key.len = w->key_len;
  if (w->has_range_end) {
    c.range_end.data = w->range_end;
    c.range_end.len = w->range_end_len;
  }
  /* resume right after the last revision seen */
  c.start_revision = w->knows_revision ? w->revision + 1 : w->start_revision;
  c.progress_notify = w->progress_notify;
  c.prev_kv = w->prev_kv;
  c.fragment = w->fragment;
  c.watch_id = w->id;
  if (w->noput) filters[n++] = ETCDSERVERPB__WATCH_CREATE_REQUEST__FILTER_TYPE__NOPUT;
  if (w->nodelete) filters[n++] = ETCDSERVERPB__WATCH_CREATE_REQUEST__FILTER_TYPE__NODELETE;
  c.n_filters = n;
  c.filters = filters;
  r.request_union_case = ETCDSERVERPB__WATCH_REQUEST__REQUEST_UNION_CREATE_REQUEST;
  r.create_request = &c;
  if (etcd3_stream_send(m->watch.stream, &r.base)) {
    w->on_stream = 1;
    w->confirmed = 0;
    w->create_seq = ++m->creates_sent;
  }
}

/* Drops events at or below `threshold` from every response of the list
 * (they were delivered before a resume); returns the events kept and the
 * highest revision among them. */
static size_t drop_seen(response_list *l, int64_t threshold, int64_t *max_rev) {
  size_t kept_total = 0;
  for (response_node *n = l->head; n; n = n->next) {
    Etcdserverpb__WatchResponse *r = n->resp;
    size_t kept = 0;
    for (size_t i = 0; i < r->n_events; i++) {
      Mvccpb__Event *ev = r->events[i];
      int64_t rev = ev->kv ? ev->kv->mod_revision : 0;
      if (rev <= threshold) {
        protobuf_c_message_free_unpacked(&ev->base, NULL);
        continue;
      }
      if (rev > *max_rev) *max_rev = rev;
      r->events[kept++] = ev;
    }
    r->n_events = kept;
    kept_total += kept;
  }
  return kept_total;
}

ETCD3_LOCKED static void deliver(watch_mux *m, etcd3_watcher *w, response_list *l) {
  int64_t max_rev = w->revision;
  size_t kept = drop_seen(l, w->revision, &max_rev);
  if (kept == 0) {
    list_free(l);
    return;
  }
  w->revision = max_rev;
  w->queued += kept;
  list_append(&w->queue, l);
  if (w->max_queued > 0 && w->queued > w->max_queued) {
    char msg[160];
    snprintf(msg, sizeof msg,
             "the watcher fell more than %zu events behind (its consumer is too slow)",
             w->max_queued);
    list_free(&w->queue);
    w->queued = 0;
    end_watcher(w, "RESOURCE_EXHAUSTED", msg, 0);
    if (m->watch.stream && w->on_stream && !w->cancel_wanted) {
      w->cancel_wanted = 1;
      send_cancel(m, w);
    }
    return;
  }
  notify(w);
}

static int is_auth_refusal(const char *reason) {
  return reason && (strstr(reason, "permission denied") || strstr(reason, "auth token") ||
                    strstr(reason, "user name is empty"));
}

ETCD3_LOCKED static void on_watch_response(void *owner, etcd3_stream *s, ProtobufCMessage *msg) {
  watch_mux *m = (watch_mux *)owner;
  etcd3_engine *e = m->engine;
  unsigned generation;
  Etcdserverpb__WatchResponse *r = (Etcdserverpb__WatchResponse *)msg;
  int64_t header_rev = r->header ? r->header->revision : 0;
  etcd3_watcher *w;
  response_list l = {NULL, NULL};
  (void)s;
  etcd3_restream_healthy(&m->watch);
  if (r->watch_id == -1 && r->created) {
    /* etcd 3.4 answers a refused create (permission denied, expired
     * token) with watch_id -1: it is the oldest create not yet answered,
     * since etcd handles a stream's requests in order */
    etcd3_watcher *oldest = NULL;
    for (w = m->watchers; w; w = w->next)
      if (w->on_stream && !w->confirmed && (!oldest || w->create_seq < oldest->create_seq))
        oldest = w;
    if (!oldest) {
      protobuf_c_message_free_unpacked(msg, NULL);
      return;
    }
    r->watch_id = oldest->id;
  }
  if (r->watch_id == -1) {
    /* progress for every watcher of the stream (request_progress) */
    for (w = m->watchers; w; w = w->next)
      if (w->created && !w->ended && header_rev > w->revision) w->revision = header_rev;
    protobuf_c_message_free_unpacked(msg, NULL);
    return;
  }
  w = find_watcher(m, r->watch_id);
  if (!w) {
    protobuf_c_message_free_unpacked(msg, NULL);
    return;
  }
  if (r->created) w->confirmed = 1;
  if (r->created && !r->canceled) {
    if (!w->knows_revision) {
      w->revision = header_rev;
      w->knows_revision = 1;
    }
    w->created = 1;
    notify(w);
  }
  if (r->canceled) {
    w->on_stream = 0;
    if (r->compact_revision > 0) {
      char m[128];
      snprintf(m, sizeof m, "required revision %lld has been compacted (compact revision %lld)",
               (long long)(w->revision + 1), (long long)r->compact_revision);
      end_watcher(w, "COMPACTED", m, r->compact_revision);
    } else if (w->cancel_wanted) {
      end_watcher(w, NULL, NULL, 0);
    } else if (is_auth_refusal(r->cancel_reason) && etcd3_auth_can_refresh(e, &generation) &&
               w->auth_generation != generation) {
      /* the token expired: authenticate again, then create it once more
       * (from its last revision + 1) on a stream with the new token */
      w->auth_generation = generation;
      w->awaiting_auth = 1;
      etcd3_auth_refresh(e);
      protobuf_c_message_free_unpacked(msg, NULL);
      return;
    } else if (is_auth_refusal(r->cancel_reason)) {
      end_watcher(w, "PERMISSION_DENIED", r->cancel_reason, 0);
    } else {
      end_watcher(w, "CANCELLED", r->cancel_reason && *r->cancel_reason
                                      ? r->cancel_reason : "etcd cancelled the watch", 0);
    }
    unlink_watcher(m, w);
    protobuf_c_message_free_unpacked(msg, NULL);
    return;
  }
  if (w->ended || w->cancel_wanted) {
    protobuf_c_message_free_unpacked(msg, NULL);
    return;
  }
  if (r->n_events == 0 && !r->fragment) {
    /* a progress notification, or the created response */
    if (!r->created && header_rev > w->revision) w->revision = header_rev;
    if (!w->fragments.head) {
      protobuf_c_message_free_unpacked(msg, NULL);
      return;
    }
  }
  {
    response_node *n = (response_node *)malloc(sizeof *n);
    if (!n) {
      protobuf_c_message_free_unpacked(msg, NULL);
      end_watcher(w, "RESOURCE_EXHAUSTED", "out of memory", 0);
      return;
    }
    n->resp = r;
    n->next = NULL;
    l.head = l.tail = n;
  }
  if (r->fragment) {
    /* more of this revision follows: hold it until the last fragment */
    list_append(&w->fragments, &l);
    return;
  }
  list_append(&w->fragments, &l);
  deliver(m, w, &w->fragments);
}

/* The stream is gone (broken, or closed by us): every watcher will be
 * created again on the next one; those being cancelled are done. */
ETCD3_LOCKED static void detach_stream(watch_mux *m) {
  etcd3_watcher *w, *following;
  for (w = m->watchers; w; w = following) {
    following = w->next;
    w->on_stream = 0;
    list_free(&w->fragments);
    if (w->cancel_wanted || w->ended) {
      end_watcher(w, NULL, NULL, 0); /* no-op if it ended already */
      unlink_watcher(m, w);
    }
  }
}

ETCD3_LOCKED static void on_watch_closed(void *owner, etcd3_stream *s, grpc_status_code status,
                                         const char *details) {
  watch_mux *m = (watch_mux *)owner;
  (void)s; (void)details;
  /* the next endpoint, after a short backoff */
  etcd3_restream_broken(m->engine, &m->watch);
  detach_stream(m);
  if (status == GRPC_STATUS_UNAUTHENTICATED) etcd3_auth_refresh(m->engine);
}

/* A new token: streams carry theirs from the start, so re-open. */
ETCD3_LOCKED static void watch_restart(etcd3_engine *e, void *state) {
  watch_mux *m = (watch_mux *)state;
  for (etcd3_watcher *w = m->watchers; w; w = w->next) w->awaiting_auth = 0;
  if (!m->watch.stream) return;
  etcd3_restream_close(&m->watch);
  detach_stream(m);
  m->watch.reopen_at = 0;
  watch_tick(e, m, etcd3_now());
}

static const etcd3_stream_ops watch_ops = {
  &etcdserverpb__watch_response__descriptor, on_watch_response, on_watch_closed,
};

/* Whether the watcher is to be created on the open stream. */
static int wants_create(const etcd3_watcher *w) {
  return !w->on_stream && !w->ended && !w->cancel_wanted && !w->awaiting_auth;
}

/* Opens the stream when watchers need one and sends their creates; closes
 * it when none is left. Returns when it wants to run again (0: never). */
ETCD3_LOCKED static double watch_tick(etcd3_engine *e, void *state, double now) {
  watch_mux *m = (watch_mux *)state;
  etcd3_watcher *w;
  if (e->closed) return 0;
  if (!m->watchers) {
    etcd3_restream_close(&m->watch);
    return 0;
  }
  if (!m->watch.stream) {
    if (!etcd3_restream_open(e, &m->watch, m, now)) return m->watch.reopen_at;
    m->creates_due = 1;
  }
  if (m->creates_due) {
    m->creates_due = 0;
    for (w = m->watchers; w; w = w->next)
      if (wants_create(w)) send_create(m, w);
  }
  return 0;
}

/* Engine close: every watcher ends with CLOSED. */
ETCD3_LOCKED static void watch_shutdown(etcd3_engine *e, void *state) {
  watch_mux *m = (watch_mux *)state;
  (void)e;
  etcd3_restream_close(&m->watch);
  while (m->watchers) {
    etcd3_watcher *w = m->watchers;
    if (!w->cancel_wanted) end_watcher(w, "CLOSED", "the client was closed", 0);
    unlink_watcher(m, w);
  }
}

/* ---- Lua ------------------------------------------------------------- */

static etcd3_watcher *check_watcher(lua_State *L) {
  return (etcd3_watcher *)etcd3_bound_check(L, ETCD3_WATCH_MT, "watcher");
}

/* Lua has seen the news once it took everything. */
ETCD3_LOCKED static void seen(etcd3_watcher *w) {
  if (!w->queue.head) etcd3_news_seen(w->engine, &w->news);
}

static int opt_bool(lua_State *L, int idx, const char *name) {
  int v;
  lua_getfield(L, idx, name);
  v = lua_toboolean(L, -1);
  lua_pop(L, 1);
  return v;
}

static uint8_t *opt_bytes(lua_State *L, int idx, const char *name, size_t *len, int *present) {
  const char *s;
  uint8_t *copy;
  lua_getfield(L, idx, name);
  s = lua_tolstring(L, -1, len);
  *present = s != NULL;
  copy = (uint8_t *)malloc(s ? *len + 1 : 1);
  if (copy && s) memcpy(copy, s, *len);
  lua_pop(L, 1);
  return copy;
}

/* core client:watch(spec) -> state. spec: key, range_end, start_revision,
 * prev_kv, progress_notify, fragment, noput, nodelete, max_queued.
 * The Lua layer has checked every field. */
int etcd3_watch_new(lua_State *L, etcd3_engine *e, int spec) {
  etcd3_watcher *w;
  watch_mux *m;
  int present;
  spec = lua_absindex(L, spec);
  /* from here __gc frees it; nothing below raises */
  w = (etcd3_watcher *)etcd3_bound_new(L, ETCD3_WATCH_MT, sizeof *w, e);
  w->refs = 1;
  w->key = opt_bytes(L, spec, "key", &w->key_len, &present);
  w->range_end = opt_bytes(L, spec, "range_end", &w->range_end_len, &w->has_range_end);
  w->prev_kv = opt_bool(L, spec, "prev_kv");
  w->progress_notify = opt_bool(L, spec, "progress_notify");
  w->fragment = opt_bool(L, spec, "fragment");
  w->noput = opt_bool(L, spec, "noput");
  w->nodelete = opt_bool(L, spec, "nodelete");
  lua_getfield(L, spec, "start_revision");
  w->start_revision = (int64_t)lua_tonumber(L, -1);
  lua_getfield(L, spec, "max_queued");
  w->max_queued = (size_t)lua_tonumber(L, -1);
  lua_pop(L, 2);
  if (w->start_revision > 0) {
    w->revision = w->start_revision - 1;
    w->knows_revision = 1;
  }
  pthread_mutex_lock(&e->mu);
  etcd3_engine_ref_locked(e);
  m = e->closed ? NULL : mux_of(e);
  if (!m || !w->key || !w->range_end) {
    end_watcher(w, "CLOSED", e->closed ? "the client was closed" : "out of memory", 0);
  } else {
    w->id = m->next_id++;
    if (!link_watcher(m, w)) end_watcher(w, "CLOSED", "out of memory", 0);
    else if (m->watch.stream && !m->creates_due) send_create(m, w); /* leaves now */
    else watch_tick(e, m, etcd3_now());
  }
  pthread_mutex_unlock(&e->mu);
  return 1;
}

/* state:state() -> created, ended, revision */
static int watcher_state(lua_State *L) {
  etcd3_watcher *w = check_watcher(L);
  pthread_mutex_lock(&w->engine->mu);
  lua_pushboolean(L, w->created);
  lua_pushboolean(L, w->ended);
  lua_pushnumber(L, (lua_Number)w->revision);
  if (w->created || w->ended) seen(w);
  pthread_mutex_unlock(&w->engine->mu);
  return 3;
}

/* state:ready() -> boolean: events are queued, or the watcher ended. */
static int watcher_ready(lua_State *L) {
  etcd3_watcher *w = check_watcher(L);
  pthread_mutex_lock(&w->engine->mu);
  lua_pushboolean(L, w->queue.head != NULL || w->ended);
  pthread_mutex_unlock(&w->engine->mu);
  return 1;
}

/* state:news_key() -> lightuserdata: names this watcher in the notifier's
 * news (notifier.c), so its waiter is woken without asking every other. */
static int watcher_news_key(lua_State *L) {
  lua_pushlightuserdata(L, &check_watcher(L)->news);
  return 1;
}

ETCD3_LOCKED static int has_news(void *arg, double now, double *until) {
  etcd3_watcher *w = (etcd3_watcher *)arg;
  (void)now; (void)until;
  return w->queue.head || w->ended || w->news;
}

/* state:wait(seconds): until something arrives, or the time passes. */
static int watcher_wait(lua_State *L) {
  etcd3_watcher *w = check_watcher(L);
  etcd3_engine_wait_until(w->engine, luaL_checknumber(L, 2), has_news, w);
  return 0;
}

typedef struct taken_box {
  response_list list;
} taken_box;

static int taken_gc(lua_State *L) {
  taken_box *b = (taken_box *)lua_touserdata(L, 1);
  list_free(&b->list);
  return 0;
}

/* state:poll() -> { event, … } (may be empty) | nil, code, message,
 * compact_revision once the watcher ended and nothing is left. */
static int watcher_poll(lua_State *L) {
  etcd3_watcher *w = check_watcher(L);
  taken_box *box;
  int n = 0;
  box = (taken_box *)lua_newuserdata(L, sizeof *box);
  box->list.head = box->list.tail = NULL;
  lua_newtable(L); /* metatable with __gc: frees what was taken on error */
  lua_pushcfunction(L, taken_gc);
  lua_setfield(L, -2, "__gc");
  lua_setmetatable(L, -2);
  pthread_mutex_lock(&w->engine->mu);
  list_append(&box->list, &w->queue);
  w->queued = 0;
  seen(w);
  if (!box->list.head && w->ended) {
    pthread_mutex_unlock(&w->engine->mu);
    lua_pushnil(L);
    if (w->end_code) lua_pushstring(L, w->end_code);
    else lua_pushnil(L);
    lua_pushstring(L, w->end_message);
    lua_pushnumber(L, (lua_Number)w->compact_revision);
    return 4;
  }
  pthread_mutex_unlock(&w->engine->mu);
  lua_newtable(L); /* stack: box, events */
  for (response_node *node = box->list.head; node; node = node->next) {
    for (size_t i = 0; i < node->resp->n_events; i++) {
      etcd3_push_message(L, &node->resp->events[i]->base);
      lua_rawseti(L, -2, ++n);
    }
  }
  list_free(&box->list);
  return 1;
}

/* state:revision() -> last revision seen (events and progress) */
static int watcher_revision(lua_State *L) {
  etcd3_watcher *w = check_watcher(L);
  pthread_mutex_lock(&w->engine->mu);
  lua_pushnumber(L, (lua_Number)w->revision);
  pthread_mutex_unlock(&w->engine->mu);
  return 1;
}

/* Asks etcd to stop the watcher. */
ETCD3_LOCKED static void cancel_watcher(etcd3_watcher *w) {
  watch_mux *m = (watch_mux *)etcd3_engine_service(w->engine, &watch_service);
  if (w->cancel_wanted || !m) return;
  w->cancel_wanted = 1;
  if (m->watch.stream && w->on_stream) {
    send_cancel(m, w); /* stays listed until etcd confirms */
  } else {
    end_watcher(w, NULL, NULL, 0);
    unlink_watcher(m, w);
  }
}

/* state:cancel(): ends the watcher (no error); events queued are dropped. */
static int watcher_cancel(lua_State *L) {
  etcd3_watcher *w = check_watcher(L);
  pthread_mutex_lock(&w->engine->mu);
  if (!w->ended) {
    cancel_watcher(w);
    end_watcher(w, NULL, NULL, 0);
  } else if (w->on_stream && !w->cancel_wanted) {
    cancel_watcher(w);
  }
  list_free(&w->queue);
  w->queued = 0;
  pthread_mutex_unlock(&w->engine->mu);
  return 0;
}

/* state:progress(): asks etcd for a progress notification (all watchers of
 * the stream); false when the stream is not open. */
static int watcher_progress(lua_State *L) {
  etcd3_watcher *w = check_watcher(L);
  watch_mux *m;
  int ok = 0;
  pthread_mutex_lock(&w->engine->mu);
  m = (watch_mux *)etcd3_engine_service(w->engine, &watch_service);
  if (m && m->watch.stream) {
    Etcdserverpb__WatchProgressRequest p = ETCDSERVERPB__WATCH_PROGRESS_REQUEST__INIT;
    Etcdserverpb__WatchRequest r = ETCDSERVERPB__WATCH_REQUEST__INIT;
    r.request_union_case = ETCDSERVERPB__WATCH_REQUEST__REQUEST_UNION_PROGRESS_REQUEST;
    r.progress_request = &p;
    ok = etcd3_stream_send(m->watch.stream, &r.base);
  }
  pthread_mutex_unlock(&w->engine->mu);
  lua_pushboolean(L, ok);
  return 1;
}

static int watcher_gc(lua_State *L) {
  etcd3_watcher *w = (etcd3_watcher *)etcd3_bound_take(L, ETCD3_WATCH_MT);
  watch_mux *m;
  etcd3_engine *e;
  if (!w) return 0;
  e = w->engine;
  pthread_mutex_lock(&e->mu);
  if (!w->ended || w->on_stream) cancel_watcher(w);
  etcd3_news_seen(e, &w->news);
  list_free(&w->queue);
  watcher_unref(w);
  m = (watch_mux *)etcd3_engine_service(e, &watch_service);
  if (m && !m->watchers) etcd3_restream_close(&m->watch); /* none is left */
  pthread_mutex_unlock(&e->mu);
  etcd3_engine_release(e);
  return 0;
}

int etcd3_watch_open(lua_State *L) {
  static const luaL_Reg methods[] = {
    {"state", watcher_state}, {"ready", watcher_ready}, {"wait", watcher_wait},
    {"poll", watcher_poll}, {"revision", watcher_revision}, {"cancel", watcher_cancel},
    {"progress", watcher_progress}, {"news_key", watcher_news_key}, {NULL, NULL},
  };
  etcd3_register_type(L, ETCD3_WATCH_MT, methods, watcher_gc);
  return 0;
}
