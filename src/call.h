/*
 * call.h - unary RPCs: one struct per call in flight, one cleanup path.
 * A call is owned by a Lua userdata (etcd3.Call, started by client:call)
 * or by the engine itself (a background call, e.g. auth's Authenticate).
 */
#ifndef ETCD3_CALL_H
#define ETCD3_CALL_H

#include <protobuf-c/protobuf-c.h>

#include "compat.h"
#include "engine.h"

/* Encodes the request table at req_idx and starts the call on the given
 * channel; pushes the call userdata. `pluck`: the calling thread will wait
 * for it itself (call:wait plucks the engine's pluck queue). Raises on a
 * bad request or a closed client; nothing is left behind when it does. */
int etcd3_call_start(lua_State *L, etcd3_engine *e, size_t channel,
                     const ProtobufCMethodDescriptor *method, const char *path,
                     int req_idx, double timeout, int pluck);

/* A background call: runs `done` (if not NULL) on the engine thread, mutex
 * not held, with the status, gRPC's or etcd's message (NULL when OK; valid
 * during the callback only) and the response (NULL unless OK), then frees
 * itself.
 * Takes ownership of `request`. Returns 0 (and frees request) when the
 * call could not start; the caller then retries later or gives up. */
typedef void (*etcd3_call_done)(etcd3_engine *e, void *arg, grpc_status_code status,
                                const char *details, grpc_byte_buffer *response);
ETCD3_LOCKED int etcd3_call_background(etcd3_engine *e, size_t channel, const char *path,
                                       grpc_byte_buffer *request, double timeout,
                                       etcd3_call_done done, void *arg);

int etcd3_call_open(lua_State *L);

#endif
