/*
 * stream.c - a bidirectional gRPC stream on the engine (Watch,
 * LeaseKeepAlive, Snapshot), and the re-opening stream of the services.
 *
 * Measured facts this follows (docs/grpc-facts.md, "Streams"): start
 * send-initial-metadata and recv-status at once, never wait for response
 * headers before sending (etcd sends them with its first response), keep
 * at most one send and one recv outstanding, and end a Watch by cancelling
 * (a half-close does not end it).
 *
 * Threads: the functions of stream.h are called locked, from a Lua thread
 * (starting, sending) or the engine thread; the completions (on_status,
 * on_recv, on_sent) run on the engine thread and take the engine mutex
 * themselves. The owner gets its callbacks on the engine thread, locked.
 * A stream frees itself once its status has arrived and none of its
 * batches is outstanding; the owner forgets it when on_closed runs or when
 * it calls etcd3_stream_close (no callback follows that).
 */
#include <stdlib.h>
#include <string.h>

#include <grpc/byte_buffer.h>
#include <grpc/slice.h>

#include "auth.h"
#include "codec.h"
#include "stream.h"

typedef struct stream_tag {
  etcd3_tag tag;
  struct etcd3_stream *stream;
} stream_tag;

typedef struct pending_send {
  grpc_byte_buffer *buf;
  struct pending_send *next;
} pending_send;

struct etcd3_stream {
  etcd3_engine *engine;
  grpc_call *call;
  const etcd3_stream_ops *ops;
  void *owner;                 /* NULL once detached */
  size_t channel;
  stream_tag status_tag, recv_tag, send_tag;
  int batches;                 /* outstanding batches */
  int first_recv;              /* the first recv also takes the headers */
  int ended;                   /* status arrived */
  size_t n_md;
  grpc_metadata md[2];          /* hasleader, token */
  grpc_metadata_array recv_md, trailing_md;
  grpc_byte_buffer *recv_buf, *send_buf;
  pending_send *queue, *queue_tail;
  grpc_status_code status;
  grpc_slice details;
};

ETCD3_LOCKED static void stream_maybe_free(etcd3_stream *s) {
  if (!s->ended || s->batches > 0) return;
  while (s->queue) {
    pending_send *p = s->queue;
    s->queue = p->next;
    grpc_byte_buffer_destroy(p->buf);
    free(p);
  }
  if (s->send_buf) grpc_byte_buffer_destroy(s->send_buf);
  grpc_metadata_array_destroy(&s->recv_md);
  grpc_metadata_array_destroy(&s->trailing_md);
  grpc_slice_unref(s->details);
  for (size_t i = 0; i < s->n_md; i++) {
    grpc_slice_unref(s->md[i].key);
    grpc_slice_unref(s->md[i].value);
  }
  grpc_call_unref(s->call);
  s->engine->polled--;
  etcd3_engine_unref_locked(s->engine);
  free(s);
}

ETCD3_LOCKED static void start_recv(etcd3_stream *s) {
  grpc_op ops[2];
  size_t n = 0;
  memset(ops, 0, sizeof ops);
  if (s->first_recv) {
    ops[n].op = GRPC_OP_RECV_INITIAL_METADATA;
    ops[n].data.recv_initial_metadata.recv_initial_metadata = &s->recv_md;
    n++;
    s->first_recv = 0;
  }
  ops[n].op = GRPC_OP_RECV_MESSAGE;
  ops[n].data.recv_message.recv_message = &s->recv_buf;
  n++;
  if (grpc_call_start_batch(s->call, ops, n, &s->recv_tag.tag, NULL) == GRPC_CALL_OK)
    s->batches++;
}

/* Whether the stream may start another batch: not once it ended, once its
 * owner let go (it is being cancelled), or once the engine is closing (its
 * queue is shut down: gRPC aborts on a batch started there). */
ETCD3_LOCKED static int may_start(const etcd3_stream *s) {
  return !s->ended && s->owner && !s->engine->closed;
}

ETCD3_LOCKED static void start_send(etcd3_stream *s) {
  grpc_op op;
  pending_send *p = s->queue;
  if (s->send_buf || !p || !may_start(s)) return;
  s->queue = p->next;
  if (!s->queue) s->queue_tail = NULL;
  s->send_buf = p->buf;
  free(p);
  memset(&op, 0, sizeof op);
  op.op = GRPC_OP_SEND_MESSAGE;
  op.data.send_message.send_message = s->send_buf;
  /* More behind it (a batch of lease renewals): gRPC may hold this one
   * and write them together with the last, which has no hint; one
   * sendmsg instead of one per message. The send still completes at once. */
  if (s->queue) op.flags = GRPC_WRITE_BUFFER_HINT;
  if (grpc_call_start_batch(s->call, &op, 1, &s->send_tag.tag, NULL) == GRPC_CALL_OK)
    s->batches++;
}

static void on_status(etcd3_tag *tag, int ok) {
  etcd3_stream *s = ((stream_tag *)tag)->stream;
  etcd3_engine *e = s->engine;
  (void)ok;
  pthread_mutex_lock(&e->mu);
  s->batches--;
  s->ended = 1;
  if (s->owner) {
    char details[256];
    size_t len = GRPC_SLICE_LENGTH(s->details);
    if (len >= sizeof details) len = sizeof details - 1;
    memcpy(details, GRPC_SLICE_START_PTR(s->details), len);
    details[len] = '\0';
    void *owner = s->owner;
    s->owner = NULL;
    s->ops->on_closed(owner, s, s->status, details);
  }
  stream_maybe_free(s);
  pthread_mutex_unlock(&e->mu);
}

static void on_recv(etcd3_tag *tag, int ok) {
  etcd3_stream *s = ((stream_tag *)tag)->stream;
  etcd3_engine *e = s->engine;
  ProtobufCMessage *msg = NULL;
  /* Decode outside the lock: it touches only this buffer. */
  if (ok && s->recv_buf) msg = etcd3_unpack(s->ops->response, s->recv_buf);
  pthread_mutex_lock(&e->mu);
  s->batches--;
  if (s->recv_buf) {
    grpc_byte_buffer_destroy(s->recv_buf);
    s->recv_buf = NULL;
    /* The next read first: starting it, gRPC may write (flow control
     * updates) at once, and a message's owner wakes Lua, which then
     * waits for this lock; woken last, it finds the lock nearly free. */
    if (may_start(s)) start_recv(s);
    if (msg && s->owner) {
      s->ops->on_message(s->owner, s, msg);
      msg = NULL;
    }
  }
  /* no message: the stream is ending; its status follows */
  stream_maybe_free(s);
  pthread_mutex_unlock(&e->mu);
  if (msg) protobuf_c_message_free_unpacked(msg, NULL);
}

static void on_sent(etcd3_tag *tag, int ok) {
  etcd3_stream *s = ((stream_tag *)tag)->stream;
  etcd3_engine *e = s->engine;
  (void)ok;
  pthread_mutex_lock(&e->mu);
  s->batches--;
  grpc_byte_buffer_destroy(s->send_buf);
  s->send_buf = NULL;
  start_send(s);
  stream_maybe_free(s);
  pthread_mutex_unlock(&e->mu);
}

ETCD3_LOCKED etcd3_stream *etcd3_stream_start(etcd3_engine *e, size_t channel, const char *path,
                                              int hasleader, const etcd3_stream_ops *ops,
                                              void *owner) {
  grpc_op op[2];
  etcd3_stream *s;
  if (e->closed) return NULL;
  s = (etcd3_stream *)calloc(1, sizeof *s);
  if (!s) return NULL;
  s->engine = e;
  s->ops = ops;
  s->owner = owner;
  s->channel = channel;
  s->first_recv = 1;
  s->details = grpc_empty_slice();
  s->status_tag.tag.done = on_status;
  s->recv_tag.tag.done = on_recv;
  s->send_tag.tag.done = on_sent;
  s->status_tag.stream = s->recv_tag.stream = s->send_tag.stream = s;
  grpc_metadata_array_init(&s->recv_md);
  grpc_metadata_array_init(&s->trailing_md);
  s->call = grpc_channel_create_call(
      e->channels[channel].channel, NULL, GRPC_PROPAGATE_DEFAULTS, e->cq,
      grpc_slice_from_static_string(path), NULL,
      gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
  etcd3_engine_ref_locked(e);
  e->polled++;
  etcd3_engine_wake(e);
  memset(op, 0, sizeof op);
  op[0].op = GRPC_OP_SEND_INITIAL_METADATA;
  if (hasleader) {
    /* etcd refuses the stream when its member has no leader, so a watch
     * on a member cut off from its cluster moves elsewhere. */
    s->md[0].key = grpc_slice_from_static_string("hasleader");
    s->md[0].value = grpc_slice_from_static_string("true");
    s->n_md = 1;
  }
  s->n_md += etcd3_engine_metadata(e, s->md + s->n_md, 1);
  op[0].data.send_initial_metadata.count = s->n_md;
  op[0].data.send_initial_metadata.metadata = s->md;
  op[1].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
  op[1].data.recv_status_on_client.trailing_metadata = &s->trailing_md;
  op[1].data.recv_status_on_client.status = &s->status;
  op[1].data.recv_status_on_client.status_details = &s->details;
  if (grpc_call_start_batch(s->call, op, 2, &s->status_tag.tag, NULL) != GRPC_CALL_OK) {
    s->ended = 1;
    s->owner = NULL;
    stream_maybe_free(s);
    return NULL;
  }
  s->batches++;
  start_recv(s);
  return s;
}

ETCD3_LOCKED int etcd3_stream_send(etcd3_stream *s, const ProtobufCMessage *msg) {
  pending_send *p = (pending_send *)malloc(sizeof *p);
  if (!p) return 0;
  p->buf = etcd3_pack(msg);
  p->next = NULL;
  if (s->queue_tail) s->queue_tail->next = p;
  else s->queue = p;
  s->queue_tail = p;
  start_send(s);
  return 1;
}

ETCD3_LOCKED void etcd3_stream_close(etcd3_stream *s) {
  s->owner = NULL;
  grpc_call_cancel_with_status(s->call, GRPC_STATUS_CANCELLED, "stream closed", NULL);
}

/* ---- the re-opening stream -------------------------------------------- */

void etcd3_restream_init(etcd3_restream *r, const char *path, int hasleader,
                         const etcd3_stream_ops *ops) {
  r->stream = NULL;
  r->channel = 0;
  r->opened_at = 0;
  r->reopen_at = 0;
  etcd3_backoff_reset(&r->backoff);
  r->path = path;
  r->hasleader = hasleader;
  r->ops = ops;
}

ETCD3_LOCKED etcd3_stream *etcd3_restream_open(etcd3_engine *e, etcd3_restream *r, void *owner,
                                               double now) {
  if (r->stream || now < r->reopen_at) return r->stream;
  r->channel = etcd3_policy_pick(e);
  r->opened_at = now;
  r->stream = etcd3_stream_start(e, r->channel, r->path, r->hasleader, r->ops, owner);
  if (!r->stream) r->reopen_at = now + etcd3_backoff_next(&r->backoff);
  return r->stream;
}

ETCD3_LOCKED void etcd3_restream_healthy(etcd3_restream *r) { etcd3_backoff_reset(&r->backoff); }

ETCD3_LOCKED void etcd3_restream_broken(etcd3_engine *e, etcd3_restream *r,
                                        grpc_status_code status, const char *details) {
  r->stream = NULL;
  /* refused for its token: renewed (or being renewed) before it re-opens;
   * the member is fine. Any other break: the next member. */
  if (etcd3_policy_verdict(status, details, 1, 1) == ETCD3_REAUTH)
    etcd3_auth_refresh(e, r->opened_at);
  else
    etcd3_policy_failed(e, r->channel);
  r->reopen_at = etcd3_now() + etcd3_backoff_next(&r->backoff);
}

ETCD3_LOCKED void etcd3_restream_close(etcd3_restream *r) {
  if (r->stream) etcd3_stream_close(r->stream);
  r->stream = NULL;
}
