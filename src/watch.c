/*
 * watch.c - watchers multiplexed on one Watch stream per client, run by
 * the engine thread; identical watchers share one etcd watch.
 *
 * Two objects. A "wire" is one etcd watch on the stream: its watch_id is
 * chosen here (etcd 3.4 accepts the client's own), so responses are
 * routed without guessing; the engine thread receives its responses,
 * reassembles fragments, and drops anything at or below its last revision
 * (so a resume never repeats an event). A "watcher" is what Lua holds
 * (etcd3.WatchState): a subscriber of one wire, with its own queue.
 *
 * Watchers with the same key, range and options share a wire (etcd's gRPC
 * proxy coalesces watches the same way): one put is then one message for
 * any number of watchers, and a cancel leaves only with the last. The
 * events of one delivery are a refcounted batch queued to each watcher.
 * Each watcher has a floor: events at or below it are not its own. A
 * watcher without start_revision joins a wire that has none either; its
 * floor is the later of the wire's revision and the highest revision this
 * client has seen in any response (so a change the client has seen before
 * it watched is never delivered to it, as with a watch of its own). One
 * with start_revision S joins a wire known to have delivered nothing at or
 * above S (floor S - 1). Otherwise a new wire is opened.
 *
 * When the stream breaks (member killed, frozen and found dead by
 * keepalive pings, or refusing because it lost its leader: the stream asks
 * for `hasleader`), it is re-opened on the next endpoint and every wire is
 * created again from its last revision + 1. A compacted revision ends the
 * wire's watchers with COMPACTED; a consumer that falls too far behind
 * ends its watcher alone; a wire whose last watcher leaves is cancelled on
 * the server.
 *
 * The stream and its wires are the engine's "watch" service (registered
 * on the first watch); wires belong to it. A watcher belongs to its Lua
 * userdata and is detached from its wire (under the engine mutex) before
 * it is freed.
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

/* The events of one delivery (whole responses, fragments joined), queued
 * to every watcher of the wire that wants them; freed with the last
 * reference. Read-only once made; `refs` is atomic, so Lua lets go of a
 * batch without the engine mutex. */
typedef struct event_batch {
  response_list responses;
  int64_t min_rev, max_rev;
  size_t n_events;
  int refs;
} event_batch;

typedef struct batch_node {
  event_batch *batch;
  struct batch_node *next;
} batch_node;

typedef struct batch_queue {
  batch_node *head, *tail;
} batch_queue;

typedef struct watch_wire watch_wire;

/* What Lua holds: one subscriber of a wire. */
typedef struct etcd3_watcher {
  etcd3_engine *engine;        /* first: an engine-bound object (auxiliar.h) */
  watch_wire *wire;            /* NULL once ended or cancelled */
  struct etcd3_watcher *prev, *next; /* the wire's watchers */
  int64_t floor;               /* events at or below are not this watcher's */
  int64_t revision;            /* last revision seen */
  int created, ended;
  int news;                    /* posted, not yet seen by Lua */
  const char *end_code;        /* NULL: ended without error (cancel) */
  char end_message[256];
  int64_t compact_revision;
  batch_queue queue;
  size_t queued, max_queued;
} etcd3_watcher;

/* The key, range and options that make two watches the same. */
typedef struct watch_spec {
  const uint8_t *key, *range_end;
  size_t key_len, range_end_len;
  int has_range_end, prev_kv, progress_notify, fragment, noput, nodelete;
  int64_t start_revision;
} watch_spec;

/* One etcd watch on the stream. */
struct watch_wire {
  int64_t id;
  watch_spec spec;             /* key and range_end owned (malloc) */
  uint32_t spec_hash;
  int64_t revision;            /* last revision seen, once known */
  int knows_revision;          /* start_revision given, or etcd confirmed */
  int created, on_stream, cancel_wanted, ended;
  int confirmed;               /* etcd answered the create on this stream */
  uint64_t create_seq;         /* order of the create on this stream */
  unsigned auth_generation;    /* token generation of the last auth retry */
  int awaiting_auth;           /* not re-created until the new token is in */
  response_list fragments;
  etcd3_watcher *watchers;     /* its subscribers, doubly linked */
  int listed;                  /* in the service's list and indexes */
  watch_wire *prev, *next;     /* the list */
  watch_wire *same_slot;       /* the ID index's chain */
  watch_wire *same_spec;       /* the spec index's chain */
};

/* The wires of one engine, multiplexed on one Watch stream. Every
 * per-watcher step costs the same whatever the number of watchers: wires
 * are found by ID and by spec in hash indexes, leave the list in O(1), and
 * only a new stream makes the tick look at all of them. */
typedef struct watch_mux {
  etcd3_engine *engine;
  etcd3_restream watch;
  watch_wire *wires;           /* doubly linked, newest first */
  watch_wire **index;          /* by ID: index_size chains (a power of 2) */
  watch_wire **by_spec;        /* by spec hash: index_size chains */
  size_t index_size, count;
  int creates_due;             /* a new stream: every wire is created on it */
  int64_t next_id;
  uint64_t creates_sent;
} watch_mux;

ETCD3_LOCKED static double watch_tick(etcd3_engine *e, void *state, double now);
ETCD3_LOCKED static void watch_restart(etcd3_engine *e, void *state);
ETCD3_LOCKED static void watch_shutdown(etcd3_engine *e, void *state);

static void watch_free(void *state) {
  free(((watch_mux *)state)->index);
  free(((watch_mux *)state)->by_spec);
  free(state);
}

static const etcd3_service_ops watch_service = {
  .name = "watch", .tick = watch_tick, .token_changed = watch_restart,
  .shutdown = watch_shutdown, .free = watch_free,
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

static void batch_unref(event_batch *b) {
  if (__atomic_sub_fetch(&b->refs, 1, __ATOMIC_ACQ_REL) > 0) return;
  list_free(&b->responses);
  free(b);
}

/* Lets go of every batch of the queue (with or without the engine mutex). */
static void queue_free(batch_queue *q) {
  while (q->head) {
    batch_node *n = q->head;
    q->head = n->next;
    batch_unref(n->batch);
    free(n);
  }
  q->tail = NULL;
}

ETCD3_LOCKED static void notify(etcd3_watcher *w) { etcd3_news_post(w->engine, &w->news); }

static size_t index_slot(const watch_mux *m, int64_t id) {
  return (size_t)(((uint64_t)id * 0x9E3779B97F4A7C15ULL) >> 32) & (m->index_size - 1);
}

/* FNV-1a over the key, the range end and the options. */
static uint32_t spec_hash(const watch_spec *s) {
  uint32_t h = 2166136261u;
  const int flags[] = {s->has_range_end, s->prev_kv, s->progress_notify, s->fragment,
                       s->noput, s->nodelete};
  for (size_t i = 0; i < s->key_len; i++) h = (h ^ s->key[i]) * 16777619u;
  h = (h ^ 0xffu) * 16777619u;
  for (size_t i = 0; i < s->range_end_len; i++) h = (h ^ s->range_end[i]) * 16777619u;
  for (size_t i = 0; i < sizeof flags / sizeof flags[0]; i++)
    h = (h ^ (uint32_t)(flags[i] != 0)) * 16777619u;
  return h;
}

static int same_spec(const watch_spec *a, const watch_spec *b) {
  return a->key_len == b->key_len && a->range_end_len == b->range_end_len &&
         !!a->has_range_end == !!b->has_range_end && !!a->prev_kv == !!b->prev_kv &&
         !!a->progress_notify == !!b->progress_notify && !!a->fragment == !!b->fragment &&
         !!a->noput == !!b->noput && !!a->nodelete == !!b->nodelete &&
         (a->key_len == 0 || !memcmp(a->key, b->key, a->key_len)) &&
         (a->range_end_len == 0 || !memcmp(a->range_end, b->range_end, a->range_end_len));
}

ETCD3_LOCKED static watch_wire *find_wire(const watch_mux *m, int64_t id) {
  watch_wire *w;
  if (!m->index_size) return NULL;
  for (w = m->index[index_slot(m, id)]; w && w->id != id; w = w->same_slot) {
  }
  return w;
}

/* Doubles both indexes when they hold as many wires as chains; 0 on out
 * of memory. */
ETCD3_LOCKED static int grow_index(watch_mux *m) {
  size_t size = m->index_size ? m->index_size * 2 : 64;
  watch_wire **index = (watch_wire **)calloc(size, sizeof *index);
  watch_wire **by_spec = (watch_wire **)calloc(size, sizeof *by_spec);
  if (!index || !by_spec) {
    free(index);
    free(by_spec);
    return 0;
  }
  free(m->index);
  free(m->by_spec);
  m->index = index;
  m->by_spec = by_spec;
  m->index_size = size;
  for (watch_wire *w = m->wires; w; w = w->next) {
    w->same_slot = index[index_slot(m, w->id)];
    index[index_slot(m, w->id)] = w;
    w->same_spec = by_spec[w->spec_hash & (size - 1)];
    by_spec[w->spec_hash & (size - 1)] = w;
  }
  return 1;
}

/* Lists the wire; 0 on out of memory. */
ETCD3_LOCKED static int link_wire(watch_mux *m, watch_wire *w) {
  size_t slot;
  if (m->count >= m->index_size && !grow_index(m)) return 0;
  slot = index_slot(m, w->id);
  w->same_slot = m->index[slot];
  m->index[slot] = w;
  slot = w->spec_hash & (m->index_size - 1);
  w->same_spec = m->by_spec[slot];
  m->by_spec[slot] = w;
  w->prev = NULL;
  w->next = m->wires;
  if (m->wires) m->wires->prev = w;
  m->wires = w;
  m->count++;
  w->listed = 1;
  return 1;
}

static void wire_free(watch_wire *w) {
  list_free(&w->fragments);
  free((void *)w->spec.key);
  free((void *)w->spec.range_end);
  free(w);
}

/* Takes an ended wire, or one being cancelled, out of the service and
 * frees it; it has no watcher left. */
ETCD3_LOCKED static void unlink_wire(watch_mux *m, watch_wire *w) {
  watch_wire **p;
  if (w->listed) {
    for (p = &m->index[index_slot(m, w->id)]; *p != w; p = &(*p)->same_slot) {
    }
    *p = w->same_slot;
    for (p = &m->by_spec[w->spec_hash & (m->index_size - 1)]; *p != w; p = &(*p)->same_spec) {
    }
    *p = w->same_spec;
    if (w->prev) w->prev->next = w->next;
    else m->wires = w->next;
    if (w->next) w->next->prev = w->prev;
    m->count--;
  }
  wire_free(w);
}

/* Ends the watcher (code NULL: cancelled, no error); it stays attached. */
ETCD3_LOCKED static void end_watcher(etcd3_watcher *w, const char *code, const char *message,
                                     int64_t compact_revision) {
  if (w->ended) return;
  w->ended = 1;
  w->end_code = code;
  snprintf(w->end_message, sizeof w->end_message, "%s", message ? message : "");
  w->compact_revision = compact_revision;
  notify(w);
}

/* Takes the watcher off its wire's list. */
ETCD3_LOCKED static void unsubscribe(etcd3_watcher *w) {
  watch_wire *wire = w->wire;
  if (!wire) return;
  if (w->prev) w->prev->next = w->next;
  else wire->watchers = w->next;
  if (w->next) w->next->prev = w->prev;
  w->prev = w->next = NULL;
  w->wire = NULL;
}

ETCD3_LOCKED static void subscribe(watch_wire *wire, etcd3_watcher *w) {
  w->wire = wire;
  w->prev = NULL;
  w->next = wire->watchers;
  if (wire->watchers) wire->watchers->prev = w;
  wire->watchers = w;
}

/* Ends the wire and every watcher of it (code NULL: cancelled). */
ETCD3_LOCKED static void end_wire(watch_wire *wire, const char *code, const char *message,
                                  int64_t compact_revision) {
  wire->ended = 1;
  list_free(&wire->fragments);
  while (wire->watchers) {
    etcd3_watcher *w = wire->watchers;
    end_watcher(w, code, message, compact_revision);
    unsubscribe(w);
  }
}

ETCD3_LOCKED static void send_cancel(watch_mux *m, watch_wire *w) {
  Etcdserverpb__WatchCancelRequest c = ETCDSERVERPB__WATCH_CANCEL_REQUEST__INIT;
  Etcdserverpb__WatchRequest r = ETCDSERVERPB__WATCH_REQUEST__INIT;
  c.watch_id = w->id;
  r.request_union_case = ETCDSERVERPB__WATCH_REQUEST__REQUEST_UNION_CANCEL_REQUEST;
  r.cancel_request = &c;
  etcd3_stream_send(m->watch.stream, &r.base);
}

/* Asks etcd to stop a wire no watcher wants any more; one not on the
 * stream goes at once, one on it when etcd confirms. */
ETCD3_LOCKED static void cancel_wire(watch_mux *m, watch_wire *w) {
  if (w->cancel_wanted) return;
  w->cancel_wanted = 1;
  if (m->watch.stream && w->on_stream) send_cancel(m, w);
  else unlink_wire(m, w);
}

/* The watcher leaves its wire; the wire is cancelled with its last. */
ETCD3_LOCKED static void leave_wire(watch_mux *m, etcd3_watcher *w) {
  watch_wire *wire = w->wire;
  if (!wire) return;
  unsubscribe(w);
  if (!wire->watchers && m) cancel_wire(m, wire);
}

ETCD3_LOCKED static void send_create(watch_mux *m, watch_wire *w) {
  Etcdserverpb__WatchCreateRequest c = ETCDSERVERPB__WATCH_CREATE_REQUEST__INIT;
  Etcdserverpb__WatchRequest r = ETCDSERVERPB__WATCH_REQUEST__INIT;
  Etcdserverpb__WatchCreateRequest__FilterType filters[2];
  size_t n = 0;
  c.key.data = (uint8_t *)w->spec.key;
  c.key.len = w->spec.key_len;
  if (w->spec.has_range_end) {
    c.range_end.data = (uint8_t *)w->spec.range_end;
    c.range_end.len = w->spec.range_end_len;
  }
  /* resume right after the last revision seen */
  c.start_revision = w->knows_revision ? w->revision + 1 : w->spec.start_revision;
  c.progress_notify = w->spec.progress_notify;
  c.prev_kv = w->spec.prev_kv;
  c.fragment = w->spec.fragment;
  c.watch_id = w->id;
  if (w->spec.noput) filters[n++] = ETCDSERVERPB__WATCH_CREATE_REQUEST__FILTER_TYPE__NOPUT;
  if (w->spec.nodelete) filters[n++] = ETCDSERVERPB__WATCH_CREATE_REQUEST__FILTER_TYPE__NODELETE;
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
 * lowest and highest revision among them. */
static size_t drop_seen(response_list *l, int64_t threshold, int64_t *min_rev, int64_t *max_rev) {
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
      if (kept_total + kept == 0 || rev < *min_rev) *min_rev = rev;
      if (rev > *max_rev) *max_rev = rev;
      r->events[kept++] = ev;
    }
    r->n_events = kept;
    kept_total += kept;
  }
  return kept_total;
}

/* Events of the batch above the watcher's floor. */
static size_t events_above(const event_batch *b, int64_t floor) {
  size_t n = 0;
  if (b->min_rev > floor) return b->n_events;
  if (b->max_rev <= floor) return 0;
  for (const response_node *node = b->responses.head; node; node = node->next)
    for (size_t i = 0; i < node->resp->n_events; i++) {
      const Mvccpb__Event *ev = node->resp->events[i];
      if (ev->kv && ev->kv->mod_revision > floor) n++;
    }
  return n;
}

/* Queues the batch to one watcher of its wire. */
ETCD3_LOCKED static void give(watch_mux *m, etcd3_watcher *w, event_batch *b) {
  size_t n = events_above(b, w->floor);
  batch_node *node;
  if (n == 0) return;
  node = (batch_node *)malloc(sizeof *node);
  if (!node) {
    end_watcher(w, "RESOURCE_EXHAUSTED", "out of memory", 0);
    leave_wire(m, w);
    return;
  }
  __atomic_add_fetch(&b->refs, 1, __ATOMIC_RELAXED);
  node->batch = b;
  node->next = NULL;
  if (w->queue.tail) w->queue.tail->next = node;
  else w->queue.head = node;
  w->queue.tail = node;
  w->queued += n;
  if (b->max_rev > w->revision) w->revision = b->max_rev;
  if (w->max_queued > 0 && w->queued > w->max_queued) {
    char msg[160];
    snprintf(msg, sizeof msg,
             "the watcher fell more than %zu events behind (its consumer is too slow)",
             w->max_queued);
    queue_free(&w->queue);
    w->queued = 0;
    end_watcher(w, "RESOURCE_EXHAUSTED", msg, 0);
    leave_wire(m, w);
    return;
  }
  notify(w);
}

/* Hands one delivery (whole responses) to every watcher of the wire. */
ETCD3_LOCKED static void deliver(watch_mux *m, watch_wire *wire, response_list *l) {
  int64_t min_rev = 0, max_rev = wire->revision;
  size_t kept = drop_seen(l, wire->revision, &min_rev, &max_rev);
  event_batch *b;
  if (kept == 0 || !(b = (event_batch *)malloc(sizeof *b))) {
    list_free(l);
    if (kept) {
      end_wire(wire, "RESOURCE_EXHAUSTED", "out of memory", 0);
      cancel_wire(m, wire);
    }
    return;
  }
  wire->revision = max_rev;
  b->responses = *l;
  l->head = l->tail = NULL;
  b->min_rev = min_rev;
  b->max_rev = max_rev;
  b->n_events = kept;
  b->refs = 1; /* held while handing out */
  for (etcd3_watcher *w = wire->watchers, *following; w; w = following) {
    following = w->next;
    give(m, w, b);
  }
  batch_unref(b);
}

/* The wire has seen everything up to `revision` (a progress notification). */
ETCD3_LOCKED static void advance(watch_wire *wire, int64_t revision) {
  if (revision <= wire->revision) return;
  wire->revision = revision;
  for (etcd3_watcher *w = wire->watchers; w; w = w->next)
    if (w->created && revision > w->revision) w->revision = revision;
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
  watch_wire *w;
  response_list l = {NULL, NULL};
  (void)s;
  etcd3_restream_healthy(&m->watch);
  etcd3_engine_saw_revision(e, header_rev);
  if (r->watch_id == -1 && r->created) {
    /* etcd 3.4 answers a refused create (permission denied, expired
     * token) with watch_id -1: it is the oldest create not yet answered,
     * since etcd handles a stream's requests in order */
    watch_wire *oldest = NULL;
    for (w = m->wires; w; w = w->next)
      if (w->on_stream && !w->confirmed && (!oldest || w->create_seq < oldest->create_seq))
        oldest = w;
    if (!oldest) {
      protobuf_c_message_free_unpacked(msg, NULL);
      return;
    }
    r->watch_id = oldest->id;
  }
  if (r->watch_id == -1) {
    /* progress for every wire of the stream (request_progress) */
    for (w = m->wires; w; w = w->next)
      if (w->created && !w->ended) advance(w, header_rev);
    protobuf_c_message_free_unpacked(msg, NULL);
    return;
  }
  w = find_wire(m, r->watch_id);
  if (!w) {
    protobuf_c_message_free_unpacked(msg, NULL);
    return;
  }
  if (r->created) w->confirmed = 1;
  if (r->created && !r->canceled && !w->created) {
    if (!w->knows_revision) {
      w->revision = header_rev;
      w->knows_revision = 1;
    }
    w->created = 1;
    for (etcd3_watcher *sub = w->watchers; sub; sub = sub->next) {
      /* from here on, what the wire delivers is the watcher's */
      if (sub->floor < w->revision) sub->floor = w->revision;
      sub->revision = sub->floor;
      sub->created = 1;
      notify(sub);
    }
  }
  if (r->canceled) {
    w->on_stream = 0;
    if (r->compact_revision > 0) {
      char m[128];
      snprintf(m, sizeof m, "required revision %lld has been compacted (compact revision %lld)",
               (long long)(w->revision + 1), (long long)r->compact_revision);
      end_wire(w, "COMPACTED", m, r->compact_revision);
    } else if (w->cancel_wanted) {
      end_wire(w, NULL, NULL, 0);
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
      end_wire(w, "PERMISSION_DENIED", r->cancel_reason, 0);
    } else {
      end_wire(w, "CANCELLED", r->cancel_reason && *r->cancel_reason
                                   ? r->cancel_reason : "etcd cancelled the watch", 0);
    }
    unlink_wire(m, w);
    protobuf_c_message_free_unpacked(msg, NULL);
    return;
  }
  if (w->ended || w->cancel_wanted) {
    protobuf_c_message_free_unpacked(msg, NULL);
    return;
  }
  if (r->n_events == 0 && !r->fragment) {
    /* a progress notification, or the created response */
    if (!r->created) advance(w, header_rev);
    if (!w->fragments.head) {
      protobuf_c_message_free_unpacked(msg, NULL);
      return;
    }
  }
  {
    response_node *n = (response_node *)malloc(sizeof *n);
    if (!n) {
      protobuf_c_message_free_unpacked(msg, NULL);
      end_wire(w, "RESOURCE_EXHAUSTED", "out of memory", 0);
      cancel_wire(m, w);
      return;
    }
    n->resp = r;
    n->next = NULL;
    l.head = l.tail = n;
  }
  list_append(&w->fragments, &l);
  /* a fragment: more of this revision follows, held until the last */
  if (!r->fragment) deliver(m, w, &w->fragments);
}

/* The stream is gone (broken, or closed by us): every wire will be created
 * again on the next one; those being cancelled are done. */
ETCD3_LOCKED static void detach_stream(watch_mux *m) {
  watch_wire *w, *following;
  for (w = m->wires; w; w = following) {
    following = w->next;
    w->on_stream = 0;
    list_free(&w->fragments);
    if (w->cancel_wanted || w->ended) {
      end_wire(w, NULL, NULL, 0); /* its watchers left already */
      unlink_wire(m, w);
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
  for (watch_wire *w = m->wires; w; w = w->next) w->awaiting_auth = 0;
  if (!m->watch.stream) return;
  etcd3_restream_close(&m->watch);
  detach_stream(m);
  m->watch.reopen_at = 0;
  watch_tick(e, m, etcd3_now());
}

static const etcd3_stream_ops watch_ops = {
  .response = &etcdserverpb__watch_response__descriptor,
  .on_message = on_watch_response, .on_closed = on_watch_closed,
};

/* Whether the wire is to be created on the open stream. */
static int wants_create(const watch_wire *w) {
  return !w->on_stream && !w->ended && !w->cancel_wanted && !w->awaiting_auth;
}

/* Opens the stream when wires need one and sends their creates; closes it
 * when none is left. Returns when it wants to run again (0: never). */
ETCD3_LOCKED static double watch_tick(etcd3_engine *e, void *state, double now) {
  watch_mux *m = (watch_mux *)state;
  watch_wire *w;
  if (e->closed) return 0;
  if (!m->wires) {
    etcd3_restream_close(&m->watch);
    return 0;
  }
  if (!m->watch.stream) {
    if (!etcd3_restream_open(e, &m->watch, m, now)) return m->watch.reopen_at;
    m->creates_due = 1;
  }
  if (m->creates_due) {
    m->creates_due = 0;
    for (w = m->wires; w; w = w->next)
      if (wants_create(w)) send_create(m, w);
  }
  return 0;
}

/* Engine close: every watcher ends with CLOSED. */
ETCD3_LOCKED static void watch_shutdown(etcd3_engine *e, void *state) {
  watch_mux *m = (watch_mux *)state;
  (void)e;
  etcd3_restream_close(&m->watch);
  while (m->wires) {
    watch_wire *w = m->wires;
    end_wire(w, "CLOSED", "the client was closed", 0);
    unlink_wire(m, w);
  }
}

/* A wire this watcher can share, or NULL (see the top of the file). */
ETCD3_LOCKED static watch_wire *joinable(const watch_mux *m, const watch_spec *spec, uint32_t hash) {
  if (!m->index_size) return NULL;
  for (watch_wire *w = m->by_spec[hash & (m->index_size - 1)]; w; w = w->same_spec) {
    if (w->spec_hash != hash || w->ended || w->cancel_wanted || !same_spec(&w->spec, spec))
      continue;
    if (spec->start_revision > 0 ? w->knows_revision && spec->start_revision > w->revision
                                 : w->spec.start_revision == spec->start_revision)
      return w;
  }
  return NULL;
}

/* A new wire for the spec (copied), listed; NULL on out of memory. */
ETCD3_LOCKED static watch_wire *new_wire(watch_mux *m, const watch_spec *spec, uint32_t hash) {
  watch_wire *w = (watch_wire *)calloc(1, sizeof *w);
  uint8_t *key = (uint8_t *)malloc(spec->key_len + 1);
  uint8_t *range_end = (uint8_t *)malloc(spec->range_end_len + 1);
  if (!w || !key || !range_end) {
    free(w);
    free(key);
    free(range_end);
    return NULL;
  }
  memcpy(key, spec->key, spec->key_len);
  memcpy(range_end, spec->range_end, spec->range_end_len);
  w->spec = *spec;
  w->spec.key = key;
  w->spec.range_end = range_end;
  w->spec_hash = hash;
  w->id = m->next_id++;
  if (spec->start_revision > 0) {
    w->revision = spec->start_revision - 1;
    w->knows_revision = 1;
  }
  if (!link_wire(m, w)) {
    wire_free(w);
    return NULL;
  }
  return w;
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

/* The string field `name` of the table at idx, left on the stack (so the
 * pointer stays valid); "" when absent. */
static const uint8_t *opt_bytes(lua_State *L, int idx, const char *name, size_t *len, int *present) {
  const char *s;
  lua_getfield(L, idx, name);
  s = lua_tolstring(L, -1, len);
  *present = s != NULL;
  if (!s) *len = 0;
  return (const uint8_t *)(s ? s : "");
}

/* core client:watch(spec) -> state. spec: key, range_end, start_revision,
 * prev_kv, progress_notify, fragment, noput, nodelete, max_queued.
 * The Lua layer has checked every field. */
int etcd3_watch_new(lua_State *L, etcd3_engine *e, int spec_index) {
  etcd3_watcher *w;
  watch_mux *m;
  watch_wire *wire = NULL;
  watch_spec spec;
  uint32_t hash;
  int present, top;
  spec_index = lua_absindex(L, spec_index);
  top = lua_gettop(L);
  spec.key = opt_bytes(L, spec_index, "key", &spec.key_len, &present);
  spec.range_end = opt_bytes(L, spec_index, "range_end", &spec.range_end_len, &spec.has_range_end);
  spec.prev_kv = opt_bool(L, spec_index, "prev_kv");
  spec.progress_notify = opt_bool(L, spec_index, "progress_notify");
  spec.fragment = opt_bool(L, spec_index, "fragment");
  spec.noput = opt_bool(L, spec_index, "noput");
  spec.nodelete = opt_bool(L, spec_index, "nodelete");
  lua_getfield(L, spec_index, "start_revision");
  spec.start_revision = (int64_t)lua_tonumber(L, -1);
  lua_getfield(L, spec_index, "max_queued");
  hash = spec_hash(&spec);
  /* from here __gc frees it; nothing below raises */
  w = (etcd3_watcher *)etcd3_bound_new(L, ETCD3_WATCH_MT, sizeof *w, e);
  w->max_queued = (size_t)lua_tonumber(L, -2);
  pthread_mutex_lock(&e->mu);
  etcd3_engine_ref_locked(e);
  m = e->closed ? NULL : mux_of(e);
  if (m) {
    wire = joinable(m, &spec, hash);
    if (!wire && (wire = new_wire(m, &spec, hash)) != NULL) {
      if (m->watch.stream && !m->creates_due) send_create(m, wire); /* leaves now */
      else watch_tick(e, m, etcd3_now());
    }
  }
  if (!wire) {
    end_watcher(w, "CLOSED", e->closed ? "the client was closed" : "out of memory", 0);
  } else {
    w->floor = spec.start_revision > 0 ? spec.start_revision - 1 : etcd3_engine_seen_revision(e);
    subscribe(wire, w);
    if (wire->created) {
      if (w->floor < wire->revision) w->floor = wire->revision;
      w->revision = w->floor;
      w->created = 1;
    } else {
      w->revision = w->floor;
    }
  }
  pthread_mutex_unlock(&e->mu);
  lua_replace(L, top + 1); /* stack: ..., state */
  lua_settop(L, top + 1);
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
  batch_queue queue;
} taken_box;

static int taken_gc(lua_State *L) {
  taken_box *b = (taken_box *)lua_touserdata(L, 1);
  queue_free(&b->queue);
  return 0;
}

/* state:poll() -> { event, … } (may be empty) | nil, code, message,
 * compact_revision once the watcher ended and nothing is left. */
static int watcher_poll(lua_State *L) {
  etcd3_watcher *w = check_watcher(L);
  taken_box *box;
  int64_t floor;
  int n = 0;
  box = (taken_box *)lua_newuserdata(L, sizeof *box);
  box->queue.head = box->queue.tail = NULL;
  lua_newtable(L); /* metatable with __gc: lets go of what was taken on error */
  lua_pushcfunction(L, taken_gc);
  lua_setfield(L, -2, "__gc");
  lua_setmetatable(L, -2);
  pthread_mutex_lock(&w->engine->mu);
  box->queue = w->queue;
  w->queue.head = w->queue.tail = NULL;
  w->queued = 0;
  floor = w->floor;
  seen(w);
  if (!box->queue.head && w->ended) {
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
  for (batch_node *node = box->queue.head; node; node = node->next) {
    for (response_node *rn = node->batch->responses.head; rn; rn = rn->next) {
      for (size_t i = 0; i < rn->resp->n_events; i++) {
        const Mvccpb__Event *ev = rn->resp->events[i];
        if (ev->kv && ev->kv->mod_revision <= floor) continue;
        etcd3_push_message(L, &ev->base);
        lua_rawseti(L, -2, ++n);
      }
    }
  }
  queue_free(&box->queue);
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

/* Ends the watcher (no error), drops what it queued and leaves its wire. */
ETCD3_LOCKED static void cancel_watcher(etcd3_watcher *w) {
  end_watcher(w, NULL, NULL, 0);
  leave_wire((watch_mux *)etcd3_engine_service(w->engine, &watch_service), w);
  queue_free(&w->queue);
  w->queued = 0;
}

/* state:cancel(): ends the watcher (no error); events queued are dropped. */
static int watcher_cancel(lua_State *L) {
  etcd3_watcher *w = check_watcher(L);
  pthread_mutex_lock(&w->engine->mu);
  cancel_watcher(w);
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
  cancel_watcher(w);
  etcd3_news_seen(e, &w->news);
  m = (watch_mux *)etcd3_engine_service(e, &watch_service);
  if (m && !m->wires) etcd3_restream_close(&m->watch); /* none is left */
  pthread_mutex_unlock(&e->mu);
  free(w);
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
