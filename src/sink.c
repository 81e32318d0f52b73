/*
 * sink.c - the etcd3.ngx writer's fast path (lua/etcd3/ngx.lua, Writer):
 * the engine thread writes a watcher's batches into the nginx shared dict
 * itself, so that nginx's thread does not wake for each change.
 *
 * Without it each change wakes two threads of the writing worker: the
 * engine thread, which reads etcd's answer, and nginx's, which runs the
 * Lua writer (about 320 of the writer's 560 µs a change on a 2-vCPU VM).
 * The Lua writer stays the only one that handles anything but the steady
 * state: once a batch of its own left the dict whole (every key stored,
 * the log at its full size, no error), it hands the dict to a sink on its
 * mirror's watcher (state:sink) with the log's state; the sink writes
 * each later batch exactly as the Lua writer would (its keys, one log
 * entry per change, the log's state, then the revision, under the dict's
 * lock key) and wakes the views through the writer's feed, and the batch
 * stays queued for the mirror without waking Lua. The Lua writer takes the
 * dict back at its next wake (its heartbeat, at most a second later),
 * with the state the sink left (state:unsink), and skips the changes the
 * sink wrote. Anything else (a key that does not fit, another writer's
 * revision, name or lock, a key outside the namespace) turns the sink off
 * before the batch's revision is written: the batch then wakes Lua as
 * without a sink, and Lua writes it again from the state the sink left
 * (the keys and log entries the sink stored first are rewritten, as after
 * a Lua batch that failed halfway; a key whose larger value did not fit
 * is gone meanwhile, as safe_set leaves it).
 *
 * The dict is reached through the functions lua-nginx-module exports for
 * lua-resty-core (ngx_http_lua_ffi_shdict_*: the same calls ngx.shared
 * makes), found with dlsym in the nginx process. They take the dict's
 * shared-memory mutex, which serialises the processes and, within this
 * one, nginx's thread and the engine's; they read nginx's cached time and
 * nothing of a request, so the engine thread may call them.
 */
#include <dlfcn.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "auxiliar.h"
#include "feed.h"
#include "sink.h"
#include "watch_internal.h"

/* lua-nginx-module's shared dict calls (lua-resty-core's declarations). */
typedef int (*store_fn)(void *zone, int op, const unsigned char *key, size_t key_len, int value_type,
                        const unsigned char *str_value_buf, size_t str_value_len, double num_value,
                        long exptime, int user_flags, char **errmsg, int *forcible);
typedef int (*get_fn)(void *zone, const unsigned char *key, size_t key_len, int *value_type,
                      unsigned char **str_value_buf, size_t *str_value_len, double *num_value,
                      int *user_flags, int get_stale, int *is_stale, char **errmsg);
typedef long (*ttl_fn)(void *zone, const unsigned char *key, size_t key_len);
typedef void *(*zone_fn)(void *zone_udata);

/* store's ops, value types and answers (lua-nginx-module's values) */
#define OP_SET 0
#define OP_ADD 0x0001
#define OP_SAFE 0x0004
#define T_NIL 0
#define T_NUMBER 3
#define T_STRING 4
#define NGX_OK 0
#define NGX_DECLINED (-5)
/* the longest key a shared dict takes */
#define KEY_MAX 65535

static struct {
  store_fn store;
  get_fn get;
  ttl_fn ttl;
  zone_fn zone;
} shdict;
static pthread_once_t shdict_once = PTHREAD_ONCE_INIT;

static void find_shdict(void) {
  /* (a union: ISO C has no cast from an object pointer to a function's) */
  union {
    void *p;
    store_fn store;
    get_fn get;
    ttl_fn ttl;
    zone_fn zone;
  } u;
  u.p = dlsym(RTLD_DEFAULT, "ngx_http_lua_ffi_shdict_store");
  shdict.store = u.p ? u.store : NULL;
  u.p = dlsym(RTLD_DEFAULT, "ngx_http_lua_ffi_shdict_get");
  shdict.get = u.p ? u.get : NULL;
  u.p = dlsym(RTLD_DEFAULT, "ngx_http_lua_ffi_shdict_get_ttl");
  shdict.ttl = u.p ? u.ttl : NULL;
  u.p = dlsym(RTLD_DEFAULT, "ngx_http_lua_ffi_shdict_udata_to_zone");
  shdict.zone = u.p ? u.zone : NULL;
}

int etcd3_sink_available(void) {
  pthread_once(&shdict_once, find_shdict);
  return shdict.store && shdict.get && shdict.ttl && shdict.zone;
}

/* The dict's internal keys the sink writes (named by ngx.lua). */
enum { K_REV, K_LOCK, K_LOG, K_COUNT, K_WRITER, K_ENTRY, N_KEYS };
static const char *const key_fields[N_KEYS] = {"rev_key", "lock_key", "log_key", "count_key", "writer_key",
                                               "entry_prefix"};

struct etcd3_sink {
  void *zone;
  etcd3_feed *feed;         /* NULL: no feed */
  char *keys[N_KEYS];
  size_t key_lens[N_KEYS];
  char *ns;                 /* stripped from every key (the client's namespace) */
  size_t ns_len;
  /* what the dict holds, as the last batch (the Lua writer's or this
   * sink's) left it */
  int64_t rev, from, count;
  uint64_t head, tail, size;
  double pid;               /* the lock key's value */
  long lock_ms;             /* and its time to live */
  int off;                  /* a batch failed: Lua writes from there */
  int torn;                 /* it failed after the log's state was written */
  char *buf;                /* scratch: a log entry, a slot's key */
  size_t cap;
};

static char *dup_bytes(const char *s, size_t len) {
  char *d = (char *)malloc(len + 1);
  if (d) {
    memcpy(d, s, len);
    d[len] = '\0';
  }
  return d;
}

void etcd3_sink_free(etcd3_sink *s) {
  if (!s) return;
  etcd3_feed_unref(s->feed);
  for (int i = 0; i < N_KEYS; i++) free(s->keys[i]);
  free(s->ns);
  free(s->buf);
  free(s);
}

/* The integer field `name` of the state table at idx. */
static int64_t int_field(lua_State *L, int idx, const char *name) {
  int64_t v;
  lua_getfield(L, idx, name);
  if (!lua_isnumber(L, -1)) luaL_error(L, "state:sink: field '%s' must be a number", name);
  v = (int64_t)lua_tonumber(L, -1);
  lua_pop(L, 1);
  return v;
}

/* The string field `name` of the state table at idx, copied (NULL on out
 * of memory; its type was checked). */
static char *string_field(lua_State *L, int idx, const char *name, size_t *len) {
  const char *v;
  lua_getfield(L, idx, name);
  v = lua_tolstring(L, -1, len);
  return dup_bytes(v, *len); /* (popped by the caller's settop) */
}

etcd3_sink *etcd3_sink_new(lua_State *L, int idx, const char **why) {
  etcd3_sink *s;
  void *udata = lua_touserdata(L, idx);
  int state = idx + 2, ok = 1, top = lua_gettop(L);
  int64_t rev, head, tail, from, size, count, pid, lock_ttl;
  *why = NULL;
  if (!udata) luaL_argerror(L, idx, "a shared dict's zone (its [1]) expected");
  if (!lua_isnil(L, idx + 1)) luaL_checkudata(L, idx + 1, ETCD3_FEED_MT);
  luaL_checktype(L, state, LUA_TTABLE);
  /* every check that may raise comes before anything is allocated */
  rev = int_field(L, state, "rev");
  head = int_field(L, state, "head");
  tail = int_field(L, state, "tail");
  from = int_field(L, state, "from");
  size = int_field(L, state, "size");
  count = int_field(L, state, "count");
  pid = int_field(L, state, "pid");
  lock_ttl = int_field(L, state, "lock_ttl");
  if (size < 1 || tail < 0 || head < tail) luaL_error(L, "state:sink: bad log state");
  lua_getfield(L, state, "ns");
  if (!lua_isnil(L, -1) && lua_type(L, -1) != LUA_TSTRING) luaL_error(L, "state:sink: field 'ns' must be a string");
  for (int i = 0; i < N_KEYS; i++) {
    lua_getfield(L, state, key_fields[i]);
    if (lua_type(L, -1) != LUA_TSTRING) luaL_error(L, "state:sink: field '%s' must be a string", key_fields[i]);
  }
  lua_settop(L, top);
  if (!etcd3_sink_available()) {
    *why = "lua-nginx-module's shared dict functions are not in this process";
    return NULL;
  }
  s = (etcd3_sink *)calloc(1, sizeof *s);
  if (!s) luaL_error(L, "out of memory");
  s->rev = rev;
  s->head = (uint64_t)head;
  s->tail = (uint64_t)tail;
  s->from = from;
  s->size = (uint64_t)size;
  s->count = count;
  s->pid = (double)pid;
  s->lock_ms = (long)lock_ttl * 1000;
  for (int i = 0; i < N_KEYS; i++) {
    s->keys[i] = string_field(L, state, key_fields[i], &s->key_lens[i]);
    ok = ok && s->keys[i];
  }
  lua_getfield(L, state, "ns");
  if (lua_type(L, -1) == LUA_TSTRING) {
    s->ns = string_field(L, state, "ns", &s->ns_len);
    ok = ok && s->ns;
  }
  lua_settop(L, top);
  s->cap = 256 + s->key_lens[K_ENTRY];
  s->buf = (char *)malloc(s->cap);
  if (!ok || !s->buf) {
    etcd3_sink_free(s);
    luaL_error(L, "out of memory");
  }
  s->zone = shdict.zone(udata);
  if (!s->zone) {
    etcd3_sink_free(s);
    luaL_argerror(L, idx, "not a shared dict's zone");
  }
  if (!lua_isnil(L, idx + 1)) s->feed = etcd3_feed_ref(L, idx + 1);
  return s;
}

/* ---- the dict ------------------------------------------------------------ */

static int put(etcd3_sink *s, int op, const char *key, size_t klen, int type, const char *str,
               size_t len, double num, long ms, int flags) {
  char *err = NULL;
  int forcible = 0;
  return shdict.store(s->zone, op, (const unsigned char *)key, klen, type, (const unsigned char *)str,
                      len, num, ms, flags, &err, &forcible) == NGX_OK;
}

static int put_number(etcd3_sink *s, int k, double v) {
  return put(s, OP_SAFE, s->keys[k], s->key_lens[k], T_NUMBER, NULL, 0, v, 0, 0);
}

static void drop(etcd3_sink *s, const char *key, size_t klen) {
  put(s, OP_SET, key, klen, T_NIL, NULL, 0, 0, 0, 0);
}

static int exists(etcd3_sink *s, const char *key, size_t klen) {
  return shdict.ttl(s->zone, (const unsigned char *)key, klen) != NGX_DECLINED;
}

/* The number at key k: 1, or 0 when absent or not a number. */
static int get_number(etcd3_sink *s, int k, double *v) {
  int type = T_NIL, flags = 0, stale = 0;
  unsigned char *buf = (unsigned char *)s->buf;
  size_t len = s->cap;
  char *err = NULL;
  if (shdict.get(s->zone, (const unsigned char *)s->keys[k], s->key_lens[k], &type, &buf, &len, v,
                 &flags, 0, &stale, &err) != NGX_OK)
    return 0;
  if (buf != (unsigned char *)s->buf) free(buf); /* (a long value: get allocated it) */
  return type == T_NUMBER;
}

/* Room for n bytes in the scratch buffer. */
static int reserve(etcd3_sink *s, size_t n) {
  char *grown;
  if (n <= s->cap) return 1;
  grown = (char *)realloc(s->buf, n);
  if (!grown) return 0;
  s->buf = grown;
  s->cap = n;
  return 1;
}

/* The key of the log's slot for `seq` in s->buf -> its length. */
static size_t slot_key(etcd3_sink *s, uint64_t seq) {
  size_t n = s->key_lens[K_ENTRY];
  memcpy(s->buf, s->keys[K_ENTRY], n);
  return n + (size_t)snprintf(s->buf + n, 24, "%" PRIu64, seq % s->size);
}

/* The revision in the entry of the log's slot for `seq` ("seq type
 * revision key"), or `otherwise`. */
static int64_t entry_revision(etcd3_sink *s, uint64_t seq, int64_t otherwise) {
  char head[64];
  unsigned char *buf = (unsigned char *)head;
  size_t len = sizeof head, klen = slot_key(s, seq), i = 0;
  int type = T_NIL, flags = 0, stale = 0, fields = 0;
  double num;
  char *err = NULL;
  int64_t rev = 0;
  if (shdict.get(s->zone, (const unsigned char *)s->buf, klen, &type, &buf, &len, &num, &flags, 0,
                 &stale, &err) != NGX_OK)
    return otherwise;
  /* past two spaces, the digits up to the third */
  for (; i < len && fields < 2; i++)
    if (buf[i] == ' ') fields++;
  if (type != T_STRING || fields < 2 || i >= len || buf[i] < '0' || buf[i] > '9') rev = -1;
  for (; rev >= 0 && i < len && buf[i] != ' '; i++)
    rev = buf[i] >= '0' && buf[i] <= '9' ? rev * 10 + (buf[i] - '0') : -1;
  if (buf != (unsigned char *)head) free(buf); /* (a long value: get allocated it) */
  return rev >= 0 && i < len ? rev : otherwise;
}

/* Appends one change to the log (ngx.lua's Writer:append): 0 when its
 * entry does not fit. */
static int append(etcd3_sink *s, uint64_t *head, uint64_t *tail, int64_t *from, char kind, int64_t rev,
                  const char *key, size_t klen) {
  uint64_t seq = *head;
  size_t n, at = s->key_lens[K_ENTRY] + 24; /* the entry's text goes after its slot's key */
  if (!reserve(s, at + 64 + klen)) return 0;
  if (seq - *tail >= s->size) {
    int64_t oldest = entry_revision(s, seq, rev);
    *tail = seq - s->size + 1;
    if (oldest > *from) *from = oldest;
  }
  n = slot_key(s, seq);
  {
    char *text = s->buf + at;
    size_t len = (size_t)snprintf(text, 64, "%" PRIu64 " %c %" PRId64 " ", seq, kind, rev);
    memcpy(text + len, key, klen);
    if (!put(s, OP_SAFE, s->buf, n, T_STRING, text, len + klen, 0, 0, 0)) return 0;
  }
  *head = seq + 1;
  return 1;
}

int etcd3_sink_apply(etcd3_sink *s, const event_batch *b, int64_t floor) {
  uint64_t head = s->head, tail = s->tail;
  int64_t from = s->from, count = s->count, rev = s->rev;
  double current;
  int locked = 0, ok = 0;
  if (s->off) return 0;
  /* the lock first, as the Lua writer takes it: a writer of another
   * process (an old worker in a reload) could otherwise write the dict
   * whole between the checks below and this batch. Never by evicting a
   * key of the copy (OP_SAFE): in a full dict Lua takes it over. */
  if (!put(s, OP_ADD | OP_SAFE, s->keys[K_LOCK], s->key_lens[K_LOCK], T_NUMBER, NULL, 0, s->pid, s->lock_ms,
           0))
    goto done;
  locked = 1;
  /* the dict is where this sink (or the Lua writer) left it */
  if (!get_number(s, K_REV, &current) || (int64_t)current != s->rev) goto done;
  /* and names this process as its writer: another one wrote since, and
   * the Lua writer writes its name again */
  if (!get_number(s, K_WRITER, &current) || current != s->pid) goto done;
  for (const response_node *node = b->responses.head; node; node = node->next) {
    for (size_t i = 0; i < node->resp->n_events; i++) {
      const Mvccpb__Event *ev = node->resp->events[i];
      const Mvccpb__KeyValue *kv = ev->kv;
      const char *key;
      size_t klen;
      int had;
      if (!kv || kv->mod_revision <= floor) continue;
      if (kv->key.len <= s->ns_len || kv->key.len - s->ns_len > KEY_MAX ||
          (s->ns_len && memcmp(kv->key.data, s->ns, s->ns_len) != 0))
        goto done;
      key = (const char *)kv->key.data + s->ns_len;
      klen = kv->key.len - s->ns_len;
      had = exists(s, key, klen);
      if (ev->type == MVCCPB__EVENT__EVENT_TYPE__PUT) {
        /* (the dict's flags hold the mod revision modulo 2^32) */
        if (!put(s, OP_SAFE, key, klen, T_STRING, kv->value.len ? (const char *)kv->value.data : "",
                 kv->value.len, 0, 0, (int)(uint32_t)kv->mod_revision))
          goto done;
        if (!had) count++;
      } else if (had) {
        drop(s, key, klen);
        count--;
      }
      /* (a delete of a key the copy does not hold changes nothing) */
      if ((ev->type == MVCCPB__EVENT__EVENT_TYPE__PUT || had) &&
          !append(s, &head, &tail, &from, ev->type == MVCCPB__EVENT__EVENT_TYPE__PUT ? 'P' : 'D',
                  kv->mod_revision, key, klen))
        goto done;
      if (kv->mod_revision > rev) rev = kv->mod_revision;
    }
  }
  /* the log's state, then the revision: a reader reads the revision first,
   * so the log it reads next holds every change up to it */
  {
    char text[96];
    size_t n = (size_t)snprintf(text, sizeof text, "%" PRIu64 " %" PRIu64 " %" PRId64 " %" PRIu64, head,
                                tail, from, s->size);
    if (!put(s, OP_SAFE, s->keys[K_LOG], s->key_lens[K_LOG], T_STRING, text, n, 0, 0, 0)) goto done;
  }
  if (!put_number(s, K_REV, (double)rev) || (count != s->count && !put_number(s, K_COUNT, (double)count))) {
    s->torn = 1; /* the log's state moved without its revision: Lua rewrites it all */
    goto done;
  }
  s->head = head;
  s->tail = tail;
  s->from = from;
  s->count = count;
  s->rev = rev;
  ok = 1;
done:
  if (locked) drop(s, s->keys[K_LOCK], s->key_lens[K_LOCK]);
  if (!ok) {
    s->off = 1;
    return 0;
  }
  if (s->feed) etcd3_feed_post(s->feed);
  return 1;
}

int etcd3_sink_push_free(lua_State *L, etcd3_sink *s) {
  etcd3_sink copy = *s;
  etcd3_sink_free(s);
  if (copy.torn) {
    lua_pushboolean(L, 0);
    return 1;
  }
  lua_pushnumber(L, (lua_Number)copy.rev);
  lua_pushnumber(L, (lua_Number)copy.head);
  lua_pushnumber(L, (lua_Number)copy.tail);
  lua_pushnumber(L, (lua_Number)copy.from);
  lua_pushnumber(L, (lua_Number)copy.count);
  return 5;
}
