/*
 * etcd3.h - what the C files of etcd3.core share.
 *
 * Ownership in one paragraph: an engine (engine.c) owns a gRPC completion
 * queue, the channels to every endpoint and the thread that waits on the
 * queue. It is reference counted: the client userdata holds one reference and
 * every call object (call.c) holds one, so userdata may be collected in any
 * order. The engine thread never touches a lua_State; it completes calls
 * under the engine mutex, signals the condition variable, and counts the
 * completion on the eventfd that `client:pollfd()` exposes.
 */
#ifndef ETCD3_H
#define ETCD3_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include <grpc/grpc.h>
#include <protobuf-c/protobuf-c.h>

#include "compat.h"

#define ETCD3_CLIENT_MT "etcd3.Client"
#define ETCD3_CALL_MT "etcd3.Call"
#define ETCD3_ARENA_MT "etcd3.Arena"
#define ETCD3_DECODED_MT "etcd3.Decoded"
#define ETCD3_MAX_ENDPOINTS 64

/* Every completion queue tag starts with this: the engine thread calls
 * `done` with the event's success flag. */
typedef struct etcd3_tag {
  void (*done)(struct etcd3_tag *tag, int ok);
} etcd3_tag;

typedef struct etcd3_channel {
  char *target;       /* host:port as handed to gRPC */
  grpc_channel *channel;
} etcd3_channel;

struct etcd3_call;

typedef struct etcd3_channel_options {
  int keepalive_ms;
  int max_recv_bytes;
  int tls;                      /* TLS channels, with these PEM texts: */
  const char *ca, *cert, *key;  /* NULL: system roots / no client cert */
  const char *server_name;      /* overrides the name checked (may be NULL) */
} etcd3_channel_options;

typedef struct etcd3_engine {
  pthread_mutex_t mu;           /* guards everything below that changes */
  pthread_cond_t cond;          /* broadcast on every completion */
  grpc_completion_queue *cq;
  grpc_completion_queue *sync_cq; /* plucked by the Lua thread (call.c) */
  pthread_t thread;
  int thread_started;
  int closed;                   /* set once by etcd3_engine_close */
  int resting;                  /* the engine thread is not polling */
  int async_inflight;           /* calls the engine thread completes */
  int streams;                  /* open streams (stream.c) */
  int refs;                     /* client + live call objects */
  int eventfd;                  /* readable while `uncollected` > 0 */
  unsigned long uncollected;    /* completions Lua has not collected */
  unsigned fork_generation;     /* forks seen when the engine was made */
  size_t n_channels;            /* grows (auto_sync), never shrinks */
  etcd3_channel *channels;      /* ETCD3_MAX_ENDPOINTS slots */
  etcd3_channel_options channel_options; /* keepalive, max size, tls flag */
  struct etcd3_call *inflight;  /* calls whose batch is under way */
  char *token;                  /* auth token for every call and stream */
  char *user, *password;        /* for re-authenticating streams (auth.c) */
  int auth_inflight;            /* an Authenticate call is under way */
  grpc_call *auth_call;         /* that call, to cancel on close */
  unsigned token_generation;    /* bumped on every new token */
  void *lease_hub;              /* lease.c: keepalive stream and leases */
  void *watch_hub;              /* watch.c: watch stream and watchers */
} etcd3_engine;



/* engine.c */
etcd3_engine *etcd3_engine_new(const char *const *targets, size_t n,
                               const etcd3_channel_options *opts,
                               char *err, size_t errlen);
void etcd3_engine_close(etcd3_engine *e);
void etcd3_engine_release(etcd3_engine *e);  /* drops one reference */
void etcd3_engine_completed(etcd3_engine *e); /* under e->mu */
void etcd3_engine_collected(etcd3_engine *e); /* under e->mu */
int etcd3_engine_forked(const etcd3_engine *e);
void etcd3_engine_cancel_all(etcd3_engine *e); /* call.c */
double etcd3_now(void);
gpr_timespec etcd3_deadline(double seconds);

void etcd3_engine_unref_locked(etcd3_engine *e);  /* e->mu held, never last */
void etcd3_engine_wake(etcd3_engine *e);          /* e->mu held */
void etcd3_signal(etcd3_engine *e, int *signaled);   /* e->mu held */
void etcd3_unsignal(etcd3_engine *e, int *signaled); /* e->mu held */
void etcd3_wait_until(etcd3_engine *e, double seconds,
                      int (*ready)(void *arg, double now, double *until), void *arg);
/* Records behind lease/watch/stream userdata start with their engine. */
void *etcd3_check_record(lua_State *L, const char *mt, const char *what);
void *etcd3_take_record(lua_State *L, const char *mt);
void *etcd3_new_record(lua_State *L, const char *mt, size_t size, etcd3_engine *e);
void etcd3_register_type(lua_State *L, const char *mt, const luaL_Reg *methods, lua_CFunction gc);
size_t etcd3_engine_next_channel(etcd3_engine *e, size_t after);
int etcd3_engine_add_channel(etcd3_engine *e, const char *target);
void etcd3_cond_wait(etcd3_engine *e, double seconds); /* e->mu held */

/* stream.c: a bidirectional stream; every function with e->mu held */
typedef struct etcd3_stream etcd3_stream;
typedef struct etcd3_stream_ops {
  const ProtobufCMessageDescriptor *response;
  /* engine thread, e->mu held; takes ownership of msg */
  void (*on_message)(void *owner, etcd3_stream *s, ProtobufCMessage *msg);
  /* engine thread, e->mu held; the stream is gone for the owner after it */
  void (*on_closed)(void *owner, etcd3_stream *s, grpc_status_code status,
                    const char *details);
} etcd3_stream_ops;
etcd3_stream *etcd3_stream_open(etcd3_engine *e, size_t channel, const char *path,
                                int hasleader, const etcd3_stream_ops *ops,
                                void *owner);
int etcd3_stream_send(etcd3_stream *s, const ProtobufCMessage *msg);
void etcd3_stream_close(etcd3_stream *s);
size_t etcd3_stream_channel(const etcd3_stream *s);

/* lease.c */
double etcd3_lease_tick(etcd3_engine *e, double now);
void etcd3_lease_shutdown(etcd3_engine *e);
void etcd3_lease_free_hub(etcd3_engine *e);
int etcd3_lease_new(lua_State *L, etcd3_engine *e, int64_t id, int64_t ttl);
int etcd3_lease_open(lua_State *L);

/* watch.c */
double etcd3_watch_tick(etcd3_engine *e, double now);
void etcd3_watch_shutdown(etcd3_engine *e);
void etcd3_watch_free_hub(etcd3_engine *e);
void etcd3_watch_restart(etcd3_engine *e);  /* mu held: re-open with a new token */
int etcd3_watch_new(lua_State *L, etcd3_engine *e, int spec);
int etcd3_watch_open(lua_State *L);

/* auth.c */
size_t etcd3_auth_metadata(etcd3_engine *e, grpc_metadata *md, size_t room); /* mu held */
void etcd3_auth_refresh(etcd3_engine *e);     /* mu held: re-authenticate in the background */
void etcd3_auth_free(etcd3_engine *e);
int etcd3_auth_set_token(lua_State *L, etcd3_engine *e);
int etcd3_auth_set_credentials(lua_State *L, etcd3_engine *e);
int etcd3_auth_start(lua_State *L, etcd3_engine *e, size_t channel, double timeout);

/* server_stream.c */
int etcd3_snapshot_start(lua_State *L, etcd3_engine *e, size_t channel);
int etcd3_server_stream_open(lua_State *L);

/* call.c */
int etcd3_call_start(lua_State *L, etcd3_engine *e, size_t channel,
                     const ProtobufCMethodDescriptor *method,
                     const char *path, const char *rpc_name, int req_idx,
                     double timeout, int sync);
int etcd3_call_open(lua_State *L);
void etcd3_unary_ops(grpc_op ops[6], grpc_metadata *md, size_t n_md, grpc_byte_buffer *send,
                     grpc_metadata_array *initial_md, grpc_byte_buffer **recv,
                     grpc_metadata_array *trailing_md, grpc_status_code *status,
                     grpc_slice *details);

/* client.c */
int etcd3_client_open(lua_State *L);

/* codec.c */
void *etcd3_arena_alloc(lua_State *L, int arena_idx, size_t size);
int etcd3_arena_new(lua_State *L);
void etcd3_arena_free(lua_State *L, int arena_idx);
ProtobufCMessage *etcd3_encode(lua_State *L, int idx,
                               const ProtobufCMessageDescriptor *d,
                               int arena_idx);
int etcd3_decode(lua_State *L, const ProtobufCMessageDescriptor *d,
                 grpc_byte_buffer *buf);
void etcd3_push_message(lua_State *L, const ProtobufCMessage *msg);
int etcd3_codec_open(lua_State *L);
const ProtobufCMethodDescriptor *etcd3_find_method(const char *rpc_name,
                                                   const char **path);
const char *etcd3_status_name(int status);

#endif
