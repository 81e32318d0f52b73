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
 * Records are shared by the Lua userdata (etcd3.WatchState) and the hub's
 * list, counted in `refs` under the engine mutex. A record dropped by Lua
 * stays in the hub until etcd confirms the cancel.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "etcd3.h"
#include "rpc.pb-c.h"

#define WATCH_MT "etcd3.WatchState"
#define MIN_BACKOFF 0.1
#define MAX_BACKOFF 1.0

typedef struct response_node {
  Etcdserverpb__WatchResponse *resp;
  struct response_node *next;
} response_node;

typedef struct response_list {
  response_node *head, *tail;
} response_list;

typedef struct etcd3_watcher {
  etcd3_engine *engine;        /* first: see etcd3_check_record */
  int refs;
  int64_t id;
  uint8_t *key, *range_end;
  size_t key_len, range_end_len;
  int has_range_end, prev_kv, progress_notify, fragment, noput, nodelete;
  int64_t start_revision;
  int64_t revision;            /* last revision seen, once known */
  int knows_revision;          /* start_revision given, or etcd confirmed */
  int created, on_stream, cancel_wanted, ended, signaled;
  int confirmed;               /* etcd answered the create on this stream */
  uint64_t create_seq;         /* order of the create on this stream */
  unsigned auth_generation;    /* token generation of the last auth retry */
  int awaiting_auth;           /* not re-created until the new token is in */
  const char *end_code;        /* NULL: ended without error (cancel) */
  char end_message[256];
  int64_t compact_revision;
  response_list queue, fragments;
  size_t queued, max_queued;
  struct etcd3_watcher *next;
} etcd3_watcher;

typedef struct watch_hub {
  etcd3_stream *stream;
  etcd3_watcher *watchers;
  int64_t next_id;
  uint64_t creates_sent;
  double reopen_at, backoff;
  size_t channel;
} watch_hub;

static watch_hub *hub_of(etcd3_engine *e) {
  if (!e->watch_hub) {
    watch_hub *h = (watch_hub *)calloc(1, sizeof *h);
    if (!h) return NULL;
    h->backoff = MIN_BACKOFF;
    h->next_id = 1;
    e->watch_hub = h;
  }
  return (watch_hub *)e->watch_hub;
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

static void notify(etcd3_watcher *w) { etcd3_signal(w->engine, &w->signaled); }

static void unlink_watcher(watch_hub *h, etcd3_watcher *w) {
  etcd3_watcher **p = &h->watchers;
  while (*p && *p != w) p = &(*p)->next;
  if (*p) {
    *p = w->next;
    w->next = NULL;
    watcher_unref(w);
  }
}

/* Ends the watcher (code NULL: cancelled, no error). Mutex held. */
static void end_watcher(etcd3_watcher *w, const char *code, const char *message,
                        int64_t compact_revision) {
  if (w->ended) return;
  w->ended = 1;
  w->end_code = code;
  snprintf(w->end_message, sizeof w->end_message, "%s", message ? message : "");
  w->compact_revision = compact_revision;
  list_free(&w->fragments);
  notify(w);
}

static void send_cancel(watch_hub *h, etcd3_watcher *w) {
  Etcdserverpb__WatchCancelRequest c = ETCDSERVERPB__WATCH_CANCEL_REQUEST__INIT;
  Etcdserverpb__WatchRequest r = ETCDSERVERPB__WATCH_REQUEST__INIT;
  c.watch_id = w->id;
  r.request_union_case = ETCDSERVERPB__WATCH_REQUEST__REQUEST_UNION_CANCEL_REQUEST;
  r.cancel_request = &c;
  etcd3_stream_send(h->stream, &r.base);
}

static void send_create(watch_hub *h, etcd3_watcher *w) {
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
  if (etcd3_stream_send(h->stream, &r.base)) {
    w->on_stream = 1;
    w->confirmed = 0;
    w->create_seq = ++h->creates_sent;
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

static void deliver(watch_hub *h, etcd3_watcher *w, response_list *l) {
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
    if (h->stream && w->on_stream && !w->cancel_wanted) {
      w->cancel_wanted = 1;
      send_cancel(h, w);
    }
    return;
  }
  notify(w);
}

static int is_auth_refusal(const char *reason) {
  return reason && (strstr(reason, "permission denied") || strstr(reason, "auth token") ||
                    strstr(reason, "user name is empty"));
}

static void on_watch_response(void *owner, etcd3_stream *s, ProtobufCMessage *msg) {
  etcd3_engine *e = (etcd3_engine *)owner;
  watch_hub *h = (watch_hub *)e->watch_hub;
  Etcdserverpb__WatchResponse *r = (Etcdserverpb__WatchResponse *)msg;
  int64_t header_rev = r->header ? r->header->revision : 0;
  etcd3_watcher *w;
  response_list l = {NULL, NULL};
  (void)s;
  h->backoff = MIN_BACKOFF;
  if (r->watch_id == -1 && r->created) {
    /* etcd 3.4 answers a refused create (permission denied, expired
     * token) with watch_id -1: it is the oldest create not yet answered,
     * since etcd handles a stream's requests in order */
    etcd3_watcher *oldest = NULL;
    for (w = h->watchers; w; w = w->next)
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
    for (w = h->watchers; w; w = w->next)
      if (w->created && !w->ended && header_rev > w->revision) w->revision = header_rev;
    protobuf_c_message_free_unpacked(msg, NULL);
    return;
  }
  for (w = h->watchers; w && w->id != r->watch_id; w = w->next) {
  }
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
    } else if (is_auth_refusal(r->cancel_reason) && e->user &&
               w->auth_generation != e->token_generation) {
      /* the token expired: authenticate again, then create it once more
       * (from its last revision + 1) on a stream with the new token */
      w->auth_generation = e->token_generation;
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
    unlink_watcher(h, w);
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
  deliver(h, w, &w->fragments);
}

/* The stream is gone (broken, or closed by us): every watcher will be
 * created again on the next one; those being cancelled are done. */
static void detach_stream(etcd3_engine *e, watch_hub *h) {
  etcd3_watcher *w, *following;
  h->stream = NULL;
  for (w = h->watchers; w; w = following) {
    following = w->next;
    w->on_stream = 0;
    list_free(&w->fragments);
    if (w->cancel_wanted || w->ended) {
      end_watcher(w, NULL, NULL, 0); /* no-op if it ended already */
      unlink_watcher(h, w);
    }
  }
  (void)e;
}

static void on_watch_closed(void *owner, etcd3_stream *s, grpc_status_code status,
                            const char *details) {
  etcd3_engine *e = (etcd3_engine *)owner;
  watch_hub *h = (watch_hub *)e->watch_hub;
  (void)s; (void)details;
  detach_stream(e, h);
  if (status == GRPC_STATUS_UNAUTHENTICATED) etcd3_auth_refresh(e);
  /* the next endpoint, after a short backoff */
  h->channel = etcd3_engine_next_channel(e, h->channel);
  h->reopen_at = etcd3_now() + h->backoff;
  h->backoff = h->backoff * 2 > MAX_BACKOFF ? MAX_BACKOFF : h->backoff * 2;
}

/* A new token: streams carry theirs from the start, so re-open. */
void etcd3_watch_restart(etcd3_engine *e) {
  watch_hub *h = (watch_hub *)e->watch_hub;
  if (!h) return;
  for (etcd3_watcher *w = h->watchers; w; w = w->next) w->awaiting_auth = 0;
  if (!h->stream) return;
  etcd3_stream_close(h->stream);
  detach_stream(e, h);
  h->reopen_at = 0;
  etcd3_watch_tick(e, etcd3_now());
}

static const etcd3_stream_ops watch_ops = {
  &etcdserverpb__watch_response__descriptor, on_watch_response, on_watch_closed,
};

/* Opens the stream when watchers need one and sends their creates; closes
 * it when none is left. Returns when it wants to run again (0: never).
 * Mutex held; engine thread or Lua thread. */
double etcd3_watch_tick(etcd3_engine *e, double now) {
  watch_hub *h = (watch_hub *)e->watch_hub;
  etcd3_watcher *w;
  if (!h || e->closed) return 0;
  if (!h->watchers) {
    if (h->stream) {
      etcd3_stream_close(h->stream);
      h->stream = NULL;
    }
    return 0;
  }
  if (!h->stream) {
    if (now < h->reopen_at) return h->reopen_at;
    h->stream = etcd3_stream_open(e, h->channel, "/etcdserverpb.Watch/Watch", 1, &watch_ops, e);
    if (!h->stream) {
      h->reopen_at = now + h->backoff;
      return h->reopen_at;
    }
  }
  for (w = h->watchers; w; w = w->next)
    if (!w->on_stream && !w->ended && !w->cancel_wanted && !w->awaiting_auth) send_create(h, w);
  return 0;
}

/* Engine close: every watcher ends with CLOSED. Mutex held. */
void etcd3_watch_shutdown(etcd3_engine *e) {
  watch_hub *h = (watch_hub *)e->watch_hub;
  if (!h) return;
  if (h->stream) etcd3_stream_close(h->stream);
  h->stream = NULL;
  while (h->watchers) {
    etcd3_watcher *w = h->watchers;
    if (!w->cancel_wanted) end_watcher(w, "CLOSED", "the client was closed", 0);
    unlink_watcher(h, w);
  }
}

void etcd3_watch_free_hub(etcd3_engine *e) {
  free(e->watch_hub);
  e->watch_hub = NULL;
}

/* ---- Lua ------------------------------------------------------------- */

static etcd3_watcher *check_watcher(lua_State *L) {
  return (etcd3_watcher *)etcd3_check_record(L, WATCH_MT, "watcher");
}

/* Clears the pollfd signal when Lua has taken everything; mutex held. */
static void seen(etcd3_watcher *w) {
  if (!w->queue.head) etcd3_unsignal(w->engine, &w->signaled);
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
  watch_hub *h;
  int present;
  spec = lua_absindex(L, spec);
  /* from here __gc frees it; nothing below raises */
  w = (etcd3_watcher *)etcd3_new_record(L, WATCH_MT, sizeof *w, e);
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
  e->refs++;
  h = hub_of(e);
  if (!h || e->closed || !w->key || !w->range_end) {
    end_watcher(w, "CLOSED", e->closed ? "the client was closed" : "out of memory", 0);
  } else {
    w->id = h->next_id++;
    w->refs++;
    w->next = h->watchers;
    h->watchers = w;
    etcd3_watch_tick(e, etcd3_now()); /* the create leaves now */
  }
  pthread_mutex_unlock(&e->mu);
  return 1;
}

/* state:state() -> created, ended, revision */
static int l_state(lua_State *L) {
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
static int l_ready(lua_State *L) {
  etcd3_watcher *w = check_watcher(L);
  pthread_mutex_lock(&w->engine->mu);
  lua_pushboolean(L, w->queue.head != NULL || w->ended);
  pthread_mutex_unlock(&w->engine->mu);
  return 1;
}

static int has_news(void *arg, double now, double *until) {
  etcd3_watcher *w = (etcd3_watcher *)arg;
  (void)now; (void)until;
  return w->queue.head || w->ended || w->signaled;
}

/* state:wait(seconds): until something arrives, or the time passes. */
static int l_wait(lua_State *L) {
  etcd3_watcher *w = check_watcher(L);
  etcd3_wait_until(w->engine, luaL_checknumber(L, 2), has_news, w);
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
static int l_poll(lua_State *L) {
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
  lua_newtable(L);
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
static int l_revision(lua_State *L) {
  etcd3_watcher *w = check_watcher(L);
  pthread_mutex_lock(&w->engine->mu);
  lua_pushnumber(L, (lua_Number)w->revision);
  pthread_mutex_unlock(&w->engine->mu);
  return 1;
}

/* Asks etcd to stop the watcher; mutex held. */
static void cancel_locked(etcd3_watcher *w) {
  watch_hub *h = (watch_hub *)w->engine->watch_hub;
  if (w->cancel_wanted || !h) return;
  w->cancel_wanted = 1;
  if (h->stream && w->on_stream) {
    send_cancel(h, w); /* stays listed until etcd confirms */
  } else {
    end_watcher(w, NULL, NULL, 0);
    unlink_watcher(h, w);
  }
}

/* state:cancel(): ends the watcher (no error); events queued are dropped. */
static int l_cancel(lua_State *L) {
  etcd3_watcher *w = check_watcher(L);
  pthread_mutex_lock(&w->engine->mu);
  if (!w->ended) {
    cancel_locked(w);
    end_watcher(w, NULL, NULL, 0);
  } else if (w->on_stream && !w->cancel_wanted) {
    cancel_locked(w);
  }
  list_free(&w->queue);
  w->queued = 0;
  pthread_mutex_unlock(&w->engine->mu);
  return 0;
}

/* state:progress(): asks etcd for a progress notification (all watchers of
 * the stream); false when the stream is not open. */
static int l_progress(lua_State *L) {
  etcd3_watcher *w = check_watcher(L);
  watch_hub *h;
  int ok = 0;
  pthread_mutex_lock(&w->engine->mu);
  h = (watch_hub *)w->engine->watch_hub;
  if (h && h->stream) {
    Etcdserverpb__WatchProgressRequest p = ETCDSERVERPB__WATCH_PROGRESS_REQUEST__INIT;
    Etcdserverpb__WatchRequest r = ETCDSERVERPB__WATCH_REQUEST__INIT;
    r.request_union_case = ETCDSERVERPB__WATCH_REQUEST__REQUEST_UNION_PROGRESS_REQUEST;
    r.progress_request = &p;
    ok = etcd3_stream_send(h->stream, &r.base);
  }
  pthread_mutex_unlock(&w->engine->mu);
  lua_pushboolean(L, ok);
  return 1;
}

static int l_gc(lua_State *L) {
  etcd3_watcher *w = (etcd3_watcher *)etcd3_take_record(L, WATCH_MT);
  etcd3_engine *e;
  if (!w) return 0;
  e = w->engine;
  pthread_mutex_lock(&e->mu);
  if (!w->ended || w->on_stream) cancel_locked(w);
  etcd3_unsignal(e, &w->signaled);
  list_free(&w->queue);
  watcher_unref(w);
  etcd3_watch_tick(e, etcd3_now()); /* closes the stream if none is left */
  pthread_mutex_unlock(&e->mu);
  etcd3_engine_release(e);
  return 0;
}

int etcd3_watch_open(lua_State *L) {
  static const luaL_Reg methods[] = {
    {"state", l_state}, {"ready", l_ready}, {"wait", l_wait}, {"poll", l_poll},
    {"revision", l_revision}, {"cancel", l_cancel}, {"progress", l_progress},
    {NULL, NULL},
  };
  etcd3_register_type(L, WATCH_MT, methods, l_gc);
  return 0;
}
