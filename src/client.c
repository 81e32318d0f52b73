/*
 * client.c - the etcd3.Client userdata of etcd3.core, and the module's
 * luaopen.
 *
 * This is the low-level client the pure-Lua layer (lua/etcd3/client.lua)
 * drives: it owns an engine, starts calls on a chosen endpoint, reports
 * connectivity, and exposes the pollfd. Policy (which endpoint, retries,
 * how to wait, error objects) lives in Lua.
 *
 * The userdata holds a pointer and is emptied by the one idempotent
 * teardown that close, __close and __gc share. In a forked child the
 * inherited engine is leaked on purpose: gRPC hangs if its objects are
 * destroyed there (DESIGN.md, "fork").
 */
#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/resource.h>

#include "etcd3.h"

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
static int l_new(lua_State *L) {
  const char *targets[ETCD3_MAX_ENDPOINTS];
  etcd3_channel_options opts;
  char err[256];
  size_t n;
  client_ud *u;
  luaL_checktype(L, 1, LUA_TTABLE);
  n = lua_rawlen(L, 1);
  if (n == 0 || n > ETCD3_MAX_ENDPOINTS)
    return luaL_argerror(L, 1, "between 1 and 64 endpoints expected");
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
    lua_getfield(L, 4, "server_name");
    opts.server_name = lua_tostring(L, -1);
    lua_pop(L, 4);
  }
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
static int l_call(lua_State *L) {
  etcd3_engine *e = check_open(L);
  size_t channel = check_channel(L, e, 2);
  const char *rpc = luaL_checkstring(L, 3);
  const char *path;
  const ProtobufCMethodDescriptor *m = etcd3_find_method(rpc, &path);
  double timeout = luaL_checknumber(L, 5);
  if (!m) return luaL_argerror(L, 3, "unknown RPC");
  luaL_checktype(L, 4, LUA_TTABLE);
  /* rpc_name must be static for the call's lifetime: use the path's tail */
  return etcd3_call_start(L, e, channel, m, path, path + 1, 4, timeout, lua_toboolean(L, 6));
}

/* Parses a 16-hex-digit ID (or an integer on 5.3+). */
static int64_t check_id(lua_State *L, int idx) {
  if (lua_type(L, idx) == LUA_TSTRING) {
    const char *s = lua_tostring(L, idx);
    char *end;
    unsigned long long v = strtoull(s, &end, 16);
    if (*s == '\0' || *end != '\0' || strlen(s) > 16) luaL_argerror(L, idx, "bad ID");
    return (int64_t)v;
  }
  return (int64_t)luaL_checknumber(L, idx);
}

/* client:lease(id, ttl) -> lease state (lease.c) */
static int l_lease(lua_State *L) {
  etcd3_engine *e = check_open(L);
  int64_t id = check_id(L, 2);
  int64_t ttl = (int64_t)luaL_checknumber(L, 3);
  return etcd3_lease_new(L, e, id, ttl);
}

/* client:watch(spec) -> watch state (watch.c) */
static int l_watch(lua_State *L) {
  etcd3_engine *e = check_open(L);
  luaL_checktype(L, 2, LUA_TTABLE);
  return etcd3_watch_new(L, e, 2);
}

/* client:add_endpoint("host:port") -> index | nil */
static int l_add_endpoint(lua_State *L) {
  int index = etcd3_engine_add_channel(check_open(L), luaL_checkstring(L, 2));
  if (index < 0) lua_pushnil(L);
  else lua_pushinteger(L, index + 1);
  return 1;
}

/* client:snapshot(endpoint_index) -> server stream (server_stream.c) */
static int l_snapshot(lua_State *L) {
  etcd3_engine *e = check_open(L);
  return etcd3_snapshot_start(L, e, check_channel(L, e, 2));
}

/* client:token() -> the current auth token or nil (for a sibling client
 * aimed at one member) */
static int l_token(lua_State *L) {
  etcd3_engine *e = check_open(L);
  pthread_mutex_lock(&e->mu);
  if (e->token) lua_pushstring(L, e->token);
  else lua_pushnil(L);
  pthread_mutex_unlock(&e->mu);
  return 1;
}

static int l_set_token(lua_State *L) {
  return etcd3_auth_set_token(L, check_open(L));
}

static int l_set_credentials(lua_State *L) {
  return etcd3_auth_set_credentials(L, check_open(L));
}

static int l_authenticate(lua_State *L) {
  etcd3_engine *e = check_open(L);
  size_t channel = check_channel(L, e, 2);
  return etcd3_auth_start(L, e, channel, luaL_checknumber(L, 3));
}

static const char *const state_names[] = {
  "IDLE", "CONNECTING", "READY", "TRANSIENT_FAILURE", "SHUTDOWN",
};

/* client:state(endpoint_index [, try_to_connect]) -> "READY", … */
static int l_state(lua_State *L) {
  etcd3_engine *e = check_open(L);
  size_t channel = check_channel(L, e, 2);
  grpc_connectivity_state s;
  s = grpc_channel_check_connectivity_state(e->channels[channel].channel, lua_toboolean(L, 3));
  lua_pushstring(L, (unsigned)s < 5 ? state_names[s] : "UNKNOWN");
  return 1;
}

/* client:pollfd() -> fd, readable while completions wait to be collected */
static int l_pollfd(lua_State *L) {
  lua_pushinteger(L, check_open(L)->eventfd);
  return 1;
}

/* client:wait(seconds) -> boolean: waits on the pollfd at most that long
 * (for callers that wait for any completion, not a given call). */
static int l_wait(lua_State *L) {
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

static int l_close(lua_State *L) {
  client_ud *u = to_client(L);
  etcd3_engine *e = u->engine;
  if (!e) return 0;
  u->engine = NULL;
  if (etcd3_engine_forked(e)) return 0; /* inherited: leak, touch nothing */
  etcd3_engine_close(e);
  etcd3_engine_release(e);
  return 0;
}

static int l_closed(lua_State *L) {
  lua_pushboolean(L, to_client(L)->engine == NULL);
  return 1;
}

static int l_forked(lua_State *L) {
  client_ud *u = to_client(L);
  lua_pushboolean(L, u->engine && etcd3_engine_forked(u->engine));
  return 1;
}

/* core.now() -> monotonic seconds */
static int l_now(lua_State *L) {
  lua_pushnumber(L, etcd3_now());
  return 1;
}

/* core.cpu_time() -> user + system CPU seconds of the whole process (all
 * threads, the engine's too): what the benchmarks report per operation. */
static int l_cpu_time(lua_State *L) {
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  lua_pushnumber(L, (double)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
                        (double)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6);
  return 1;
}

/* core.sleep(seconds): the plain-script strategy's sleep. */
static int l_sleep(lua_State *L) {
  double s = luaL_checknumber(L, 1);
  struct timespec ts;
  if (s <= 0) return 0;
  ts.tv_sec = (time_t)s;
  ts.tv_nsec = (long)((s - (double)ts.tv_sec) * 1e9);
  while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
  }
  return 0;
}

int etcd3_client_open(lua_State *L) {
  static const luaL_Reg methods[] = {
    {"call", l_call}, {"state", l_state}, {"pollfd", l_pollfd},
    {"wait", l_wait}, {"close", l_close}, {"closed", l_closed},
    {"forked", l_forked}, {"lease", l_lease}, {"watch", l_watch},
    {"set_token", l_set_token}, {"set_credentials", l_set_credentials},
    {"authenticate", l_authenticate}, {"add_endpoint", l_add_endpoint},
    {"snapshot", l_snapshot}, {"token", l_token}, {NULL, NULL},
  };
  etcd3_register_type(L, ETCD3_CLIENT_MT, methods, l_close);
  lua_pushcfunction(L, l_new);
  lua_setfield(L, -2, "new");
  lua_pushcfunction(L, l_now);
  lua_setfield(L, -2, "now");
  lua_pushcfunction(L, l_sleep);
  lua_setfield(L, -2, "sleep");
  lua_pushcfunction(L, l_cpu_time);
  lua_setfield(L, -2, "cpu_time");
  return 0;
}

/* require "etcd3.core": never initialises gRPC (that waits for the first
 * client, so a process may fork after require). */
int luaopen_etcd3_core(lua_State *L);
int luaopen_etcd3_core(lua_State *L) {
  lua_newtable(L);
  etcd3_codec_open(L);
  etcd3_call_open(L);
  etcd3_lease_open(L);
  etcd3_watch_open(L);
  etcd3_server_stream_open(L);
  etcd3_client_open(L);
  lua_pushliteral(L, "etcd3.core 0.1");
  lua_setfield(L, -2, "_VERSION");
  return 1;
}
