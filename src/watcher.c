/*
 * watcher.c - the etcd3.WatchState userdata: what Lua holds of a watch
 * (core client:watch), a watcher with its own queue of events.
 *
 * The engine side (the stream, the wires watchers share, delivery) is
 * watch.c's; this file reads a watcher's state and takes its queue under
 * the engine mutex, and makes the Lua values after letting go of it (the
 * lock rule, engine.h). The watcher belongs to its userdata: __gc cancels
 * it (so watch.c lets go of it) before freeing it.
 */
#include <stdlib.h>

#include "auxiliar.h"
#include "codec.h"
#include "sink.h"
#include "watch_internal.h"
#include "watcher.h"

static etcd3_watcher *check_watcher(lua_State *L) {
  return (etcd3_watcher *)etcd3_bound_check(L, ETCD3_WATCH_MT, "watcher");
}

/* Lua has seen the news once it took everything. */
ETCD3_LOCKED static void seen(etcd3_watcher *w) {
  if (!w->queue.head) etcd3_news_seen(w->engine, &w->news);
}

static int opt_bool(lua_State *L, int idx, const char *name) {
  int v;
  lua_getfield(L, idx, name);
  v = lua_toboolean(L, -1);
  lua_pop(L, 1);
  return v;
}

/* The string field `name` of the table at idx, left on the stack (so the
 * pointer stays valid); "" when absent. */
static const uint8_t *opt_bytes(lua_State *L, int idx, const char *name, size_t *len, int *present) {
  const char *s;
  lua_getfield(L, idx, name);
  s = lua_tolstring(L, -1, len);
  *present = s != NULL;
  if (!s) *len = 0;
  return (const uint8_t *)(s ? s : "");
}

/* core client:watch(spec) -> state. spec: key, range_end, start_revision,
 * prev_kv, progress_notify, fragment, noput, nodelete, max_queued.
 * The Lua layer has checked every field. */
int etcd3_watcher_new(lua_State *L, etcd3_engine *e, int spec_index) {
  etcd3_watcher *w;
  watch_spec spec;
  uint32_t hash;
  int present, top;
  spec_index = lua_absindex(L, spec_index);
  top = lua_gettop(L);
  spec.key = opt_bytes(L, spec_index, "key", &spec.key_len, &present);
  spec.range_end = opt_bytes(L, spec_index, "range_end", &spec.range_end_len, &spec.has_range_end);
  spec.prev_kv = opt_bool(L, spec_index, "prev_kv");
  spec.progress_notify = opt_bool(L, spec_index, "progress_notify");
  spec.fragment = opt_bool(L, spec_index, "fragment");
  spec.noput = opt_bool(L, spec_index, "noput");
  spec.nodelete = opt_bool(L, spec_index, "nodelete");
  lua_getfield(L, spec_index, "start_revision");
  spec.start_revision = (int64_t)lua_tonumber(L, -1);
  lua_getfield(L, spec_index, "max_queued");
  hash = etcd3_watch_spec_hash(&spec);
  /* from here __gc frees it; nothing below raises */
  w = (etcd3_watcher *)etcd3_bound_new(L, ETCD3_WATCH_MT, sizeof *w, e);
  w->max_queued = (size_t)lua_tonumber(L, -2);
  pthread_mutex_lock(&e->mu);
  etcd3_engine_ref_locked(e);
  etcd3_watch_join(e, w, &spec, hash);
  pthread_mutex_unlock(&e->mu);
  lua_replace(L, top + 1); /* stack: ..., state */
  lua_settop(L, top + 1);
  return 1;
}

/* state:state() -> created, ended, revision */
static int watcher_state(lua_State *L) {
  etcd3_watcher *w = check_watcher(L);
  pthread_mutex_lock(&w->engine->mu);
  lua_pushboolean(L, w->created);
  lua_pushboolean(L, w->ended);
  lua_pushnumber(L, (lua_Number)w->revision);
  if (w->created || w->ended) seen(w);
  pthread_mutex_unlock(&w->engine->mu);
  return 3;
}

/* state:ready() -> boolean: events are queued, or the watcher ended. */
static int watcher_ready(lua_State *L) {
  etcd3_watcher *w = check_watcher(L);
  pthread_mutex_lock(&w->engine->mu);
  lua_pushboolean(L, w->queue.head != NULL || w->ended);
  pthread_mutex_unlock(&w->engine->mu);
  return 1;
}

/* state:news_key() -> lightuserdata: names this watcher in the notifier's
 * news (notifier.c), so its waiter is woken without asking every other. */
static int watcher_news_key(lua_State *L) {
  lua_pushlightuserdata(L, &check_watcher(L)->news);
  return 1;
}

ETCD3_LOCKED static int has_news(void *arg, double now, double *until) {
  etcd3_watcher *w = (etcd3_watcher *)arg;
  (void)now; (void)until;
  return w->queue.head || w->ended || w->news;
}

/* state:wait(seconds): until something arrives, or the time passes. */
static int watcher_wait(lua_State *L) {
  etcd3_watcher *w = check_watcher(L);
  etcd3_engine_wait_until(w->engine, luaL_checknumber(L, 2), has_news, w);
  return 0;
}

typedef struct taken_box {
  batch_queue queue;
} taken_box;

static int taken_gc(lua_State *L) {
  taken_box *b = (taken_box *)lua_touserdata(L, 1);
  etcd3_watch_queue_free(&b->queue);
  return 0;
}

/* state:poll() -> { event, … } (may be empty) | nil, code, message,
 * compact_revision once the watcher ended and nothing is left. */
static int watcher_poll(lua_State *L) {
  etcd3_watcher *w = check_watcher(L);
  taken_box *box;
  int64_t floor;
  int n = 0;
  box = (taken_box *)lua_newuserdata(L, sizeof *box);
  box->queue.head = box->queue.tail = NULL;
  lua_newtable(L); /* metatable with __gc: lets go of what was taken on error */
  lua_pushcfunction(L, taken_gc);
  lua_setfield(L, -2, "__gc");
  lua_setmetatable(L, -2);
  pthread_mutex_lock(&w->engine->mu);
  box->queue = w->queue;
  w->queue.head = w->queue.tail = NULL;
  w->queued = 0;
  floor = w->floor;
  seen(w);
  if (!box->queue.head && w->ended) {
    pthread_mutex_unlock(&w->engine->mu);
    lua_pushnil(L);
    if (w->end_code) lua_pushstring(L, w->end_code);
    else lua_pushnil(L);
    lua_pushstring(L, w->end_message);
    lua_pushnumber(L, (lua_Number)w->compact_revision);
    return 4;
  }
  pthread_mutex_unlock(&w->engine->mu);
  lua_newtable(L); /* stack: box, events */
  for (batch_node *node = box->queue.head; node; node = node->next) {
    for (response_node *rn = node->batch->responses.head; rn; rn = rn->next) {
      for (size_t i = 0; i < rn->resp->n_events; i++) {
        const Mvccpb__Event *ev = rn->resp->events[i];
        if (ev->kv && ev->kv->mod_revision <= floor) continue;
        etcd3_push_message(L, &ev->base);
        lua_rawseti(L, -2, ++n);
      }
    }
  }
  etcd3_watch_queue_free(&box->queue);
  return 1;
}

/* state:revision() -> last revision seen (events and progress) */
static int watcher_revision(lua_State *L) {
  etcd3_watcher *w = check_watcher(L);
  pthread_mutex_lock(&w->engine->mu);
  lua_pushnumber(L, (lua_Number)w->revision);
  pthread_mutex_unlock(&w->engine->mu);
  return 1;
}

/* state:cancel(): ends the watcher (no error); events queued are dropped. */
static int watcher_cancel(lua_State *L) {
  etcd3_watcher *w = check_watcher(L);
  pthread_mutex_lock(&w->engine->mu);
  etcd3_watch_cancel(w);
  pthread_mutex_unlock(&w->engine->mu);
  return 0;
}

/* state:progress(): asks etcd for a progress notification (all watchers of
 * the stream); false when the stream is not open. */
static int watcher_progress(lua_State *L) {
  etcd3_watcher *w = check_watcher(L);
  int ok;
  pthread_mutex_lock(&w->engine->mu);
  ok = etcd3_watch_progress(w->engine);
  pthread_mutex_unlock(&w->engine->mu);
  lua_pushboolean(L, ok);
  return 1;
}

/* state:sink(zone, feed|nil, state) -> true | false, why: hands the dict
 * of etcd3.ngx's writer to the engine thread, which writes each batch of
 * this watcher into it from now on (sink.c). `zone` is the dict's [1];
 * state: rev, head, tail, from, size, count (the dict as the writer left
 * it), pid, lock_ttl, ns (the client's namespace, or nil), and the names
 * rev_key, lock_key, log_key, count_key, writer_key, entry_prefix. False
 * when a batch is queued that Lua has not taken (it must write it first),
 * when the watcher ended, or when this process has no shared dicts. */
static int watcher_sink(lua_State *L) {
  etcd3_watcher *w = check_watcher(L);
  const char *why = NULL;
  etcd3_sink *s = etcd3_sink_new(L, 2, &why), *old = NULL;
  if (s) {
    pthread_mutex_lock(&w->engine->mu);
    if (w->queue.head) why = "events are queued";
    else if (w->ended || !w->wire) why = "the watch ended";
    else {
      old = w->sink;
      w->sink = s;
      s = NULL;
    }
    pthread_mutex_unlock(&w->engine->mu);
  }
  etcd3_sink_free(old);
  etcd3_sink_free(s);
  if (!why) {
    lua_pushboolean(L, 1);
    return 1;
  }
  lua_pushboolean(L, 0);
  lua_pushstring(L, why);
  return 2;
}

/* state:unsink() -> rev, head, tail, from, count | false | nil: takes the
 * dict back from the sink: where it left the dict (false: it failed
 * after moving the log's state, so the dict must be written whole again;
 * nil: there was no sink). */
static int watcher_unsink(lua_State *L) {
  etcd3_watcher *w = check_watcher(L);
  etcd3_sink *s;
  pthread_mutex_lock(&w->engine->mu);
  s = w->sink;
  w->sink = NULL;
  pthread_mutex_unlock(&w->engine->mu);
  if (!s) return 0;
  return etcd3_sink_push_free(L, s);
}

static int watcher_gc(lua_State *L) {
  etcd3_watcher *w = (etcd3_watcher *)etcd3_bound_take(L, ETCD3_WATCH_MT);
  etcd3_engine *e;
  if (!w) return 0;
  e = w->engine;
  pthread_mutex_lock(&e->mu);
  etcd3_watch_cancel(w);
  etcd3_news_seen(e, &w->news);
  etcd3_watch_close_idle(e); /* when none is left */
  pthread_mutex_unlock(&e->mu);
  etcd3_sink_free(w->sink);
  free(w);
  etcd3_engine_release(e);
  return 0;
}

int etcd3_watcher_open(lua_State *L) {
  static const luaL_Reg methods[] = {
    {"state", watcher_state}, {"ready", watcher_ready}, {"wait", watcher_wait},
    {"poll", watcher_poll}, {"revision", watcher_revision}, {"cancel", watcher_cancel},
    {"progress", watcher_progress}, {"news_key", watcher_news_key}, {"sink", watcher_sink},
    {"unsink", watcher_unsink}, {NULL, NULL},
  };
  etcd3_register_type(L, ETCD3_WATCH_MT, methods, watcher_gc);
  return 0;
}
