/*
 * call.c - one unary RPC in flight: the etcd3.Call userdata.
 *
 * A call is started from Lua (client:call), runs as one batch of six ops on
 * the engine's queue, and is completed by the engine thread, which keeps the
 * response bytes and the status for Lua to decode later. The call struct has
 * two owners, counted in `refs`: the Lua userdata and the engine while the
 * batch is under way. Whoever drops the last reference frees it, so a call
 * collected while in flight is cancelled and freed on completion, and a
 * completion that arrives after the Lua side is gone frees nothing twice.
 */
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <grpc/byte_buffer.h>
#include <grpc/slice.h>

#include "etcd3.h"

enum { CALL_RUNNING, CALL_DONE };

typedef struct etcd3_call {
  etcd3_tag tag;                  /* first: the queue hands it back */
  etcd3_engine *engine;
  int refs;                       /* under engine->mu */
  int state;                      /* under engine->mu */
  int collected;                  /* Lua has seen the completion */
  const ProtobufCMethodDescriptor *method;
  const char *rpc_name;           /* static, "KV.Range" form */
  grpc_call *call;
  /* A blocking ("sync") call completes on the engine's pluck queue, which
   * the calling thread plucks in call:wait(): that thread drives the I/O
   * itself and no thread hand-off happens (the benchmarks decided). NULL
   * for calls the engine thread completes. */
  grpc_completion_queue *sync_cq;
  grpc_metadata_array initial_md, trailing_md;
  grpc_byte_buffer *send, *recv;
  grpc_status_code status;
  grpc_slice details;
  grpc_metadata md[1];            /* the auth token, when there is one */
  size_t n_md;
  struct etcd3_call *prev, *next; /* engine->inflight, while running */
} etcd3_call;

typedef struct call_ud {
  etcd3_call *c;
} call_ud;

/* Frees what the call owns; refs reached 0. */
static void call_free(etcd3_call *c) {
  for (size_t i = 0; i < c->n_md; i++) grpc_slice_unref(c->md[i].value);
  if (c->send) grpc_byte_buffer_destroy(c->send);
  if (c->recv) grpc_byte_buffer_destroy(c->recv);
  grpc_slice_unref(c->details);
  free(c);
}

/* Engine thread: the batch finished (ok is 1 even when the RPC failed; the
 * status says how it went). */
static void call_done(etcd3_tag *tag, int ok) {
  etcd3_call *c = (etcd3_call *)tag;
  etcd3_engine *e = c->engine;
  int last;
  if (!ok && c->status == GRPC_STATUS_OK) c->status = GRPC_STATUS_UNKNOWN;
  grpc_metadata_array_destroy(&c->initial_md);
  grpc_metadata_array_destroy(&c->trailing_md);
  grpc_call_unref(c->call);
  pthread_mutex_lock(&e->mu);
  c->call = NULL;
  c->state = CALL_DONE;
  if (!c->sync_cq) e->async_inflight--;
  if (c->prev) c->prev->next = c->next;
  else e->inflight = c->next;
  if (c->next) c->next->prev = c->prev;
  c->prev = c->next = NULL;
  last = --c->refs == 0;
  if (!last && !c->sync_cq) etcd3_engine_completed(e);
  pthread_mutex_unlock(&e->mu);
  if (last) {
    call_free(c);
    etcd3_engine_release(e);
  }
}

/* Cancels every call in flight (client close); their completions follow. */
void etcd3_engine_cancel_all(etcd3_engine *e) {
  pthread_mutex_lock(&e->mu);
  for (etcd3_call *c = e->inflight; c; c = c->next)
    grpc_call_cancel_with_status(c->call, GRPC_STATUS_CANCELLED,
                                 "client closed", NULL);
  pthread_mutex_unlock(&e->mu);
}

static call_ud *check_call(lua_State *L) {
  call_ud *u = (call_ud *)luaL_checkudata(L, 1, ETCD3_CALL_MT);
  if (!u->c) luaL_error(L, "etcd3: call object already released");
  if (etcd3_engine_forked(u->c->engine))
    luaL_error(L, "etcd3: client used in a forked child (create a new client after fork)");
  return u;
}

/* Marks the completion seen by Lua (drains pollfd when it was the last);
 * engine->mu is held. Returns whether the call is done. */
static int collect(etcd3_call *c) {
  if (c->state != CALL_DONE) return 0;
  if (!c->collected) {
    c->collected = 1;
    if (!c->sync_cq) etcd3_engine_collected(c->engine);
  }
  return 1;
}

/* Plucks the sync call's completion, waiting at most `seconds`; runs its
 * done function in this thread. Returns whether it completed. Only the
 * thread that owns the Lua state calls this. */
static int pluck(etcd3_call *c, double seconds) {
  grpc_event ev = grpc_completion_queue_pluck(c->sync_cq, &c->tag, etcd3_deadline(seconds), NULL);
  if (ev.type != GRPC_OP_COMPLETE) return 0;
  call_done(&c->tag, ev.success);
  return 1;
}

/* call:ready() -> boolean, never waits. */
static int l_ready(lua_State *L) {
  etcd3_call *c = check_call(L)->c;
  int done;
  /* (a sync call progresses only in call:wait, which its waiter calls next:
   * no poll here, it would cost a syscall per call) */
  pthread_mutex_lock(&c->engine->mu);
  done = collect(c);
  pthread_mutex_unlock(&c->engine->mu);
  lua_pushboolean(L, done);
  return 1;
}

/* call:wait(seconds) -> boolean: blocks the calling thread until the call
 * completes or the time passes. The Lua layer keeps slices short. */
static int l_wait(lua_State *L) {
  etcd3_call *c = check_call(L)->c;
  double seconds = luaL_checknumber(L, 2);
  etcd3_engine *e = c->engine;
  double until = etcd3_now() + seconds;
  int done;
  if (c->sync_cq && c->state == CALL_RUNNING) pluck(c, seconds);
  pthread_mutex_lock(&e->mu);
  for (;;) {
    double now = etcd3_now();
    if (c->state == CALL_DONE || now >= until) break;
    etcd3_cond_wait(e, until - now);
  }
  done = collect(c);
  pthread_mutex_unlock(&e->mu);
  lua_pushboolean(L, done);
  return 1;
}

/* call:result() -> response table | nil, code, status, message
 * Only once the call is done (raises otherwise). */
static int l_result(lua_State *L) {
  etcd3_call *c = check_call(L)->c;
  int done;
  pthread_mutex_lock(&c->engine->mu);
  done = collect(c);
  pthread_mutex_unlock(&c->engine->mu);
  if (!done) return luaL_error(L, "etcd3: call:result() before the call completed");
  /* Done: the engine no longer touches the call; no lock needed below. */
  if (c->status == GRPC_STATUS_OK) {
    if (c->recv && etcd3_decode(L, c->method->output, c->recv)) return 1;
    lua_pushnil(L);
    lua_pushstring(L, "INTERNAL");
    lua_pushinteger(L, GRPC_STATUS_INTERNAL);
    lua_pushstring(L, "etcd3: response could not be decoded");
    return 4;
  }
  lua_pushnil(L);
  lua_pushstring(L, etcd3_status_name((int)c->status));
  lua_pushinteger(L, (int)c->status);
  lua_pushlstring(L, (const char *)GRPC_SLICE_START_PTR(c->details),
                  GRPC_SLICE_LENGTH(c->details));
  return 4;
}

/* Drops the Lua reference; cancels a call still running. */
static void call_release(call_ud *u) {
  etcd3_call *c = u->c;
  etcd3_engine *e;
  int last;
  if (!c) return;
  u->c = NULL;
  e = c->engine;
  if (etcd3_engine_forked(e)) return; /* inherited: leak, touch nothing */
  pthread_mutex_lock(&e->mu);
  if (c->state == CALL_RUNNING)
    grpc_call_cancel_with_status(c->call, GRPC_STATUS_CANCELLED,
                                 "call abandoned", NULL);
  else
    collect(c);
  pthread_mutex_unlock(&e->mu);
  /* nobody else plucks a sync call: its (cancelled) completion is taken
   * here, at once */
  if (c->sync_cq && c->state == CALL_RUNNING) pluck(c, 1e9);
  pthread_mutex_lock(&e->mu);
  last = --c->refs == 0;
  pthread_mutex_unlock(&e->mu);
  if (last) {
    call_free(c);
    etcd3_engine_release(e);
  }
}

static int l_gc(lua_State *L) {
  call_release((call_ud *)luaL_checkudata(L, 1, ETCD3_CALL_MT));
  return 0;
}

/* call:cancel(): the call completes with CANCELLED if still running. */
static int l_cancel(lua_State *L) {
  etcd3_call *c = check_call(L)->c;
  pthread_mutex_lock(&c->engine->mu);
  if (c->state == CALL_RUNNING)
    grpc_call_cancel_with_status(c->call, GRPC_STATUS_CANCELLED,
                                 "cancelled", NULL);
  pthread_mutex_unlock(&c->engine->mu);
  return 0;
}

/* The one batch of a unary call: send metadata, message and close, then
 * receive metadata, message and status (DESIGN.md: the batch reports
 * success even when the RPC failed; the status says how it went). */
void etcd3_unary_ops(grpc_op ops[6], grpc_metadata *md, size_t n_md, grpc_byte_buffer *send,
                     grpc_metadata_array *initial_md, grpc_byte_buffer **recv,
                     grpc_metadata_array *trailing_md, grpc_status_code *status,
                     grpc_slice *details) {
  memset(ops, 0, 6 * sizeof *ops);
  ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
  ops[0].data.send_initial_metadata.count = n_md;
  ops[0].data.send_initial_metadata.metadata = md;
  ops[1].op = GRPC_OP_SEND_MESSAGE;
  ops[1].data.send_message.send_message = send;
  ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
  ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
  ops[3].data.recv_initial_metadata.recv_initial_metadata = initial_md;
  ops[4].op = GRPC_OP_RECV_MESSAGE;
  ops[4].data.recv_message.recv_message = recv;
  ops[5].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
  ops[5].data.recv_status_on_client.trailing_metadata = trailing_md;
  ops[5].data.recv_status_on_client.status = status;
  ops[5].data.recv_status_on_client.status_details = details;
}

/* Encodes the request table at req_idx and starts the call on the given
 * channel; pushes the call userdata. Raises on a bad request or a closed
 * client; nothing is left behind when it does. */
int etcd3_call_start(lua_State *L, etcd3_engine *e, size_t channel,
                     const ProtobufCMethodDescriptor *method,
                     const char *path, const char *rpc_name, int req_idx,
                     double timeout, int sync) {
  grpc_op ops[6];
  ProtobufCMessage *msg;
  size_t len;
  grpc_slice payload, method_slice;
  call_ud *u;
  etcd3_call *c;
  grpc_call_error rc;
  int arena_idx;

  req_idx = lua_absindex(L, req_idx);
  arena_idx = etcd3_arena_new(L);
  msg = etcd3_encode(L, req_idx, method->input, arena_idx);
  len = protobuf_c_message_get_packed_size(msg);
  u = (call_ud *)lua_newuserdata(L, sizeof *u);
  u->c = NULL;
  luaL_setmetatable(L, ETCD3_CALL_MT);
  /* From here on nothing raises until the userdata owns the call. */
  c = (etcd3_call *)calloc(1, sizeof *c);
  if (!c) return luaL_error(L, "etcd3: out of memory");
  c->tag.done = call_done;
  c->engine = e;
  c->method = method;
  c->rpc_name = rpc_name;
  c->details = grpc_empty_slice();
  payload = grpc_slice_malloc(len);
  protobuf_c_message_pack(msg, GRPC_SLICE_START_PTR(payload));
  c->send = grpc_raw_byte_buffer_create(&payload, 1);
  grpc_slice_unref(payload);
  grpc_metadata_array_init(&c->initial_md);
  grpc_metadata_array_init(&c->trailing_md);

  pthread_mutex_lock(&e->mu);
  if (e->closed) {
    pthread_mutex_unlock(&e->mu);
    grpc_metadata_array_destroy(&c->initial_md);
    grpc_metadata_array_destroy(&c->trailing_md);
    call_free(c);
    return luaL_error(L, "etcd3: client is closed");
  }
  e->refs++;
  if (sync) {
    if (!e->sync_cq) e->sync_cq = grpc_completion_queue_create_for_pluck(NULL);
    c->sync_cq = e->sync_cq;
  } else {
    e->async_inflight++;
    etcd3_engine_wake(e);
  }
  c->refs = 2; /* Lua + engine */
  c->state = CALL_RUNNING;
  u->c = c;
  method_slice = grpc_slice_from_static_string(path);
  c->call = grpc_channel_create_call(e->channels[channel].channel, NULL,
                                     GRPC_PROPAGATE_DEFAULTS,
                                     c->sync_cq ? c->sync_cq : e->cq,
                                     method_slice, NULL,
                                     etcd3_deadline(timeout), NULL);
  /* Authenticate itself never carries a token: etcd refuses one that
   * expired even there. */
  c->n_md = strcmp(path, "/etcdserverpb.Auth/Authenticate") == 0 ? 0 : etcd3_auth_metadata(e, c->md, 1);
  etcd3_unary_ops(ops, c->md, c->n_md, c->send, &c->initial_md, &c->recv, &c->trailing_md,
                  &c->status, &c->details);
  c->next = e->inflight;
  if (e->inflight) e->inflight->prev = c;
  e->inflight = c;
  rc = grpc_call_start_batch(c->call, ops, 6, &c->tag, NULL);
  if (rc != GRPC_CALL_OK) {
    /* Never started: complete it here as an internal failure. */
    c->status = GRPC_STATUS_INTERNAL;
    pthread_mutex_unlock(&e->mu);
    call_done(&c->tag, 0);
  } else {
    pthread_mutex_unlock(&e->mu);
  }
  etcd3_arena_free(L, arena_idx);
  lua_remove(L, arena_idx);
  return 1;
}

static int l_tostring(lua_State *L) {
  call_ud *u = (call_ud *)luaL_checkudata(L, 1, ETCD3_CALL_MT);
  lua_pushfstring(L, "etcd3.Call (%s)", u->c ? u->c->rpc_name : "released");
  return 1;
}

int etcd3_call_open(lua_State *L) {
  static const luaL_Reg methods[] = {
    {"ready", l_ready}, {"wait", l_wait}, {"result", l_result},
    {"cancel", l_cancel}, {NULL, NULL},
  };
  etcd3_register_type(L, ETCD3_CALL_MT, methods, l_gc);
  luaL_getmetatable(L, ETCD3_CALL_MT);
  lua_pushcfunction(L, l_tostring);
  lua_setfield(L, -2, "__tostring");
  lua_pop(L, 1);
  return 0;
}
