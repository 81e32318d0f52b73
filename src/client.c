/*
 * client.c - the etcd3.Client userdata of etcd3.core.
 *
 * This is the low-level client the pure-Lua layer (lua/etcd3/client.lua)
 * drives: it owns an engine, starts calls on a chosen endpoint, reports
 * connectivity, and exposes the pollfd. Policy (which endpoint, retries,
 * how to wait, error objects) lives in Lua.
 *
 * The userdata holds a pointer and is emptied by the one idempotent
 * teardown that close, __close and __gc share. In a forked child the
 * inherited engine is leaked on purpose: once grpc_init has run, a child
 * hangs when it destroys an inherited channel (docs/grpc-facts.md, "Fork").
 */
#include <limits.h>
#include <poll.h>
#include <string.h>

#include "auth.h"
#include "auxiliar.h"
#include "call.h"
#include "client.h"
#include "codec.h"
#include "lease.h"
#include "notifier.h"
#include "policy.h"
#include "registration.h"
#include "server_stream.h"
#include "watcher.h"

typedef struct client_ud {
  etcd3_engine *engine;
} client_ud;


/* The userdata at arg 1 (raises on a wrong type). */
static client_ud *to_client(lua_State *L) {
  return (client_ud *)luaL_checkudata(L, 1, ETCD3_CLIENT_MT);
}

/* An open client usable from this process, or a clear error. */
static etcd3_engine *check_open(lua_State *L) {
  client_ud *u = to_client(L);
  if (!u->engine) luaL_error(L, "etcd3: client is closed");
  if (etcd3_engine_forked(u->engine))
    luaL_error(L, "etcd3: client used in a forked child (create a new client after fork)");
  return u->engine;
}

static size_t check_channel(lua_State *L, etcd3_engine *e, int idx) {
  lua_Integer i = luaL_checkinteger(L, idx);
  if (i < 1 || (size_t)i > e->n_channels)
    luaL_argerror(L, idx, "endpoint index out of range");
  return (size_t)(i - 1);
}

/* core.new(targets, keepalive_ms, max_recv_bytes [, tls]) -> client | nil, message
 * targets: array of "host:port" strings, as gRPC takes them; tls: nil, or a
 * table of PEM texts { ca, cert, key } and server_name (each optional). */
static int client_new(lua_State *L) {
  const char **targets;
  etcd3_channel_options opts;
  char err[256];
  size_t n;
  client_ud *u;
  luaL_checktype(L, 1, LUA_TTABLE);
  n = lua_rawlen(L, 1);
  if (n == 0) return luaL_argerror(L, 1, "at least one endpoint expected");
  if (n > INT_MAX / sizeof *targets) return luaL_argerror(L, 1, "too many endpoints");
  opts.keepalive_ms = (int)luaL_checkinteger(L, 2);
  opts.max_recv_bytes = (int)luaL_checkinteger(L, 3);
  opts.tls = lua_istable(L, 4);
  opts.ca = opts.cert = opts.key = opts.server_name = NULL;
  if (opts.tls) {
    /* the strings stay referenced by the table for the whole call */
    lua_getfield(L, 4, "ca");
    opts.ca = lua_tostring(L, -1);
    lua_getfield(L, 4, "cert");
    opts.cert = lua_tostring(L, -1);
    lua_getfield(L, 4, "key");
    opts.key = lua_tostring(L, -1);
    lua_getfield(L, 4, "server_name"); /* stack: ..., ca, cert, key, server_name */
    opts.server_name = lua_tostring(L, -1);
    lua_pop(L, 4);
  }
  /* collected with the rest of the stack */
  targets = (const char **)lua_newuserdata(L, n * sizeof *targets);
  for (size_t i = 0; i < n; i++) {
    lua_rawgeti(L, 1, (int)i + 1);
    targets[i] = lua_tostring(L, -1);
    if (!targets[i]) return luaL_argerror(L, 1, "endpoints must be strings");
    lua_pop(L, 1); /* still referenced by the table */
  }
  u = (client_ud *)lua_newuserdata(L, sizeof *u);
  u->engine = NULL;
  luaL_setmetatable(L, ETCD3_CLIENT_MT);
  u->engine = etcd3_engine_new(targets, n, &opts, err, sizeof err);
  if (!u->engine) {
    lua_pushnil(L);
    lua_pushstring(L, err);
    return 2;
  }
  return 1;
}

/* client:call(endpoint_index, "KV.Range", request, timeout [, sync]) -> call
 * sync: the calling thread will wait for it (call:wait plucks its own
 * queue) instead of an event loop. */
static int client_call(lua_State *L) {
  etcd3_engine *e = check_open(L);
  size_t channel = check_channel(L, e, 2);
  const char *rpc = luaL_checkstring(L, 3);
  const char *path;
  const ProtobufCMethodDescriptor *m = etcd3_find_method(rpc, &path);
  double timeout = luaL_checknumber(L, 5);
  if (!m) return luaL_argerror(L, 3, "unknown RPC");
  luaL_checktype(L, 4, LUA_TTABLE);
  /* rpc_name must be static for the call's lifetime: use the path's tail */
  return etcd3_call_start(L, e, channel, m, path, 4, timeout, lua_toboolean(L, 6));
}

/* client:lease(id, ttl, since) -> lease state (lease.c) */
static int client_lease(lua_State *L) {
  etcd3_engine *e = check_open(L);
  int64_t id = (int64_t)etcd3_check_id(L, 2);
  int64_t ttl = (int64_t)luaL_checknumber(L, 3);
  return etcd3_lease_new(L, e, id, ttl, luaL_checknumber(L, 4));
}

/* client:watch(spec) -> watch state (watcher.c) */
static int client_watch(lua_State *L) {
  etcd3_engine *e = check_open(L);
  luaL_checktype(L, 2, LUA_TTABLE);
  return etcd3_watcher_new(L, e, 2);
}

/* client:register(key, value, ttl) -> registration (registration.c) */
static int client_register(lua_State *L) {
  return etcd3_registration_new(L, check_open(L));
}

/* client:notifier() -> notifier (notifier.c): news as a byte on a unix
 * socket, for nginx's event loop */
static int client_notifier(lua_State *L) {
  return etcd3_notifier_new(L, check_open(L));
}

/* client:add_endpoint("host:port") -> index | nil */
static int client_add_endpoint(lua_State *L) {
  int index = etcd3_engine_add_channel(check_open(L), luaL_checkstring(L, 2));
  if (index < 0) lua_pushnil(L);
  else lua_pushinteger(L, index + 1);
  return 1;
}

/* client:snapshot(endpoint_index) -> server stream (server_stream.c) */
static int client_snapshot(lua_State *L) {
  etcd3_engine *e = check_open(L);
  return etcd3_snapshot_start(L, e, check_channel(L, e, 2));
}

/* client:token() -> the current auth token or nil */
static int client_token(lua_State *L) {
  return etcd3_auth_token(L, check_open(L));
}

static int client_set_token(lua_State *L) {
  return etcd3_auth_set_token(L, check_open(L));
}

static int client_set_credentials(lua_State *L) {
  return etcd3_auth_set_credentials(L, check_open(L));
}

/* client:reauth(since) -> "ok" | "pending" | nil, code, message (auth.c) */
static int client_reauth(lua_State *L) {
  return etcd3_auth_reauth(L, check_open(L));
}

/* ---- the request policy (policy.h), as Lua's unary calls ask it ------- */

/* client:pick() -> the endpoint index a request goes to */
static int client_pick(lua_State *L) {
  etcd3_engine *e = check_open(L);
  size_t channel;
  pthread_mutex_lock(&e->mu);
  channel = etcd3_policy_pick(e);
  pthread_mutex_unlock(&e->mu);
  lua_pushinteger(L, (lua_Integer)channel + 1);
  return 1;
}

/* client:failed(i): a request on endpoint i failed for the member's sake.
 * client:prefer(i): endpoint i is the current one from now on.
 * client:retire(i, removed): auto_sync found the member removed (or back). */
enum { STEP_FAILED, STEP_PREFER, STEP_RETIRE };

static int channel_step(lua_State *L, int step) {
  etcd3_engine *e = check_open(L);
  size_t channel = check_channel(L, e, 2);
  int retired = lua_toboolean(L, 3);
  pthread_mutex_lock(&e->mu);
  if (step == STEP_FAILED) etcd3_policy_failed(e, channel);
  else if (step == STEP_PREFER) etcd3_policy_prefer(e, channel);
  else etcd3_policy_retire(e, channel, retired);
  pthread_mutex_unlock(&e->mu);
  return 0;
}

static int client_failed(lua_State *L) { return channel_step(L, STEP_FAILED); }
static int client_prefer(lua_State *L) { return channel_step(L, STEP_PREFER); }
static int client_retire(lua_State *L) { return channel_step(L, STEP_RETIRE); }

/* client:verdict(code, message, idempotent, can_reauth) -> "next" | "reauth" | "move" | nil:
 * what to do after a unary call failed with the gRPC code named `code`
 * ("move": give up, and call failed() so the next request goes elsewhere). */
static int client_verdict(lua_State *L) {
  const char *code = luaL_checkstring(L, 2);
  const char *message = luaL_optstring(L, 3, NULL);
  int status = GRPC_STATUS_UNKNOWN;
  for (int i = 0; i <= GRPC_STATUS_UNAUTHENTICATED; i++) {
    if (strcmp(etcd3_status_name(i), code) == 0) {
      status = i;
      break;
    }
  }
  switch (etcd3_policy_verdict((grpc_status_code)status, message, lua_toboolean(L, 4),
                               lua_toboolean(L, 5))) {
  case ETCD3_NEXT: lua_pushliteral(L, "next"); break;
  case ETCD3_REAUTH: lua_pushliteral(L, "reauth"); break;
  case ETCD3_MOVE_ON: lua_pushliteral(L, "move"); break;
  default: lua_pushnil(L); break;
  }
  return 1;
}

/* client:pause(round) -> seconds: the request policy's pause after
 * `round` rounds in a row in which every endpoint failed a read. */
static int client_pause(lua_State *L) {
  lua_Integer round = luaL_checkinteger(L, 2);
  lua_pushnumber(L, etcd3_backoff_round(round < 1 ? 1 : round > 64 ? 64 : (int)round));
  return 1;
}

static const char *const state_names[] = {
  "IDLE", "CONNECTING", "READY", "TRANSIENT_FAILURE", "SHUTDOWN",
};

/* client:state(endpoint_index [, try_to_connect]) -> "READY", … */
static int client_state(lua_State *L) {
  etcd3_engine *e = check_open(L);
  size_t channel = check_channel(L, e, 2);
  grpc_connectivity_state s;
  s = grpc_channel_check_connectivity_state(e->channels[channel].channel, lua_toboolean(L, 3));
  lua_pushstring(L, (unsigned)s < 5 ? state_names[s] : "UNKNOWN");
  return 1;
}

/* client:pollfd() -> fd, readable while completions wait to be collected */
static int client_pollfd(lua_State *L) {
  lua_pushinteger(L, check_open(L)->eventfd);
  return 1;
}

/* client:wait(seconds) -> boolean: waits on the pollfd at most that long
 * (for callers that wait for any completion, not a given call). */
static int client_wait(lua_State *L) {
  etcd3_engine *e = check_open(L);
  double seconds = luaL_checknumber(L, 2);
  struct pollfd p;
  int rc;
  p.fd = e->eventfd;
  p.events = POLLIN;
  p.revents = 0;
  rc = poll(&p, 1, seconds > 0 ? (int)(seconds * 1000 + 0.5) : 0);
  lua_pushboolean(L, rc > 0);
  return 1;
}

static int client_close(lua_State *L) {
  client_ud *u = to_client(L);
  etcd3_engine *e = u->engine;
  if (!e) return 0;
  u->engine = NULL;
  if (etcd3_engine_forked(e)) return 0; /* inherited: leak, touch nothing */
  etcd3_engine_close(e);
  etcd3_engine_release(e);
  return 0;
}

static int client_closed(lua_State *L) {
  lua_pushboolean(L, to_client(L)->engine == NULL);
  return 1;
}

/* client:unusable() -> nil | "closed" | "forked": asked by the Lua layer
 * before every request (one call for both). */
static int client_unusable(lua_State *L) {
  client_ud *u = to_client(L);
  if (!u->engine) lua_pushliteral(L, "closed");
  else if (etcd3_engine_forked(u->engine)) lua_pushliteral(L, "forked");
  else lua_pushnil(L);
  return 1;
}

int etcd3_client_open(lua_State *L) {
  static const luaL_Reg methods[] = {
    {"call", client_call}, {"state", client_state}, {"pollfd", client_pollfd},
    {"wait", client_wait}, {"close", client_close}, {"closed", client_closed},
    {"unusable", client_unusable}, {"lease", client_lease}, {"watch", client_watch},
    {"set_token", client_set_token}, {"set_credentials", client_set_credentials},
    {"reauth", client_reauth}, {"add_endpoint", client_add_endpoint},
    {"pick", client_pick}, {"failed", client_failed}, {"prefer", client_prefer},
    {"retire", client_retire}, {"verdict", client_verdict}, {"pause", client_pause},
    {"snapshot", client_snapshot}, {"token", client_token},
    {"register", client_register}, {"notifier", client_notifier}, {NULL, NULL},
  };
  etcd3_register_type(L, ETCD3_CLIENT_MT, methods, client_close);
  lua_pushcfunction(L, client_new); /* stack: module, new */
  lua_setfield(L, -2, "new");
  return 0;
}
