/*
 * server_stream.c - a server-streaming call: Maintenance.Snapshot, the one
 * such RPC etcd has besides Watch and LeaseKeepAlive. One request, then
 * messages until the status. The etcd3.ServerStream
 * userdata; the stream itself is stream.c's, run by the engine thread,
 * which queues the decoded messages for Lua.
 *
 * The record is shared by the userdata and the open stream (`refs`, under
 * the engine mutex): collected early, the stream is cancelled and the
 * record freed by whichever side lets go last.
 */
#include <stdlib.h>
#include <string.h>

#include "auxiliar.h"
#include "codec.h"
#include "server_stream.h"
#include "stream.h"
#include "rpc.pb-c.h"

typedef struct message_node {
  ProtobufCMessage *msg;
  struct message_node *next;
} message_node;

typedef struct server_stream {
  etcd3_engine *engine;        /* first: an engine-bound object (auxiliar.h) */
  etcd3_stream *stream;        /* NULL once ended or let go */
  int refs;
  int ended;
  int news;                    /* posted, not yet seen by Lua */
  grpc_status_code status;
  char details[256];
  message_node *head, *tail;
} server_stream;

static void free_messages(message_node *n) {
  while (n) {
    message_node *next = n->next;
    protobuf_c_message_free_unpacked(n->msg, NULL);
    free(n);
    n = next;
  }
}

static void unref(server_stream *s) {
  if (--s->refs > 0) return;
  free_messages(s->head);
  free(s);
}

ETCD3_LOCKED static void notify(server_stream *s) { etcd3_news_post(s->engine, &s->news); }

static void on_message(void *owner, etcd3_stream *st, ProtobufCMessage *msg) {
  server_stream *s = (server_stream *)owner;
  message_node *n = (message_node *)malloc(sizeof *n);
  (void)st;
  if (!n) {
    protobuf_c_message_free_unpacked(msg, NULL);
    return;
  }
  n->msg = msg;
  n->next = NULL;
  if (s->tail) s->tail->next = n;
  else s->head = n;
  s->tail = n;
  notify(s);
}

static void on_closed(void *owner, etcd3_stream *st, grpc_status_code status, const char *details) {
  server_stream *s = (server_stream *)owner;
  (void)st;
  s->stream = NULL;
  s->ended = 1;
  s->status = status;
  strncpy(s->details, details, sizeof s->details - 1);
  notify(s);
  unref(s); /* the stream's reference */
}

/* static: the stream may decode after its owner let go */
static const etcd3_stream_ops snapshot_ops = {
  .response = &etcdserverpb__snapshot_response__descriptor,
  .on_message = on_message, .on_closed = on_closed,
};

static server_stream *check_ss(lua_State *L) {
  return (server_stream *)etcd3_bound_check(L, ETCD3_SERVER_STREAM_MT, "stream");
}

/* core client:snapshot(endpoint_index) -> stream of SnapshotResponse */
int etcd3_snapshot_start(lua_State *L, etcd3_engine *e, size_t channel) {
  Etcdserverpb__SnapshotRequest req = ETCDSERVERPB__SNAPSHOT_REQUEST__INIT;
  server_stream *s = (server_stream *)etcd3_bound_new(L, ETCD3_SERVER_STREAM_MT, sizeof *s, e);
  s->refs = 1;
  pthread_mutex_lock(&e->mu);
  etcd3_engine_ref_locked(e);
  s->stream = etcd3_stream_start(e, channel, "/etcdserverpb.Maintenance/Snapshot", 0,
                                &snapshot_ops, s);
  if (s->stream) {
    s->refs++; /* the stream's, dropped in on_closed */
    etcd3_stream_send(s->stream, &req.base);
  } else {
    s->ended = 1;
    s->status = GRPC_STATUS_UNAVAILABLE;
    strcpy(s->details, "cannot open the stream (client closed?)");
  }
  pthread_mutex_unlock(&e->mu);
  return 1;
}

/* stream:ready() -> messages queued, or ended */
static int server_stream_ready(lua_State *L) {
  server_stream *s = check_ss(L);
  pthread_mutex_lock(&s->engine->mu);
  lua_pushboolean(L, s->head != NULL || s->ended);
  pthread_mutex_unlock(&s->engine->mu);
  return 1;
}

static int has_news(void *arg, double now, double *until) {
  server_stream *s = (server_stream *)arg;
  (void)now; (void)until;
  return s->head || s->ended;
}

/* stream:wait(seconds) */
static int server_stream_wait(lua_State *L) {
  server_stream *s = check_ss(L);
  etcd3_engine_wait_until(s->engine, luaL_checknumber(L, 2), has_news, s);
  return 0;
}

typedef struct taken {
  message_node *head;
} taken;

static int taken_gc(lua_State *L) {
  taken *t = (taken *)lua_touserdata(L, 1);
  free_messages(t->head);
  t->head = NULL;
  return 0;
}

/* stream:poll() -> { message, … }, ended, code, status, details */
static int server_stream_poll(lua_State *L) {
  server_stream *s = check_ss(L);
  taken *t = (taken *)lua_newuserdata(L, sizeof *t);
  int n = 0, ended;
  grpc_status_code status;
  t->head = NULL;
  lua_newtable(L);
  lua_pushcfunction(L, taken_gc);
  lua_setfield(L, -2, "__gc");
  lua_setmetatable(L, -2);
  pthread_mutex_lock(&s->engine->mu);
  t->head = s->head;
  s->head = s->tail = NULL;
  ended = s->ended;
  status = s->status;
  etcd3_news_seen(s->engine, &s->news);
  pthread_mutex_unlock(&s->engine->mu);
  lua_newtable(L); /* stack: taken, messages */
  for (message_node *m = t->head; m; m = m->next) {
    etcd3_push_message(L, m->msg);
    lua_rawseti(L, -2, ++n);
  }
  free_messages(t->head);
  t->head = NULL;
  lua_pushboolean(L, ended);
  lua_pushstring(L, etcd3_status_name((int)status));
  lua_pushinteger(L, (lua_Integer)status);
  lua_pushstring(L, s->details);
  return 5;
}

static int server_stream_gc(lua_State *L) {
  server_stream *s = (server_stream *)etcd3_bound_take(L, ETCD3_SERVER_STREAM_MT);
  etcd3_engine *e;
  if (!s) return 0;
  e = s->engine;
  pthread_mutex_lock(&e->mu);
  if (s->stream) {
    etcd3_stream_close(s->stream); /* no callback follows */
    s->stream = NULL;
    s->refs--;                     /* the stream's reference */
  }
  etcd3_news_seen(e, &s->news);
  unref(s);
  pthread_mutex_unlock(&e->mu);
  etcd3_engine_release(e);
  return 0;
}

int etcd3_server_stream_open(lua_State *L) {
  static const luaL_Reg methods[] = {
    {"ready", server_stream_ready}, {"wait", server_stream_wait}, {"poll", server_stream_poll}, {NULL, NULL},
  };
  etcd3_register_type(L, ETCD3_SERVER_STREAM_MT, methods, server_stream_gc);
  return 0;
}
