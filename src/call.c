/*
 * call.c - unary RPCs in flight: the etcd3.Call userdata and the engine's
 * background calls.
 *
 * A call runs as one batch of six ops (call_ops) and is completed by the
 * thread that takes its event: the engine thread, or for a blocking call
 * the Lua thread that plucks the engine's pluck queue (that thread then
 * drives the I/O itself and no hand-off happens: the benchmarks decided).
 * A call struct has up to two owners, counted in `refs`: the Lua userdata,
 * and the engine while the batch is under way. Whoever drops the last
 * reference frees it, so a call collected while in flight is cancelled and
 * freed on completion, and a completion that arrives after the Lua side is
 * gone frees nothing twice. A background call has the engine as its only
 * owner and hands its result to a function instead of Lua.
 *
 * The calls in flight are the "calls" service of their engine: closing the
 * engine cancels them.
 */
#include <stdlib.h>
#include <string.h>

#include <grpc/byte_buffer.h>
#include <grpc/slice.h>
#include <grpc/support/alloc.h>

#include "auxiliar.h"
#include "call.h"
#include "codec.h"

enum { CALL_RUNNING, CALL_DONE };

typedef struct call_list {
  struct etcd3_call *head;        /* calls whose batch is under way */
} call_list;

typedef struct etcd3_call {
  etcd3_tag tag;                  /* first: the queue hands it back */
  etcd3_engine *engine;
  call_list *list;                /* the engine's calls service */
  int refs;                       /* under engine->mu */
  int state;                      /* under engine->mu */
  int news;                       /* completion posted, not yet seen by Lua */
  const ProtobufCMethodDescriptor *method; /* NULL for a background call */
  const char *rpc_name;           /* static, "KV.Range" form */
  grpc_call *call;                /* NULL once done */
  grpc_completion_queue *pluck_cq; /* a blocking call's queue, else NULL */
  etcd3_call_done background;     /* a background call's receiver */
  void *background_arg;
  grpc_metadata_array initial_md, trailing_md;
  grpc_byte_buffer *send, *recv;
  grpc_status_code status;
  grpc_slice details;
  grpc_metadata md[1];            /* the auth token, when there is one */
  size_t n_md;
  struct etcd3_call *prev, *next; /* list, while running */
} etcd3_call;

typedef struct call_ud {
  etcd3_call *c;
} call_ud;

/* Engine close: every call in flight is cancelled; completions follow. */
ETCD3_LOCKED static void calls_shutdown(etcd3_engine *e, void *state) {
  (void)e;
  for (etcd3_call *c = ((call_list *)state)->head; c; c = c->next)
    grpc_call_cancel_with_status(c->call, GRPC_STATUS_CANCELLED, "client closed", NULL);
}

static const etcd3_service_ops calls_service = {
  .name = "calls", .shutdown = calls_shutdown, .free = free,
};

/* A new call for `send` (owned by it from now on); NULL on out of memory. */
static etcd3_call *call_new(etcd3_engine *e, grpc_byte_buffer *send) {
  etcd3_call *c = (etcd3_call *)calloc(1, sizeof *c);
  if (!c) {
    grpc_byte_buffer_destroy(send);
    return NULL;
  }
  c->tag.done = NULL;
  c->engine = e;
  c->send = send;
  c->details = grpc_empty_slice();
  grpc_metadata_array_init(&c->initial_md);
  grpc_metadata_array_init(&c->trailing_md);
  return c;
}

/* Frees what the call owns; refs reached 0. */
static void call_free(etcd3_call *c) {
  for (size_t i = 0; i < c->n_md; i++) grpc_slice_unref(c->md[i].value);
  grpc_metadata_array_destroy(&c->initial_md);
  grpc_metadata_array_destroy(&c->trailing_md);
  if (c->send) grpc_byte_buffer_destroy(c->send);
  if (c->recv) grpc_byte_buffer_destroy(c->recv);
  grpc_slice_unref(c->details);
  free(c);
}

/* The batch is over: the call leaves the list and the engine drops its
 * reference. Returns whether that was the last one (the caller frees). */
ETCD3_LOCKED static int call_finished(etcd3_call *c) {
  etcd3_engine *e = c->engine;
  c->state = CALL_DONE;
  if (!c->pluck_cq) e->polled--;
  if (c->prev) c->prev->next = c->next;
  else c->list->head = c->next;
  if (c->next) c->next->prev = c->prev;
  c->prev = c->next = NULL;
  if (--c->refs == 0) return 1;
  if (!c->pluck_cq) etcd3_news_post(e, &c->news);
  return 0;
}

/* The thread that took the event: the batch finished (ok is 1 even when
 * the RPC failed; the status says how it went). */
static void call_done(etcd3_tag *tag, int ok) {
  etcd3_call *c = (etcd3_call *)tag;
  etcd3_engine *e = c->engine;
  grpc_call *call;
  int last;
  if (!ok && c->status == GRPC_STATUS_OK) c->status = GRPC_STATUS_UNKNOWN;
  if (c->background) {
    char *details = c->status == GRPC_STATUS_OK ? NULL : grpc_slice_to_c_string(c->details);
    c->background(e, c->background_arg, c->status, details,
                  c->status == GRPC_STATUS_OK ? c->recv : NULL);
    gpr_free(details);
  }
  pthread_mutex_lock(&e->mu);
  call = c->call; /* unreferenced below, once nobody can cancel it */
  c->call = NULL;
  last = call_finished(c);
  pthread_mutex_unlock(&e->mu);
  grpc_call_unref(call);
  if (last) {
    call_free(c);
    etcd3_engine_release(e);
  }
}

/* The one batch of a unary call: send metadata, message and close, then
 * receive metadata, message and status. The batch reports success even
 * when the RPC failed: the status says how it went (docs/grpc-facts.md,
 * "Unary calls"). */
static void call_ops(etcd3_call *c, grpc_op ops[6]) {
  memset(ops, 0, 6 * sizeof *ops);
  ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
  ops[0].data.send_initial_metadata.count = c->n_md;
  ops[0].data.send_initial_metadata.metadata = c->md;
  ops[1].op = GRPC_OP_SEND_MESSAGE;
  ops[1].data.send_message.send_message = c->send;
  ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
  ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
  ops[3].data.recv_initial_metadata.recv_initial_metadata = &c->initial_md;
  ops[4].op = GRPC_OP_RECV_MESSAGE;
  ops[4].data.recv_message.recv_message = &c->recv;
  ops[5].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
  ops[5].data.recv_status_on_client.trailing_metadata = &c->trailing_md;
  ops[5].data.recv_status_on_client.status = &c->status;
  ops[5].data.recv_status_on_client.status_details = &c->details;
}

/* Starts the call's batch with `refs` owners (the engine's included).
 * Returns 0, having started nothing, when the engine is closed (or out of
 * memory); the caller still owns c. A batch gRPC refuses completes at once
 * as INTERNAL: returns -1, and the engine's reference is already dropped
 * (the call is freed if that was the last). */
ETCD3_LOCKED static int call_begin(etcd3_call *c, size_t channel, const char *path,
                                   double timeout, int refs) {
  etcd3_engine *e = c->engine;
  grpc_op ops[6];
  call_list *list = (call_list *)etcd3_engine_service_get(e, &calls_service, sizeof *list);
  if (!list || e->closed) return 0;
  c->tag.done = call_done;
  c->list = list;
  c->refs = refs;
  c->state = CALL_RUNNING;
  etcd3_engine_ref_locked(e);
  if (!c->pluck_cq) {
    e->polled++;
    etcd3_engine_wake(e);
  }
  c->call = grpc_channel_create_call(e->channels[channel].channel, NULL, GRPC_PROPAGATE_DEFAULTS,
                                     c->pluck_cq ? c->pluck_cq : e->cq,
                                     grpc_slice_from_static_string(path), NULL,
                                     etcd3_deadline(timeout), NULL);
  /* Authenticate itself never carries a token: etcd refuses one that
   * expired even there. */
  c->n_md = strcmp(path, "/etcdserverpb.Auth/Authenticate") == 0 ? 0 : etcd3_engine_metadata(e, c->md, 1);
  c->next = list->head;
  if (list->head) list->head->prev = c;
  list->head = c;
  call_ops(c, ops);
  if (grpc_call_start_batch(c->call, ops, 6, &c->tag, NULL) == GRPC_CALL_OK) return 1;
  c->status = GRPC_STATUS_INTERNAL;
  grpc_call_unref(c->call);
  c->call = NULL;
  if (call_finished(c)) {
    call_free(c);
    etcd3_engine_unref_locked(e); /* the client holds another */
  }
  return -1;
}

ETCD3_LOCKED int etcd3_call_background(etcd3_engine *e, size_t channel, const char *path,
                                       grpc_byte_buffer *request, double timeout,
                                       etcd3_call_done done, void *arg) {
  etcd3_call *c = call_new(e, request);
  int rc;
  if (!c) return 0;
  c->rpc_name = path + 1;
  c->background = done;
  c->background_arg = arg;
  rc = call_begin(c, channel, path, timeout, 1);
  if (rc == 0) call_free(c);
  return rc > 0;
}

/* ---- Lua: the etcd3.Call userdata --------------------------------------- */

static call_ud *check_call(lua_State *L) {
  call_ud *u = (call_ud *)luaL_checkudata(L, 1, ETCD3_CALL_MT);
  if (!u->c) luaL_error(L, "etcd3: call object already released");
  if (etcd3_engine_forked(u->c->engine))
    luaL_error(L, "etcd3: client used in a forked child (create a new client after fork)");
  return u;
}

/* Whether the call is done; Lua has then seen its completion (the pollfd
 * is drained when it was the last news). */
ETCD3_LOCKED static int collect(etcd3_call *c) {
  if (c->state != CALL_DONE) return 0;
  etcd3_news_seen(c->engine, &c->news);
  return 1;
}

/* Plucks a blocking call's completion, waiting at most `seconds`; runs its
 * done function in this thread. Only the thread that owns the Lua state
 * calls this. */
static void pluck(etcd3_call *c, double seconds) {
  grpc_event ev = grpc_completion_queue_pluck(c->pluck_cq, &c->tag, etcd3_deadline(seconds), NULL);
  if (ev.type == GRPC_OP_COMPLETE) call_done(&c->tag, ev.success);
}

/* call:ready() -> boolean, never waits. */
static int call_ready(lua_State *L) {
  etcd3_call *c = check_call(L)->c;
  int done;
  /* (a blocking call progresses only in call:wait, which its waiter calls
   * next: no poll here, it would cost a syscall per call) */
  pthread_mutex_lock(&c->engine->mu);
  done = collect(c);
  pthread_mutex_unlock(&c->engine->mu);
  lua_pushboolean(L, done);
  return 1;
}

/* call:news_key() -> lightuserdata: names this call in the notifier's news
 * (notifier.c), so a waiter is woken without asking every other call. */
static int call_news_key(lua_State *L) {
  lua_pushlightuserdata(L, &check_call(L)->c->news);
  return 1;
}

/* call:wait(seconds) -> boolean: blocks the calling thread until the call
 * completes or the time passes. The Lua layer keeps slices short. */
static int call_wait(lua_State *L) {
  etcd3_call *c = check_call(L)->c;
  double seconds = luaL_checknumber(L, 2);
  etcd3_engine *e = c->engine;
  double until = etcd3_now() + seconds;
  int done;
  if (c->pluck_cq && c->state == CALL_RUNNING) pluck(c, seconds);
  pthread_mutex_lock(&e->mu);
  for (;;) {
    double now = etcd3_now();
    if (c->state == CALL_DONE || now >= until) break;
    etcd3_engine_cond_wait(e, until - now);
  }
  done = collect(c);
  pthread_mutex_unlock(&e->mu);
  lua_pushboolean(L, done);
  return 1;
}

/* call:result() -> response table | nil, code, status, message
 * Only once the call is done (raises otherwise). */
static int call_result(lua_State *L) {
  etcd3_call *c = check_call(L)->c;
  int done;
  pthread_mutex_lock(&c->engine->mu);
  done = collect(c);
  pthread_mutex_unlock(&c->engine->mu);
  if (!done) return luaL_error(L, "etcd3: call:result() before the call completed");
  /* Done: the engine no longer touches the call; no lock needed below. */
  if (c->status == GRPC_STATUS_OK) {
    int64_t revision;
    if (etcd3_decode(L, c->method->output, c->recv, &revision)) {
      etcd3_engine_saw_revision(c->engine, revision);
      return 1;
    }
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
    grpc_call_cancel_with_status(c->call, GRPC_STATUS_CANCELLED, "call abandoned", NULL);
  else
    collect(c);
  pthread_mutex_unlock(&e->mu);
  /* nobody else plucks a blocking call: its (cancelled) completion is
   * taken here, at once */
  if (c->pluck_cq && c->state == CALL_RUNNING) pluck(c, 1e9);
  pthread_mutex_lock(&e->mu);
  last = --c->refs == 0;
  pthread_mutex_unlock(&e->mu);
  if (last) {
    call_free(c);
    etcd3_engine_release(e);
  }
}

static int call_gc(lua_State *L) {
  call_release((call_ud *)luaL_checkudata(L, 1, ETCD3_CALL_MT));
  return 0;
}

/* call:cancel(): the call completes with CANCELLED if still running. */
static int call_cancel(lua_State *L) {
  etcd3_call *c = check_call(L)->c;
  pthread_mutex_lock(&c->engine->mu);
  if (c->state == CALL_RUNNING)
    grpc_call_cancel_with_status(c->call, GRPC_STATUS_CANCELLED, "cancelled", NULL);
  pthread_mutex_unlock(&c->engine->mu);
  return 0;
}

int etcd3_call_start(lua_State *L, etcd3_engine *e, size_t channel,
                     const ProtobufCMethodDescriptor *method, const char *path,
                     int req_idx, double timeout, int pluck_it) {
  ProtobufCMessage *msg;
  call_ud *u;
  etcd3_call *c;
  int arena_idx, rc;

  req_idx = lua_absindex(L, req_idx);
  arena_idx = etcd3_arena_new(L);
  msg = etcd3_encode(L, req_idx, method->input, arena_idx);
  u = (call_ud *)lua_newuserdata(L, sizeof *u); /* stack: arena, call */
  u->c = NULL;
  luaL_setmetatable(L, ETCD3_CALL_MT);
  /* From here on nothing raises until the userdata owns the call. */
  c = call_new(e, etcd3_pack(msg));
  if (!c) return luaL_error(L, "etcd3: out of memory");
  c->method = method;
  c->rpc_name = path + 1; /* static: the path's tail */
  pthread_mutex_lock(&e->mu);
  if (pluck_it) c->pluck_cq = etcd3_engine_pluck_queue(e);
  rc = call_begin(c, channel, path, timeout, 2); /* Lua + engine */
  if (rc != 0) u->c = c;
  pthread_mutex_unlock(&e->mu);
  if (rc == 0) {
    call_free(c);
    return luaL_error(L, "etcd3: client is closed");
  }
  etcd3_arena_free(L, arena_idx);
  lua_remove(L, arena_idx);
  return 1;
}

static int call_tostring(lua_State *L) {
  call_ud *u = (call_ud *)luaL_checkudata(L, 1, ETCD3_CALL_MT);
  lua_pushfstring(L, "etcd3.Call (%s)", u->c ? u->c->rpc_name : "released");
  return 1;
}

int etcd3_call_open(lua_State *L) {
  static const luaL_Reg methods[] = {
    {"ready", call_ready}, {"wait", call_wait}, {"result", call_result},
    {"cancel", call_cancel}, {"news_key", call_news_key}, {NULL, NULL},
  };
  etcd3_register_type(L, ETCD3_CALL_MT, methods, call_gc);
  luaL_getmetatable(L, ETCD3_CALL_MT);
  lua_pushcfunction(L, call_tostring);
  lua_setfield(L, -2, "__tostring");
  lua_pop(L, 1);
  return 0;
}
