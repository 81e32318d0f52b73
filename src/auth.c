/*
 * auth.c - the auth token every call and stream carries, and the one
 * Authenticate that renews it (the re-authentication part of policy.h).
 *
 * Whoever finds the token refused asks etcd3_auth_refresh with the time
 * its request left: a Lua call (client:reauth, for signing in and for a
 * unary call refused for its token), a background call (a registration's
 * grant or put) or a stream (a watch create, a broken stream). When the
 * token was renewed since, the request is simply tried again; else one
 * Authenticate is started, or the one under way is joined. It is a
 * background call with the credentials kept here; when it ends, the
 * engine's services hear of it (token_changed): they try again, and the
 * watch re-opens its stream for the watchers that were refused (resuming
 * from their last revision + 1). A refusal of the credentials themselves
 * (a wrong password) is kept and returned to everyone who asks, without
 * asking etcd again, until new credentials are set.
 *
 * The state is the engine's "auth" service, registered on the first token
 * or credentials. The password lives only there (zeroed when freed); it
 * never appears in an error, a log line, or tostring of anything.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <grpc/byte_buffer.h>

#include "auth.h"
#include "call.h"
#include "codec.h"
#include "policy.h"
#include "rpc.pb-c.h"

#define AUTHENTICATE_PATH "/etcdserverpb.Auth/Authenticate"
#define BACKGROUND_TIMEOUT 5.0

typedef struct auth_state {
  char *token;                  /* carried by every call and stream */
  char *user, *password;        /* for re-authenticating by itself */
  double token_at;              /* when the token was set (etcd3_now) */
  int refreshing;               /* the shared Authenticate is under way */
  double refresh_started;       /* when it (or the last one) left */
  size_t refresh_channel;       /* where it went */
  /* how the last one failed (status OK: it did not); `refused`: etcd
   * refused the credentials, not asked again until new ones are set */
  grpc_status_code failure;
  char failure_message[160];
  int refused;
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
  a->token_at = etcd3_now();
}

/* Engine thread: the shared Authenticate finished. */
static void authenticated(etcd3_engine *e, void *arg, grpc_status_code status,
                          const char *details, grpc_byte_buffer *response) {
  auth_state *a = (auth_state *)arg;
  Etcdserverpb__AuthenticateResponse *r = NULL;
  if (response)
    r = (Etcdserverpb__AuthenticateResponse *)etcd3_unpack(
        &etcdserverpb__authenticate_response__descriptor, response);
  pthread_mutex_lock(&e->mu);
  a->refreshing = 0;
  if (r) {
    set_token(a, r->token);
    a->failure = GRPC_STATUS_OK;
  } else {
    a->failure = status == GRPC_STATUS_OK ? GRPC_STATUS_INTERNAL : status;
    snprintf(a->failure_message, sizeof a->failure_message, "%s",
             details && *details ? details : etcd3_status_name((int)a->failure));
    /* etcd looked at the credentials and said no: asking again cannot help */
    a->refused = a->failure == GRPC_STATUS_INVALID_ARGUMENT ||
                 a->failure == GRPC_STATUS_PERMISSION_DENIED ||
                 a->failure == GRPC_STATUS_FAILED_PRECONDITION;
    if (etcd3_policy_member_failed(status)) etcd3_policy_failed(e, a->refresh_channel);
  }
  /* everyone waiting tries again (after a failure too: a stream refused
   * again then ends with etcd's error, a background call backs off) */
  if (!e->closed) etcd3_engine_token_changed(e);
  pthread_mutex_unlock(&e->mu);
  if (r) protobuf_c_message_free_unpacked(&r->base, NULL);
}

ETCD3_LOCKED int etcd3_auth_refresh(etcd3_engine *e, double since) {
  Etcdserverpb__AuthenticateRequest req = ETCDSERVERPB__AUTHENTICATE_REQUEST__INIT;
  auth_state *a = (auth_state *)etcd3_engine_service(e, &auth_service);
  if (!a || !a->user || !a->password || e->closed) return ETCD3_AUTH_CANNOT;
  if (a->token && a->token_at >= since) return ETCD3_AUTH_RENEWED;
  if (a->refreshing) return ETCD3_AUTH_PENDING;
  if (a->refused) return ETCD3_AUTH_CANNOT;
  req.name = a->user;
  req.password = a->password;
  a->refresh_channel = etcd3_policy_pick(e);
  a->refresh_started = etcd3_now();
  a->refreshing = etcd3_call_background(e, a->refresh_channel, AUTHENTICATE_PATH,
                                        etcd3_pack(&req.base), BACKGROUND_TIMEOUT, authenticated, a);
  return a->refreshing ? ETCD3_AUTH_PENDING : ETCD3_AUTH_CANNOT;
}

ETCD3_LOCKED const char *etcd3_auth_failure(etcd3_engine *e) {
  auth_state *a = (auth_state *)etcd3_engine_service(e, &auth_service);
  if (!a || !a->user) return "no credentials to authenticate with";
  if (a->failure != GRPC_STATUS_OK) return a->failure_message;
  return "could not start Authenticate";
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
      a->refused = 0; /* new credentials: etcd is asked again */
      a->failure = GRPC_STATUS_OK;
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

/* client:reauth(since) -> "ok" | "pending" | nil, code, message
 * The token renewed at or after `since` (core.now() when the refused
 * request left)? "ok": try again. Else joins or starts the shared
 * Authenticate ("pending": ask again once it may have ended), or says why
 * there is none (the last one failed after `since`, or the credentials were
 * refused). Values are read under the lock and pushed after it. */
int etcd3_auth_reauth(lua_State *L, etcd3_engine *e) {
  double since = luaL_checknumber(L, 2);
  char message[160];
  const char *state = NULL;
  grpc_status_code code = GRPC_STATUS_UNAUTHENTICATED;
  auth_state *a;
  pthread_mutex_lock(&e->mu);
  a = (auth_state *)etcd3_engine_service(e, &auth_service);
  if (a && a->token && a->token_at >= since) {
    state = "ok";
  } else if (a && a->refreshing) {
    state = "pending";
  } else if (a && a->failure != GRPC_STATUS_OK && (a->refused || a->refresh_started >= since)) {
    code = a->failure;
  } else if (etcd3_auth_refresh(e, since) != ETCD3_AUTH_CANNOT) {
    state = "pending";
  }
  if (!state) {
    if (a && a->failure != GRPC_STATUS_OK) code = a->failure;
    snprintf(message, sizeof message, "%s", etcd3_auth_failure(e));
  }
  pthread_mutex_unlock(&e->mu);
  if (state) {
    lua_pushstring(L, state);
    return 1;
  }
  lua_pushnil(L);
  lua_pushstring(L, etcd3_status_name((int)code));
  lua_pushstring(L, message);
  return 3;
}
