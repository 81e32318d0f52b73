/*
 * auth.c - the auth token every call and stream carries, and
 * re-authentication in the background for the streams.
 *
 * The Lua layer authenticates on connect and again when a unary call is
 * refused for its token (lua/etcd3/auth.lua), and hands the token to the
 * engine. Streams have no Lua call to retry them, so when etcd refuses a
 * stream or a watch create for its token, the engine authenticates by
 * itself with the credentials it keeps, then re-opens its streams with the
 * new token (watchers resume from their last revision + 1).
 *
 * The password lives only in engine memory (zeroed when freed); it never
 * appears in an error, a log line, or tostring of anything.
 */
#include <stdlib.h>
#include <string.h>

#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/slice.h>

#include "etcd3.h"
#include "rpc.pb-c.h"

typedef struct auth_call {
  etcd3_tag tag;
  etcd3_engine *engine;
  grpc_call *call;
  grpc_metadata_array initial_md, trailing_md;
  grpc_byte_buffer *send, *recv;
  grpc_status_code status;
  grpc_slice details;
} auth_call;

size_t etcd3_auth_metadata(etcd3_engine *e, grpc_metadata *md, size_t room) {
  if (!e->token || room == 0) return 0;
  md[0].key = grpc_slice_from_static_string("token");
  md[0].value = grpc_slice_from_copied_string(e->token);
  return 1;
}

static void set_token(etcd3_engine *e, const char *token) {
  free(e->token);
  e->token = token && *token ? strdup(token) : NULL;
  e->token_generation++;
}

static void auth_done(etcd3_tag *tag, int ok) {
  auth_call *a = (auth_call *)tag;
  etcd3_engine *e = a->engine;
  Etcdserverpb__AuthenticateResponse *r = NULL;
  (void)ok;
  if (a->status == GRPC_STATUS_OK && a->recv) {
    grpc_byte_buffer_reader reader;
    if (grpc_byte_buffer_reader_init(&reader, a->recv)) {
      grpc_slice slice = grpc_byte_buffer_reader_readall(&reader);
      grpc_byte_buffer_reader_destroy(&reader);
      r = etcdserverpb__authenticate_response__unpack(NULL, GRPC_SLICE_LENGTH(slice),
                                                      GRPC_SLICE_START_PTR(slice));
      grpc_slice_unref(slice);
    }
  }
  pthread_mutex_lock(&e->mu);
  e->auth_inflight = 0;
  e->auth_call = NULL;
  if (!e->closed) {
    if (r) set_token(e, r->token);
    /* streams carry the token from their start: re-open them (after a
     * failure too: what etcd refuses again then ends with its error) */
    etcd3_watch_restart(e);
  }
  etcd3_engine_unref_locked(e);
  pthread_mutex_unlock(&e->mu);
  if (r) etcdserverpb__authenticate_response__free_unpacked(r, NULL);
  grpc_metadata_array_destroy(&a->initial_md);
  grpc_metadata_array_destroy(&a->trailing_md);
  if (a->send) grpc_byte_buffer_destroy(a->send);
  if (a->recv) grpc_byte_buffer_destroy(a->recv);
  grpc_slice_unref(a->details);
  grpc_call_unref(a->call);
  free(a);
}

/* Starts an Authenticate call unless one is under way; mutex held. */
void etcd3_auth_refresh(etcd3_engine *e) {
  Etcdserverpb__AuthenticateRequest req = ETCDSERVERPB__AUTHENTICATE_REQUEST__INIT;
  grpc_op ops[6];
  grpc_slice payload;
  size_t channel;
  auth_call *a;
  if (!e->user || !e->password || e->auth_inflight || e->closed) return;
  a = (auth_call *)calloc(1, sizeof *a);
  if (!a) return;
  a->tag.done = auth_done;
  a->engine = e;
  a->details = grpc_empty_slice();
  req.name = e->user;
  req.password = e->password;
  payload = grpc_slice_malloc(protobuf_c_message_get_packed_size(&req.base));
  protobuf_c_message_pack(&req.base, GRPC_SLICE_START_PTR(payload));
  a->send = grpc_raw_byte_buffer_create(&payload, 1);
  grpc_slice_unref(payload);
  grpc_metadata_array_init(&a->initial_md);
  grpc_metadata_array_init(&a->trailing_md);
  channel = etcd3_engine_next_channel(e, e->n_channels - 1);
  a->call = grpc_channel_create_call(e->channels[channel].channel, NULL, GRPC_PROPAGATE_DEFAULTS,
                                     e->cq, grpc_slice_from_static_string("/etcdserverpb.Auth/Authenticate"),
                                     NULL, etcd3_deadline(5), NULL);
  etcd3_unary_ops(ops, NULL, 0, a->send, &a->initial_md, &a->recv, &a->trailing_md, &a->status,
                  &a->details);
  if (grpc_call_start_batch(a->call, ops, 6, &a->tag, NULL) != GRPC_CALL_OK) {
    grpc_metadata_array_destroy(&a->initial_md);
    grpc_metadata_array_destroy(&a->trailing_md);
    grpc_byte_buffer_destroy(a->send);
    grpc_call_unref(a->call);
    free(a);
    return;
  }
  e->auth_inflight = 1;
  etcd3_engine_wake(e);
  e->auth_call = a->call;
  e->refs++;
}

static void free_secret(char **s) {
  if (*s) {
    memset(*s, 0, strlen(*s));
    free(*s);
    *s = NULL;
  }
}

void etcd3_auth_free(etcd3_engine *e) {
  free_secret(&e->token);
  free_secret(&e->user);
  free_secret(&e->password);
}

/* ---- Lua: methods of the core client (client.c registers them) -------- */

/* client:set_token(token | nil) */
int etcd3_auth_set_token(lua_State *L, etcd3_engine *e) {
  const char *token = luaL_optstring(L, 2, NULL);
  pthread_mutex_lock(&e->mu);
  set_token(e, token);
  pthread_mutex_unlock(&e->mu);
  return 0;
}

/* client:set_credentials(user, password): kept for stream re-auth. */
int etcd3_auth_set_credentials(lua_State *L, etcd3_engine *e) {
  const char *user = luaL_checkstring(L, 2);
  const char *password = luaL_checkstring(L, 3);
  char *u = strdup(user), *p = strdup(password);
  if (!u || !p) {
    free(u);
    free(p);
    return luaL_error(L, "etcd3: out of memory");
  }
  pthread_mutex_lock(&e->mu);
  free_secret(&e->user);
  free_secret(&e->password);
  e->user = u;
  e->password = p;
  pthread_mutex_unlock(&e->mu);
  return 0;
}

/* client:authenticate(endpoint_index, timeout) -> call: an Authenticate
 * call with the stored credentials, so the Lua client object never holds
 * the password after new(). */
int etcd3_auth_start(lua_State *L, etcd3_engine *e, size_t channel, double timeout) {
  const char *path;
  const ProtobufCMethodDescriptor *m = etcd3_find_method("Auth.Authenticate", &path);
  pthread_mutex_lock(&e->mu);
  if (!e->user || !e->password) {
    pthread_mutex_unlock(&e->mu);
    return luaL_error(L, "etcd3: no credentials to authenticate with");
  }
  lua_createtable(L, 0, 2);
  lua_pushstring(L, e->user);
  lua_setfield(L, -2, "name");
  lua_pushstring(L, e->password);
  lua_setfield(L, -2, "password");
  pthread_mutex_unlock(&e->mu);
  return etcd3_call_start(L, e, channel, m, path, path + 1, lua_gettop(L), timeout, 0);
}
