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
 *
 * This file is the engine side: the service, its stream and wires, the
 * creates and the responses (fragments joined, events delivered), and the
 * retry of a create refused for its token. The wires' list and indexes
 * are watch_index.c's; the userdata Lua holds is watcher.c's; the structs
 * they share are in watch_internal.h.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "auth.h"
#include "sink.h"
#include "watch_internal.h"

/* A watcher with a sink (sink.c) wakes Lua all the same once this many
 * events wait for it. */
#define SINK_QUEUED_MAX 4096

ETCD3_LOCKED static double watch_tick(etcd3_engine *e, void *state, double now);
ETCD3_LOCKED static void watch_restart(etcd3_engine *e, void *state);
ETCD3_LOCKED static void watch_shutdown(etcd3_engine *e, void *state);

static void watch_free(void *state) {
  etcd3_wires_free_index((watch_mux *)state);
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

void etcd3_watch_queue_free(batch_queue *q) {
  while (q->head) {
    batch_node *n = q->head;
    q->head = n->next;
    batch_unref(n->batch);
    free(n);
  }
  q->tail = NULL;
}

ETCD3_LOCKED static void notify(etcd3_watcher *w) { etcd3_news_post(w->engine, &w->news); }

static void wire_free(watch_wire *w) {
  list_free(&w->fragments);
  free((void *)w->spec.key);
  free((void *)w->spec.range_end);
  free(w);
}

/* Takes an ended wire, or one being cancelled, out of the service and
 * frees it; it has no watcher left. */
ETCD3_LOCKED static void unlink_wire(watch_mux *m, watch_wire *w) {
  etcd3_wires_remove(m, w);
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
    etcd3_watch_queue_free(&w->queue);
    w->queued = 0;
    end_watcher(w, "RESOURCE_EXHAUSTED", msg, 0);
    leave_wire(m, w);
    return;
  }
  /* a batch its sink wrote into the dict waits for Lua's next look, unless
   * too many are waiting */
  if (w->sink && etcd3_sink_apply(w->sink, b, w->floor) && w->queued <= SINK_QUEUED_MAX) return;
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

/* etcd 3.4 refuses a create whose stream's token expired with "permission
 * denied" (it cannot tell an expired token from a missing permission
 * there): renewing the token once tells them apart. */
static int is_auth_refusal(const char *reason) {
  return reason && (strstr(reason, "permission denied") ||
                    etcd3_policy_token_refused(GRPC_STATUS_OK, reason));
}

ETCD3_LOCKED static void watch_restart(etcd3_engine *e, void *state);

ETCD3_LOCKED static void on_watch_response(void *owner, etcd3_stream *s, ProtobufCMessage *msg) {
  watch_mux *m = (watch_mux *)owner;
  etcd3_engine *e = m->engine;
  int renewal;
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
    /* The answer to request_progress, for every wire of the stream. etcd
     * 3.4 sends it on the stream's control queue, which its send loop
     * serves in random turn with the queue of events already notified:
     * it can arrive ahead of events at or below its revision. So it moves
     * only what revision() reports, never a wire's revision (below which
     * events are dropped as seen, and after which a watch resumes): that
     * would lose the events it overtook. */
    for (w = m->wires; w; w = w->next) {
      if (!w->created || w->ended) continue;
      for (etcd3_watcher *sub = w->watchers; sub; sub = sub->next)
        if (sub->created && header_rev > sub->revision) sub->revision = header_rev;
    }
    protobuf_c_message_free_unpacked(msg, NULL);
    return;
  }
  w = etcd3_wires_find(m, r->watch_id);
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
    w->auth_retried = 0;
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
    } else if (is_auth_refusal(r->cancel_reason) && !w->auth_retried &&
               (renewal = etcd3_auth_refresh(e, m->watch.opened_at)) != ETCD3_AUTH_CANNOT) {
      /* the stream's token expired: once a new one is there, create it
       * once more (from its last revision + 1) on a stream carrying it */
      w->auth_retried = 1;
      w->awaiting_auth = 1;
      protobuf_c_message_free_unpacked(msg, NULL);
      if (renewal == ETCD3_AUTH_RENEWED) watch_restart(e, m);
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
  (void)s;
  /* the next endpoint after a short backoff, or a new token (policy.h) */
  etcd3_restream_broken(m->engine, &m->watch, status, details);
  detach_stream(m);
}

/* A new token (or the shared Authenticate ended without one): a stream
 * carries its token from its start, so the stream re-opens when wires
 * were refused for theirs; it is left alone otherwise. */
ETCD3_LOCKED static void watch_restart(etcd3_engine *e, void *state) {
  watch_mux *m = (watch_mux *)state;
  int refused = 0;
  for (watch_wire *w = m->wires; w; w = w->next) {
    refused |= w->awaiting_auth;
    w->awaiting_auth = 0;
  }
  if (!refused || !m->watch.stream) return;
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
  if (!etcd3_wires_add(m, w)) {
    wire_free(w);
    return NULL;
  }
  return w;
}


/* ---- what the watcher binding asks (watcher.c) ------------------------ */

ETCD3_LOCKED void etcd3_watch_join(etcd3_engine *e, etcd3_watcher *w, const watch_spec *spec,
                                   uint32_t hash) {
  watch_mux *m = e->closed ? NULL : mux_of(e);
  watch_wire *wire = NULL;
  if (m) {
    wire = etcd3_wires_joinable(m, spec, hash);
    if (!wire && (wire = new_wire(m, spec, hash)) != NULL) {
      if (m->watch.stream && !m->creates_due) send_create(m, wire); /* leaves now */
      else watch_tick(e, m, etcd3_now());
    }
  }
  if (!wire) {
    end_watcher(w, "CLOSED", e->closed ? "the client was closed" : "out of memory", 0);
  } else {
    w->floor = spec->start_revision > 0 ? spec->start_revision - 1 : etcd3_engine_seen_revision(e);
    subscribe(wire, w);
    if (wire->created) {
      if (w->floor < wire->revision) w->floor = wire->revision;
      w->revision = w->floor;
      w->created = 1;
    } else {
      w->revision = w->floor;
    }
  }
}

ETCD3_LOCKED void etcd3_watch_cancel(etcd3_watcher *w) {
  end_watcher(w, NULL, NULL, 0);
  leave_wire((watch_mux *)etcd3_engine_service(w->engine, &watch_service), w);
  etcd3_watch_queue_free(&w->queue);
  w->queued = 0;
}

ETCD3_LOCKED int etcd3_watch_progress(etcd3_engine *e) {
  watch_mux *m = (watch_mux *)etcd3_engine_service(e, &watch_service);
  Etcdserverpb__WatchProgressRequest p = ETCDSERVERPB__WATCH_PROGRESS_REQUEST__INIT;
  Etcdserverpb__WatchRequest r = ETCDSERVERPB__WATCH_REQUEST__INIT;
  if (!m || !m->watch.stream) return 0;
  r.request_union_case = ETCDSERVERPB__WATCH_REQUEST__REQUEST_UNION_PROGRESS_REQUEST;
  r.progress_request = &p;
  return etcd3_stream_send(m->watch.stream, &r.base);
}

ETCD3_LOCKED void etcd3_watch_close_idle(etcd3_engine *e) {
  watch_mux *m = (watch_mux *)etcd3_engine_service(e, &watch_service);
  if (m && !m->wires) etcd3_restream_close(&m->watch);
}
