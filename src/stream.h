/*
 * stream.h - a bidirectional gRPC stream on the engine (Watch,
 * LeaseKeepAlive, Snapshot), and the re-opening stream the background
 * services keep alive across member failures.
 */
#ifndef ETCD3_STREAM_H
#define ETCD3_STREAM_H

#include <protobuf-c/protobuf-c.h>

#include "engine.h"

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

/* A stream a service keeps open while it needs one: when it breaks, the
 * next one opens on the next endpoint, after a backoff that doubles from
 * 0.1 s up to 1 s and starts over once a message arrives. */
typedef struct etcd3_restream {
  etcd3_stream *stream;   /* NULL while none is open */
  size_t channel;         /* where the next one opens */
  double reopen_at;       /* not before (monotonic) */
  double backoff;
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
ETCD3_LOCKED void etcd3_restream_broken(etcd3_engine *e, etcd3_restream *r); /* on_closed */
ETCD3_LOCKED void etcd3_restream_close(etcd3_restream *r);   /* no longer needed */

#endif
