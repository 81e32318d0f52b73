/*
 * watch_internal.h - what the three watch files share (and sink.c, which
 * reads a batch's events): the structs of watches and the calls between
 * the files.
 *
 *   watch.c        the engine's "watch" service: the stream, its wires,
 *                  creates, responses (fragments, delivery), auth retry;
 *   watch_index.c  the service's list of wires and its two hash indexes
 *                  (by ID, by spec);
 *   watcher.c      the etcd3.WatchState userdata Lua holds (watcher.h).
 *
 * Who owns what: the service owns its wires, and only watch_index.c
 * links or unlinks one (the list and the index chains); a wire's other
 * fields are watch.c's. A watcher belongs to its Lua userdata (watcher.c
 * frees it); watch.c subscribes it to a wire, queues batches to it and
 * ends it, always under the engine mutex.
 */
#ifndef ETCD3_WATCH_INTERNAL_H
#define ETCD3_WATCH_INTERNAL_H

#include <stdint.h>

#include "engine.h"
#include "stream.h"
#include "rpc.pb-c.h"

/* ---- deliveries ------------------------------------------------------- */

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

/* ---- watchers, wires, the service ------------------------------------- */

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
  struct etcd3_sink *sink;     /* writes its batches into a shared dict (sink.c) */
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
  int auth_retried;            /* refused for its token: renewed once */
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

/* ---- watch_index.c: the list and the indexes --------------------------- */

/* The spec index's hash of a spec (no lock needed). */
uint32_t etcd3_watch_spec_hash(const watch_spec *s);
/* The listed wire with this ID, or NULL. */
ETCD3_LOCKED watch_wire *etcd3_wires_find(const watch_mux *m, int64_t id);
/* A listed wire a new watcher of `spec` can share, or NULL (the rule is
 * at the top of watch.c). */
ETCD3_LOCKED watch_wire *etcd3_wires_joinable(const watch_mux *m, const watch_spec *spec,
                                              uint32_t hash);
/* Lists the wire (its id and spec_hash set); 0 on out of memory. */
ETCD3_LOCKED int etcd3_wires_add(watch_mux *m, watch_wire *w);
/* Takes the wire out of the list, if it is in; does not free it. */
ETCD3_LOCKED void etcd3_wires_remove(watch_mux *m, watch_wire *w);
/* Frees the indexes (the service is being freed). */
void etcd3_wires_free_index(watch_mux *m);

/* ---- watch.c: what the watcher binding asks of the service ------------- */

/* The new watcher `w` joins a wire for `spec` (hash: its
 * etcd3_watch_spec_hash): one it can share, or a new one whose create
 * leaves now; it is ended with CLOSED when the engine is closed or out of
 * memory. The spec is copied. */
ETCD3_LOCKED void etcd3_watch_join(etcd3_engine *e, etcd3_watcher *w, const watch_spec *spec,
                                   uint32_t hash);
/* Ends the watcher (no error), drops what it queued and leaves its wire. */
ETCD3_LOCKED void etcd3_watch_cancel(etcd3_watcher *w);
/* Asks etcd for a progress notification (all watchers of the stream);
 * 0 when the stream is not open. */
ETCD3_LOCKED int etcd3_watch_progress(etcd3_engine *e);
/* Closes the stream when no wire is left. */
ETCD3_LOCKED void etcd3_watch_close_idle(etcd3_engine *e);
/* Lets go of every batch of the queue (with or without the engine mutex). */
void etcd3_watch_queue_free(batch_queue *q);

#endif
