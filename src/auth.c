/*
 * auth.c - the auth token every call and stream carries, and
 * re-authentication in the background for the streams.
 *
 * The Lua layer authenticates on connect and again when a unary call is
 * refused for its token (lua/etcd3/auth.lua), and hands the token to the
 * engine. Streams have no Lua call to retry them, so when etcd refuses a
 * stream or a watch create for its token, the engine authenticates by
 * itself with the credentials it keeps (a background call), then tells its
 * services of the new token (they re-open their streams; watchers resume
 * from their last revision + 1).
 *
 * The state is the engine's "auth" service, registered on the first token
 * or credentials. The password lives only there (zeroed when freed); it
 * never appears in an error, a log line, or tostring of anything.
 */
#include <stdlib.h>
#include <string.h>

#include <grpc/byte_buffer.h>

#include "auth.h"
#include "call.h"
#include "codec.h"
#include "rpc.pb-c.h"

#define AUTHENTICATE_PATH "/etcdserverpb.Auth/Authenticate"
#define BACKGROUND_TIMEOUT 5.0

typedef struct auth_state {
  char *token;                  /* carried by every call and stream */
  char *user, *password;        /* for re-authenticating by itself */
  unsigned generation;          /* bumped on every new token */
  int refreshing;               /* a background Authenticate is under way */
} auth_state;

static void free_secret(char **s) {
  if (*s) {
    memset(*s, 0, strlen(*s));
    free(*s);
    *s = NULL;
  }
}

ETCD3_LOCKED static size_t auth_metadata(etcd3_engine *e, void *state, grpc_metadata *md,
                                         size_t room) {
  auth_state *a = (auth_state *)state;
  (void)e;
  if (!a->token || room == 0) return 0;
  md[0].key = grpc_slice_from_static_string("token");
  md[0].value = grpc_slice_from_copied_string(a->token);
  return 1;
}

static void auth_free(void *state) {
  auth_state *a = (auth_state *)state;
  free_secret(&a->token);
  free_secret(&a->user);
  free_secret(&a->password);
  free(a);
}

/* The background call is one of the calls service's: closing the engine
 * cancels it there. */
static const etcd3_service_ops auth_service = {
  .name = "auth", .metadata = auth_metadata, .free = auth_free,
};

/* The engine's auth state, registered on first use; NULL when closed or
 * out of memory. */
ETCD3_LOCKED static auth_state *auth_of(etcd3_engine *e) {
  return (auth_state *)etcd3_engine_service_get(e, &auth_service, sizeof(auth_state));
}

ETCD3_LOCKED static void set_token(auth_state *a, const char *token) {
  free_secret(&a->token);
  a->token = token && *token ? strdup(token) : NULL;
  a->generation++;
}

ETCD3_LOCKED int etcd3_auth_can_refresh(etcd3_engine *e, unsigned *generation) {
  auth_state *a = (auth_state *)etcd3_engine_service(e, &auth_service);
  if (!a || !a->user || !a->password) return 0;
  *generation = a->generation;
  return 1;
}

/* Engine thread: the background Authenticate finished. */
static void authenticated(etcd3_engine *e, void *arg, grpc_status_code status,
                          grpc_byte_buffer *response) {
  auth_state *a = (auth_state *)arg;
  Etcdserverpb__AuthenticateResponse *r = NULL;
  (void)status;
  if (response)
    r = (Etcdserverpb__AuthenticateResponse *)etcd3_unpack(
        &etcdserverpb__authenticate_response__descriptor, response);
  pthread_mutex_lock(&e->mu);
  a->refreshing = 0;
  if (!e->closed) {
    if (r) set_token(a, r->token);
    /* streams carry the token from their start: they re-open (after a
     * failure too: what etcd refuses again then ends with its error) */
    etcd3_engine_token_changed(e);
  }
  pthread_mutex_unlock(&e->mu);
  if (r) protobuf_c_message_free_unpacked(&r->base, NULL);
}

ETCD3_LOCKED void etcd3_auth_refresh(etcd3_engine *e) {
  Etcdserverpb__AuthenticateRequest req = ETCDSERVERPB__AUTHENTICATE_REQUEST__INIT;
  auth_state *a = (auth_state *)etcd3_engine_service(e, &auth_service);
  size_t channel;
  if (!a || !a->user || !a->password || a->refreshing || e->closed) return;
  req.name = a->user;
  req.password = a->password;
  channel = etcd3_engine_next_channel(e, e->n_channels - 1);
  a->refreshing = etcd3_call_background(e, channel, AUTHENTICATE_PATH, etcd3_pack(&req.base),
                                        BACKGROUND_TIMEOUT, authenticated, a);
}

/* ---- Lua: methods of the core client ----------------------------------- */

/* client:token() -> the current auth token or nil (for a sibling client
 * aimed at one member) */
int etcd3_auth_token(lua_State *L, etcd3_engine *e) {
  /* Copied under the lock into Lua-owned memory, pushed after it: a push
   * may run finalisers that take the lock, and may raise (nothing held). */
  char *copy = NULL;
  size_t room = 0;
  for (;;) {
    auth_state *a;
    size_t need;
    pthread_mutex_lock(&e->mu);
    a = (auth_state *)etcd3_engine_service(e, &auth_service);
    if (!a || !a->token) {
      pthread_mutex_unlock(&e->mu);
      lua_pushnil(L);
      return 1;
    }
    need = strlen(a->token) + 1;
    if (need <= room) {
      memcpy(copy, a->token, need);
      pthread_mutex_unlock(&e->mu);
      break;
    }
    pthread_mutex_unlock(&e->mu);
    room = need; /* the token may change meanwhile: looked at again */
    copy = (char *)lua_newuserdata(L, room);
  }
  lua_pushstring(L, copy);
  return 1;
}

/* client:set_token(token | nil) */
int etcd3_auth_set_token(lua_State *L, etcd3_engine *e) {
  const char *token = luaL_optstring(L, 2, NULL);
  auth_state *a;
  pthread_mutex_lock(&e->mu);
  a = auth_of(e);
  if (a) set_token(a, token);
  pthread_mutex_unlock(&e->mu);
  if (!a) return luaL_error(L, "etcd3: client is closed");
  return 0;
}

/* client:set_credentials(user, password): kept for stream re-auth. */
int etcd3_auth_set_credentials(lua_State *L, etcd3_engine *e) {
  const char *user = luaL_checkstring(L, 2);
  const char *password = luaL_checkstring(L, 3);
  char *u = strdup(user), *p = strdup(password);
  auth_state *a = NULL;
  if (u && p) {
    pthread_mutex_lock(&e->mu);
    a = auth_of(e);
    if (a) {
      free_secret(&a->user);
      free_secret(&a->password);
      a->user = u;
      a->password = p;
    }
    pthread_mutex_unlock(&e->mu);
  }
  if (!a) {
    free_secret(&u);
    free_secret(&p);
    return luaL_error(L, u && p ? "etcd3: client is closed" : "etcd3: out of memory");
  }
  return 0;
}

/* client:authenticate(endpoint_index, timeout) -> call: an Authenticate
 * call with the stored credentials, so the Lua client object never holds
 * the password after new(). */
int etcd3_auth_start(lua_State *L, etcd3_engine *e, size_t channel, double timeout) {
  const char *path;
  const ProtobufCMethodDescriptor *m = etcd3_find_method("Auth.Authenticate", &path);
  auth_state *a;
  pthread_mutex_lock(&e->mu);
  a = (auth_state *)etcd3_engine_service(e, &auth_service);
  if (!a || !a->user || !a->password) {
    pthread_mutex_unlock(&e->mu);
    return luaL_error(L, "etcd3: no credentials to authenticate with");
  }
  lua_createtable(L, 0, 2); /* stack: request */
  lua_pushstring(L, a->user);
  lua_setfield(L, -2, "name");
  lua_pushstring(L, a->password);
  lua_setfield(L, -2, "password");
  pthread_mutex_unlock(&e->mu);
  return etcd3_call_start(L, e, channel, m, path, lua_gettop(L), timeout, 0);
}
