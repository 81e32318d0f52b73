/*
 * stream.h - a bidirectional gRPC stream on the engine (Watch,
 * LeaseKeepAlive, Snapshot), and the re-opening stream the background
 * services keep alive across member failures.
 */
#ifndef ETCD3_STREAM_H
#define ETCD3_STREAM_H

#include <protobuf-c/protobuf-c.h>

#include "engine.h"
#include "policy.h"

typedef struct etcd3_stream etcd3_stream;

/* What a stream's owner hears; engine thread, locked. */
typedef struct etcd3_stream_ops {
  const ProtobufCMessageDescriptor *response;
  /* takes ownership of msg */
  ETCD3_LOCKED void (*on_message)(void *owner, etcd3_stream *s, ProtobufCMessage *msg);
  /* the stream is gone for the owner after it */
  ETCD3_LOCKED void (*on_closed)(void *owner, etcd3_stream *s, grpc_status_code status,
                                 const char *details);
} etcd3_stream_ops;

/* Starts the stream (NULL when the engine is closed or out of memory). */
ETCD3_LOCKED etcd3_stream *etcd3_stream_start(etcd3_engine *e, size_t channel, const char *path,
                                              int hasleader, const etcd3_stream_ops *ops,
                                              void *owner);
/* Queues msg (packed now; the caller keeps msg); 0 on out of memory. */
ETCD3_LOCKED int etcd3_stream_send(etcd3_stream *s, const ProtobufCMessage *msg);
/* The owner lets go: cancelled, frees itself; no callback follows. */
ETCD3_LOCKED void etcd3_stream_close(etcd3_stream *s);

/* A stream a service keeps open while it needs one, under the client's
 * request policy (policy.h): it opens on the current endpoint; when it
 * breaks, that endpoint is marked failed and the next one opens after the
 * policy's backoff (which starts over once a message arrives). A break for
 * the stream's token renews it first (the shared Authenticate). */
typedef struct etcd3_restream {
  etcd3_stream *stream;   /* NULL while none is open */
  size_t channel;         /* where the open (or last) one went */
  double opened_at;       /* when it opened (its token is from then) */
  double reopen_at;       /* not before (monotonic) */
  etcd3_backoff backoff;
  const char *path;
  int hasleader;
  const etcd3_stream_ops *ops;
} etcd3_restream;

void etcd3_restream_init(etcd3_restream *r, const char *path, int hasleader,
                         const etcd3_stream_ops *ops);
/* The open stream, or a new one when the backoff allows (else NULL). */
ETCD3_LOCKED etcd3_stream *etcd3_restream_open(etcd3_engine *e, etcd3_restream *r, void *owner,
                                               double now);
ETCD3_LOCKED void etcd3_restream_healthy(etcd3_restream *r); /* a message came */
/* The stream ended with `status` and `details` (on_closed), or its owner
 * found it out of step (UNAVAILABLE, NULL). */
ETCD3_LOCKED void etcd3_restream_broken(etcd3_engine *e, etcd3_restream *r,
                                        grpc_status_code status, const char *details);
ETCD3_LOCKED void etcd3_restream_close(etcd3_restream *r);   /* no longer needed */

#endif
