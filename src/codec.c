/*
 * codec.c - Lua tables <-> protobuf-c messages, driven by the descriptors.
 *
 * One generic codec serves every etcd RPC: it walks protobuf-c's message
 * descriptors, so a request is a Lua table whose keys are the proto field
 * names in snake_case ("dbSize" -> "db_size", "ID" -> "id") and a response
 * comes back as such a table. The pure-Lua layer shapes options into request
 * tables; the codec only moves data.
 *
 * Value rules (README.md, "Conventions"):
 *  - bytes and strings are Lua strings, binary-safe;
 *  - 64-bit IDs (fields named id, *_id but watch_id, lease, leader) are
 *    lower-case hex strings as etcdctl 3.4 prints them: lease IDs with 16
 *    digits (%016x), member, cluster and leader IDs without leading zeros
 *    (%x). Encoding takes 1 to 16 hex digits in any case, or an integer on
 *    5.3+. An ID of 0 is left out of a decoded table ("lease absent when
 *    none");
 *  - other integers are Lua integers on 5.3+, numbers on LuaJIT;
 *  - enums are their proto names ("PUT", "ASCEND"); numbers are accepted.
 *
 * Memory: encoding allocates from an arena userdata on the Lua stack, so a
 * luaL_error raised half-way (a wrong type deep in a table) leaks nothing:
 * the arena's __gc frees it. Decoding keeps the unpacked message in a boxed
 * userdata for the same reason. Both are made once per Lua state and
 * reused, and serve a small message from a buffer of their own (a get
 * costs no malloc on either side; "kept userdata" below).
 *
 * The same file packs and unpacks messages to and from gRPC byte buffers
 * for every call and stream (etcd3_pack, etcd3_unpack).
 */
#include <ctype.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/slice.h>

#include "auxiliar.h"
#include "codec.h"
#include "rpc.pb-c.h"

/* ---- field names ------------------------------------------------------ */

/* The codec's tables are static storage sized by hand, not malloc: Lua
 * unloads the module at exit, and memory only a static of an unloaded
 * module points to would dangle (and show as a leak). Each size below is
 * checked against the descriptors when the tables are built, at
 * require "etcd3.core": protos that outgrow one make require fail with a
 * message that names the limit to raise (tables_fail), never a silent
 * truncation or an overflow. */

/* Bytes of a field's snake_case name, with its NUL (etcd 3.4: 22). */
#define NAME_MAX_LEN 64

enum { NOT_AN_ID, MEMBER_ID, LEASE_ID };

/* What the codec needs of a field, worked out once per process: its
 * snake_case name and whether it holds a 64-bit ID (and which kind). */
typedef struct field_info {
  char name[NAME_MAX_LEN];
  int id_kind;
} field_info;

typedef struct message_info {
  const ProtobufCMessageDescriptor *d;
  field_info *fields;        /* in descriptor order */
  unsigned *by_name;         /* field indexes in name order (encoding) */
} message_info;

/* The first limit the descriptors exceed, or NULL (see above). */
static const char *tables_error;
static char tables_error_text[200];

#if defined(__GNUC__)
__attribute__((format(printf, 1, 2)))
#endif
static void tables_fail(const char *fmt, ...) {
  va_list ap;
  int n;
  if (tables_error) return;
  n = snprintf(tables_error_text, sizeof tables_error_text, "etcd3: codec: ");
  va_start(ap, fmt);
  vsnprintf(tables_error_text + n, sizeof tables_error_text - (size_t)n, fmt, ap);
  va_end(ap);
  tables_error = tables_error_text;
}

/* Writes the snake_case form of a proto field name into out (NAME_MAX_LEN
 * bytes); returns the length it takes, written only when it fits. */
static size_t snake_name(const char *name, char *out) {
  size_t n = 0;
  for (size_t i = 0; name[i]; i++) {
    unsigned char c = (unsigned char)name[i];
    if (isupper(c)) {
      unsigned char prev = i > 0 ? (unsigned char)name[i - 1] : '_';
      if (islower(prev) || isdigit(prev)) {
        if (n + 1 < NAME_MAX_LEN) out[n] = '_';
        n++;
      }
      c = (unsigned char)tolower(c);
    }
    if (n + 1 < NAME_MAX_LEN) out[n] = (char)c;
    n++;
  }
  out[n < NAME_MAX_LEN ? n : NAME_MAX_LEN - 1] = '\0';
  return n;
}

/* 64-bit IDs: fields named id, lease, leader or *_id but watch_id. Leases
 * are printed as etcdctl 3.4 does (%016x), members and clusters as %x. */
static int id_kind(const ProtobufCMessageDescriptor *d, const ProtobufCFieldDescriptor *f,
                   const char *snake) {
  size_t len = strlen(snake);
  if (f->type != PROTOBUF_C_TYPE_INT64 && f->type != PROTOBUF_C_TYPE_UINT64) return NOT_AN_ID;
  if (strcmp(snake, "id") != 0 && strcmp(snake, "lease") != 0 && strcmp(snake, "leader") != 0 &&
      !(len > 3 && strcmp(snake + len - 3, "_id") == 0 && strcmp(snake, "watch_id") != 0))
    return NOT_AN_ID;
  if (strcmp(snake, "lease") == 0 || strncmp(d->short_name, "Lease", 5) == 0) return LEASE_ID;
  return MEMBER_ID;
}

/* Every message type the RPCs reach, indexed by descriptor: built once,
 * read-only afterwards (no lock on the way). An open-addressing table kept
 * at most half full (etcd 3.4's RPCs reach 92 types). */
#define INFO_SLOTS 1024
static message_info infos[INFO_SLOTS];
static size_t infos_used;
static pthread_once_t tables_once = PTHREAD_ONCE_INIT;

static size_t info_slot(const ProtobufCMessageDescriptor *d) {
  return (size_t)(((uintptr_t)d >> 4) * 0x9E3779B97F4A7C15ULL >> 40) & (INFO_SLOTS - 1);
}

static const field_info *sort_fields; /* for the qsort below (once, one thread) */
static int by_field_name(const void *a, const void *b) {
  return strcmp(sort_fields[*(const unsigned *)a].name, sort_fields[*(const unsigned *)b].name);
}

/* The fields of every message type, back to back (etcd 3.4: 209). */
#define FIELD_POOL 4096
static field_info field_pool[FIELD_POOL];
static unsigned name_pool[FIELD_POOL];
static size_t pool_used;

static void add_info(const ProtobufCMessageDescriptor *d) {
  size_t slot = info_slot(d);
  message_info *m;
  while (infos[slot].d && infos[slot].d != d) slot = (slot + 1) & (INFO_SLOTS - 1);
  if (infos[slot].d || tables_error) return; /* known, or given up */
  if (2 * (infos_used + 1) > INFO_SLOTS) {
    tables_fail("INFO_SLOTS (%d) must be at least twice the message types the RPCs "
                "reach (more than %zu): raise it in src/codec.c", INFO_SLOTS, infos_used);
    return;
  }
  if (pool_used + d->n_fields > FIELD_POOL) {
    tables_fail("FIELD_POOL (%d) is too small for the fields of the RPCs' messages "
                "(at least %zu): raise it in src/codec.c", FIELD_POOL, pool_used + d->n_fields);
    return;
  }
  m = &infos[slot];
  m->fields = field_pool + pool_used;
  m->by_name = name_pool + pool_used;
  pool_used += d->n_fields;
  infos_used++;
  m->d = d;
  for (unsigned i = 0; i < d->n_fields; i++) {
    size_t len = snake_name(d->fields[i].name, m->fields[i].name);
    if (len >= NAME_MAX_LEN) {
      tables_fail("NAME_MAX_LEN (%d) is too small for field %s.%s (%zu bytes): "
                  "raise it in src/codec.c", NAME_MAX_LEN, d->name, d->fields[i].name, len + 1);
      return;
    }
    m->fields[i].id_kind = id_kind(d, &d->fields[i], m->fields[i].name);
    m->by_name[i] = i;
  }
  sort_fields = m->fields;
  qsort(m->by_name, d->n_fields, sizeof *m->by_name, by_field_name);
  for (unsigned i = 0; i < d->n_fields; i++)
    if (d->fields[i].type == PROTOBUF_C_TYPE_MESSAGE)
      add_info((const ProtobufCMessageDescriptor *)d->fields[i].descriptor);
}

/* The etcd services whose RPCs the client may call: one line here makes
 * every method of a service callable by name ("KV.Range") and known to
 * the codec (and to the fuzz targets, fuzz/fuzz.h). */
static const ProtobufCServiceDescriptor *const services[] = {
  &etcdserverpb__kv__descriptor,      &etcdserverpb__watch__descriptor,
  &etcdserverpb__lease__descriptor,   &etcdserverpb__cluster__descriptor,
  &etcdserverpb__maintenance__descriptor, &etcdserverpb__auth__descriptor,
};
#define N_SERVICES (sizeof services / sizeof services[0])

const ProtobufCServiceDescriptor *const *etcd3_services(size_t *n) {
  *n = N_SERVICES;
  return services;
}

static void build_paths(void);

/* The codec's tables, built once (tables_once), or tables_error. */
static void build_tables(void) {
  for (size_t s = 0; s < N_SERVICES; s++) {
    for (unsigned k = 0; k < services[s]->n_methods; k++) {
      add_info(services[s]->methods[k].input);
      add_info(services[s]->methods[k].output);
    }
  }
  build_paths();
}

/* The field names of message type d (every type an RPC reaches). */
static const message_info *info_of(lua_State *L, const ProtobufCMessageDescriptor *d) {
  size_t slot;
  pthread_once(&tables_once, build_tables);
  for (slot = info_slot(d); infos[slot].d; slot = (slot + 1) & (INFO_SLOTS - 1))
    if (infos[slot].d == d) return &infos[slot];
  luaL_error(L, "etcd3: message type %s is not one of etcd's RPCs", d->name);
  return NULL;
}

/* The field of d named `name` (a Lua string), or -1. */
static int field_by_name(const message_info *m, const char *name) {
  unsigned lo = 0, hi = m->d->n_fields;
  while (lo < hi) {
    unsigned mid = (lo + hi) / 2;
    int c = strcmp(name, m->fields[m->by_name[mid]].name);
    if (c == 0) return (int)m->by_name[mid];
    if (c < 0) hi = mid;
    else lo = mid + 1;
  }
  return -1;
}

/* ---- kept userdata ----------------------------------------------------- */

/* The encoding arena and the decode box are made once per Lua state and
 * reused: kept in the registry between uses, and taken out of it during
 * one. A use nested in another (a finalizer the GC runs half-way) makes
 * one of its own; one a raise leaves behind is collected, its __gc
 * freeing what it holds. */

/* Pushes the userdata kept under key and takes it out of the registry;
 * returns NULL, pushing nothing, when none is kept. */
static void *take_kept(lua_State *L, void *key) {
  void *u;
  lua_pushlightuserdata(L, key);
  lua_rawget(L, LUA_REGISTRYINDEX); /* stack: ..., userdata or nil */
  u = lua_touserdata(L, -1);
  if (!u) {
    lua_pop(L, 1);
    return NULL;
  }
  lua_pushlightuserdata(L, key);
  lua_pushnil(L);
  lua_rawset(L, LUA_REGISTRYINDEX);
  return u;
}

/* Keeps the userdata at idx under key for the next use. */
static void keep(lua_State *L, void *key, int idx) {
  idx = lua_absindex(L, idx);
  lua_pushlightuserdata(L, key);
  lua_pushvalue(L, idx);
  lua_rawset(L, LUA_REGISTRYINDEX);
}

/* The arena and the box hand out memory from a buffer of their own while
 * it lasts: `size` bytes at the next 8-byte boundary past *used (as much
 * alignment as protobuf-c's fields need), or NULL when they do not fit. */
static void *bump(char *buffer, size_t capacity, size_t *used, size_t size) {
  size_t at = (*used + 7) & ~(size_t)7;
  if (size > capacity || at > capacity - size) return NULL;
  *used = at + size;
  return buffer + at;
}

/* ---- arena ------------------------------------------------------------ */

/* A request's messages fit in the arena's own buffer (a get or a put
 * takes about a hundred bytes); what does not goes in calloc'd blocks. */
#define ARENA_BUFFER 1024

typedef struct arena_block {
  struct arena_block *next;
  /* payload follows, max-aligned */
} arena_block;

typedef struct arena {
  arena_block *blocks;
  size_t used; /* bytes of buffer handed out */
  union {
    uint64_t align; /* 8-byte aligned, like what bump() hands out */
    void *pointer;
    double number;
    char bytes[ARENA_BUFFER];
  } buffer;
} arena;

static void arena_release(arena *a) {
  while (a->blocks) {
    arena_block *next = a->blocks->next;
    free(a->blocks);
    a->blocks = next;
  }
  a->used = 0;
}

static int arena_gc(lua_State *L) {
  arena_release((arena *)luaL_checkudata(L, 1, ETCD3_ARENA_MT));
  return 0;
}

/* Pushes an empty arena userdata (the state's kept one when it is free). */
static char arena_key;
int etcd3_arena_new(lua_State *L) {
  if (!take_kept(L, &arena_key)) {
    arena *a = (arena *)lua_newuserdata(L, sizeof(arena));
    a->blocks = NULL;
    a->used = 0;
    luaL_setmetatable(L, ETCD3_ARENA_MT);
  }
  return lua_gettop(L);
}

/* Zeroed memory that lives until the arena is freed or collected. */
void *etcd3_arena_alloc(lua_State *L, int arena_idx, size_t size) {
  arena *a = (arena *)luaL_checkudata(L, arena_idx, ETCD3_ARENA_MT);
  size_t head = (sizeof(arena_block) + 15) & ~(size_t)15;
  void *p = bump(a->buffer.bytes, ARENA_BUFFER, &a->used, size);
  arena_block *b;
  if (p) return memset(p, 0, size);
  b = (arena_block *)calloc(1, head + size);
  if (!b) luaL_error(L, "etcd3: out of memory");
  b->next = a->blocks;
  a->blocks = b;
  return (char *)b + head;
}

/* Frees what the arena holds and keeps it for the next encoding (the
 * caller only pops it after this). */
void etcd3_arena_free(lua_State *L, int arena_idx) {
  arena_release((arena *)luaL_checkudata(L, arena_idx, ETCD3_ARENA_MT));
  keep(L, &arena_key, arena_idx);
}

/* ---- encoding --------------------------------------------------------- */

/* Messages nest at most this deep (a transaction inside a transaction ...
 * counts two per level): the codec and protobuf-c recurse once per level,
 * so an unbounded depth overflows the C stack instead of raising. */
#define MAX_DEPTH 100

static size_t element_size(ProtobufCType t) {
  switch (t) {
    case PROTOBUF_C_TYPE_INT32: case PROTOBUF_C_TYPE_SINT32:
    case PROTOBUF_C_TYPE_SFIXED32: case PROTOBUF_C_TYPE_UINT32:
    case PROTOBUF_C_TYPE_FIXED32: case PROTOBUF_C_TYPE_FLOAT:
    case PROTOBUF_C_TYPE_ENUM:
      return 4;
    case PROTOBUF_C_TYPE_BOOL:
      return sizeof(protobuf_c_boolean);
    case PROTOBUF_C_TYPE_BYTES:
      return sizeof(ProtobufCBinaryData);
    case PROTOBUF_C_TYPE_STRING: case PROTOBUF_C_TYPE_MESSAGE:
      return sizeof(void *);
    default:
      return 8;
  }
}

static int field_error(lua_State *L, const char *field, const char *expected,
                       int idx) {
  return luaL_error(L, "etcd3: field '%s': %s expected, got %s", field,
                    expected, luaL_typename(L, idx));
}

/* A 64-bit value from a Lua integer, or from a hex string for ID fields. */
static uint64_t check_u64(lua_State *L, int idx, const char *field, int is_id) {
  if (is_id && lua_type(L, idx) == LUA_TSTRING) {
    size_t len;
    const char *s = lua_tolstring(L, idx, &len);
    uint64_t v;
    if (!etcd3_parse_id(s, len, &v))
      luaL_error(L, "etcd3: field '%s': bad ID '%s' (up to 16 hex digits)", field, s);
    return v;
  }
  if (lua_type(L, idx) != LUA_TNUMBER)
    field_error(L, field, is_id ? "ID (hex string or integer)" : "integer",
                idx);
#if ETCD3_HAS_INTEGERS
  {
    int isnum;
    lua_Integer v = lua_tointegerx(L, idx, &isnum);
    if (!isnum) field_error(L, field, "integer", idx);
    return (uint64_t)v;
  }
#else
  {
    lua_Number n = lua_tonumber(L, idx);
    if (n != (lua_Number)(int64_t)n) field_error(L, field, "integer", idx);
    return (uint64_t)(int64_t)n;
  }
#endif
}

/* Every character a hex digit, 1 to 16 of them: nothing else is an ID
 * (no sign, no 0x, no spaces, which strtoull would let through). */
int etcd3_parse_id(const char *s, size_t len, uint64_t *id) {
  uint64_t v = 0;
  if (len == 0 || len > 16) return 0;
  for (size_t i = 0; i < len; i++) {
    int c = (unsigned char)s[i];
    if (!isxdigit(c)) return 0;
    v = v << 4 | (uint64_t)(isdigit(c) ? c - '0' : tolower(c) - 'a' + 10);
  }
  *id = v;
  return 1;
}

/* An ID argument of a Lua function: a hex string or an integer. */
uint64_t etcd3_check_id(lua_State *L, int idx) {
  if (lua_type(L, idx) == LUA_TSTRING) {
    size_t len;
    const char *s = lua_tolstring(L, idx, &len);
    uint64_t v;
    if (!etcd3_parse_id(s, len, &v)) luaL_argerror(L, idx, "bad ID (up to 16 hex digits)");
    return v;
  }
  return check_u64(L, idx, "id", 1);
}

static void encode_table(lua_State *L, int idx,
                         const ProtobufCMessageDescriptor *d,
                         ProtobufCMessage *msg, int arena_idx, int depth);

/* Stores the Lua value at idx into *slot, as field f describes. */
static void encode_value(lua_State *L, int idx,
                         const ProtobufCFieldDescriptor *f, const char *field,
                         int is_id, void *slot, int arena_idx, int depth) {
  switch (f->type) {
    case PROTOBUF_C_TYPE_INT32: case PROTOBUF_C_TYPE_SINT32:
    case PROTOBUF_C_TYPE_SFIXED32: case PROTOBUF_C_TYPE_UINT32:
    case PROTOBUF_C_TYPE_FIXED32:
      *(uint32_t *)slot = (uint32_t)check_u64(L, idx, field, 0);
      break;
    case PROTOBUF_C_TYPE_INT64: case PROTOBUF_C_TYPE_SINT64:
    case PROTOBUF_C_TYPE_SFIXED64: case PROTOBUF_C_TYPE_UINT64:
    case PROTOBUF_C_TYPE_FIXED64:
      *(uint64_t *)slot = check_u64(L, idx, field, is_id);
      break;
    case PROTOBUF_C_TYPE_BOOL:
      if (lua_type(L, idx) != LUA_TBOOLEAN) field_error(L, field, "boolean", idx);
      *(protobuf_c_boolean *)slot = lua_toboolean(L, idx);
      break;
    case PROTOBUF_C_TYPE_FLOAT:
      *(float *)slot = (float)luaL_checknumber(L, idx);
      break;
    case PROTOBUF_C_TYPE_DOUBLE:
      *(double *)slot = luaL_checknumber(L, idx);
      break;
    case PROTOBUF_C_TYPE_ENUM: {
      const ProtobufCEnumDescriptor *ed =
          (const ProtobufCEnumDescriptor *)f->descriptor;
      if (lua_type(L, idx) == LUA_TSTRING) {
        const ProtobufCEnumValue *v =
            protobuf_c_enum_descriptor_get_value_by_name(ed, lua_tostring(L, idx));
        if (!v)
          luaL_error(L, "etcd3: field '%s': unknown value '%s'", field,
                     lua_tostring(L, idx));
        *(int *)slot = v->value;
      } else {
        *(int *)slot = (int)check_u64(L, idx, field, 0);
      }
      break;
    }
    case PROTOBUF_C_TYPE_STRING:
      if (lua_type(L, idx) != LUA_TSTRING) field_error(L, field, "string", idx);
      /* The string stays alive: the request table references it. */
      *(const char **)slot = lua_tostring(L, idx);
      break;
    case PROTOBUF_C_TYPE_BYTES: {
      ProtobufCBinaryData *b = (ProtobufCBinaryData *)slot;
      size_t len;
      if (lua_type(L, idx) != LUA_TSTRING) field_error(L, field, "string", idx);
      b->data = (uint8_t *)(uintptr_t)lua_tolstring(L, idx, &len);
      b->len = len;
      break;
    }
    case PROTOBUF_C_TYPE_MESSAGE: {
      const ProtobufCMessageDescriptor *sub =
          (const ProtobufCMessageDescriptor *)f->descriptor;
      ProtobufCMessage *m;
      if (lua_type(L, idx) != LUA_TTABLE) field_error(L, field, "table", idx);
      m = (ProtobufCMessage *)etcd3_arena_alloc(L, arena_idx, sub->sizeof_message);
      sub->message_init(m);
      encode_table(L, idx, sub, m, arena_idx, depth + 1);
      *(ProtobufCMessage **)slot = m;
      break;
    }
  }
}

/* Fills msg from the table at idx (read raw: metatables play no part, and
 * only the keys the table has are looked at); keys the descriptor does not
 * know are ignored (the Lua layer checks user options before they get
 * here). */
static void encode_table(lua_State *L, int idx,
                         const ProtobufCMessageDescriptor *d,
                         ProtobufCMessage *msg, int arena_idx, int depth) {
  const message_info *info = info_of(L, d);
  char *base = (char *)msg;
  idx = lua_absindex(L, idx);
  if (depth > MAX_DEPTH)
    luaL_error(L, "etcd3: request nested too deeply (over %d messages)", MAX_DEPTH);
  luaL_checkstack(L, 8, "etcd3: request nested too deeply");
  lua_pushnil(L);
  while (lua_next(L, idx)) { /* stack: ..., key, value */
    const ProtobufCFieldDescriptor *f;
    const char *name;
    int i, is_id;
    /* a value is referenced by the table while it is encoded: pointers
     * into its strings stay valid */
    if (lua_type(L, -2) != LUA_TSTRING || lua_isnil(L, -1) ||
        (i = field_by_name(info, lua_tostring(L, -2))) < 0) {
      lua_pop(L, 1);
      continue;
    }
    f = &d->fields[i];
    name = info->fields[i].name;
    is_id = info->fields[i].id_kind != NOT_AN_ID;
    if (f->label == PROTOBUF_C_LABEL_REPEATED) {
      size_t n, size = element_size(f->type);
      char *elems;
      if (lua_type(L, -1) != LUA_TTABLE) field_error(L, name, "array", -1);
      n = lua_rawlen(L, -1);
      elems = n ? (char *)etcd3_arena_alloc(L, arena_idx, n * size) : NULL;
      for (size_t k = 0; k < n; k++) {
        lua_rawgeti(L, -1, (int)k + 1); /* stack: ..., key, array, element */
        encode_value(L, lua_gettop(L), f, name, is_id, elems + k * size, arena_idx, depth);
        lua_pop(L, 1);
      }
      *(size_t *)(base + f->quantifier_offset) = n;
      *(void **)(base + f->offset) = elems;
    } else {
      encode_value(L, lua_gettop(L), f, name, is_id, base + f->offset, arena_idx, depth);
      if (f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF)
        *(uint32_t *)(base + f->quantifier_offset) = f->id;
      else if (f->label == PROTOBUF_C_LABEL_OPTIONAL &&
               f->type != PROTOBUF_C_TYPE_MESSAGE &&
               f->type != PROTOBUF_C_TYPE_STRING)
        *(protobuf_c_boolean *)(base + f->quantifier_offset) = 1;
    }
    lua_pop(L, 1);
  }
}

/* Encodes the table at idx as a message of type d, allocated in the arena
 * at arena_idx (stays valid until that arena is freed). */
ProtobufCMessage *etcd3_encode(lua_State *L, int idx,
                               const ProtobufCMessageDescriptor *d,
                               int arena_idx) {
  ProtobufCMessage *msg;
  luaL_checktype(L, idx, LUA_TTABLE);
  msg = (ProtobufCMessage *)etcd3_arena_alloc(L, arena_idx, d->sizeof_message);
  d->message_init(msg);
  encode_table(L, idx, d, msg, arena_idx, 1);
  return msg;
}

/* ---- decoding --------------------------------------------------------- */

/* Bytes of an unpacked reply kept inside its box: a get's reply and its
 * key-value take a few hundred; larger replies go on in malloc'd memory. */
#define DECODE_BUFFER 2048

/* A decoded message on the Lua stack while it is turned into a table: a
 * raise half-way (out of memory, stack overflow) frees it in __gc.
 * protobuf-c allocates the message from the box's buffer while it fits
 * (no malloc, no free_unpacked walk), and past it from malloc ("spilled"). */
typedef struct decoded {
  ProtobufCMessage *msg;
  ProtobufCAllocator allocator; /* allocator_data: the box */
  size_t used;                  /* bytes of buffer handed out */
  int spilled;                  /* a part of msg is malloc'd */
  union {
    uint64_t align; /* 8-byte aligned, like what bump() hands out */
    void *pointer;
    double number;
    char bytes[DECODE_BUFFER];
  } buffer;
} decoded;

static void *box_alloc(void *data, size_t size) {
  decoded *box = (decoded *)data;
  void *p = bump(box->buffer.bytes, DECODE_BUFFER, &box->used, size);
  if (p) return p;
  box->spilled = 1;
  return malloc(size);
}

static void box_free(void *data, void *pointer) {
  decoded *box = (decoded *)data;
  uintptr_t p = (uintptr_t)pointer, start = (uintptr_t)box->buffer.bytes;
  if (p < start || p >= start + DECODE_BUFFER) free(pointer);
}

static void decoded_free(decoded *box) {
  /* only what spilled needs the walk: the buffer is reused as it is */
  if (box->msg && box->spilled) protobuf_c_message_free_unpacked(box->msg, &box->allocator);
  box->msg = NULL;
  box->used = 0;
  box->spilled = 0;
}

static int decoded_gc(lua_State *L) {
  decoded_free((decoded *)luaL_checkudata(L, 1, ETCD3_DECODED_MT));
  return 0;
}

static void push_i64(lua_State *L, int64_t v) {
#if ETCD3_HAS_INTEGERS
  lua_pushinteger(L, (lua_Integer)v);
#else
  lua_pushnumber(L, (lua_Number)v);
#endif
}


/* Pushes v in lower-case hex as etcdctl 3.4 prints IDs: leases with 16
 * digits (%016x), members and clusters without leading zeros (%x). By hand:
 * snprintf cost more than the rest of a response header (two IDs in every
 * response). */
static void push_hex(lua_State *L, uint64_t v, int sixteen) {
  static const char digits[] = "0123456789abcdef";
  char hex[16];
  int first = 16;
  do {
    hex[--first] = digits[v & 15];
    v >>= 4;
  } while (v);
  if (sixteen) while (first > 0) hex[--first] = '0';
  lua_pushlstring(L, hex + first, (size_t)(16 - first));
}

static void push_message(lua_State *L, const ProtobufCMessage *msg, int names);

/* Pushes the value in slot; returns 0 (pushing nothing) for an ID of 0.
 * is_id: an id_kind (MEMBER_ID or LEASE_ID print differently); names: the
 * stack index of the field names (push_names). */
static int push_value(lua_State *L, const ProtobufCFieldDescriptor *f,
                      int is_id, const void *slot, int names) {
  switch (f->type) {
    case PROTOBUF_C_TYPE_INT32: case PROTOBUF_C_TYPE_SINT32:
    case PROTOBUF_C_TYPE_SFIXED32:
      push_i64(L, *(const int32_t *)slot);
      break;
    case PROTOBUF_C_TYPE_UINT32: case PROTOBUF_C_TYPE_FIXED32:
      push_i64(L, *(const uint32_t *)slot);
      break;
    case PROTOBUF_C_TYPE_INT64: case PROTOBUF_C_TYPE_SINT64:
    case PROTOBUF_C_TYPE_SFIXED64: case PROTOBUF_C_TYPE_UINT64:
    case PROTOBUF_C_TYPE_FIXED64: {
      uint64_t v = *(const uint64_t *)slot;
      if (is_id) {
        if (v == 0) return 0;
        push_hex(L, v, is_id == LEASE_ID);
      } else {
        push_i64(L, (int64_t)v);
      }
      break;
    }
    case PROTOBUF_C_TYPE_BOOL:
      lua_pushboolean(L, *(const protobuf_c_boolean *)slot);
      break;
    case PROTOBUF_C_TYPE_FLOAT:
      lua_pushnumber(L, *(const float *)slot);
      break;
    case PROTOBUF_C_TYPE_DOUBLE:
      lua_pushnumber(L, *(const double *)slot);
      break;
    case PROTOBUF_C_TYPE_ENUM: {
      const ProtobufCEnumValue *v = protobuf_c_enum_descriptor_get_value(
          (const ProtobufCEnumDescriptor *)f->descriptor, *(const int *)slot);
      if (v) lua_pushstring(L, v->name);
      else push_i64(L, *(const int *)slot);
      break;
    }
    case PROTOBUF_C_TYPE_STRING: {
      const char *s = *(const char *const *)slot;
      lua_pushstring(L, s ? s : "");
      break;
    }
    case PROTOBUF_C_TYPE_BYTES: {
      const ProtobufCBinaryData *b = (const ProtobufCBinaryData *)slot;
      lua_pushlstring(L, (const char *)b->data, b->len);
      break;
    }
    case PROTOBUF_C_TYPE_MESSAGE: {
      const ProtobufCMessage *m = *(const ProtobufCMessage *const *)slot;
      if (!m) return 0;
      push_message(L, m, names);
      break;
    }
  }
  return 1;
}

/* The field names of every message type as Lua strings, so a decoded
 * table is filled without hashing a C string per field: one table per Lua
 * state (in the registry), indexed by a field's place in field_pool + 1,
 * each name made on first use. Pushes it (stack: ..., names). */
static char names_key;
static void push_names(lua_State *L) {
  lua_pushlightuserdata(L, &names_key);
  lua_rawget(L, LUA_REGISTRYINDEX); /* stack: ..., names */
  if (lua_isnil(L, -1)) {
    lua_pop(L, 1);
    lua_newtable(L);
    lua_pushlightuserdata(L, &names_key);
    lua_pushvalue(L, -2);
    lua_rawset(L, LUA_REGISTRYINDEX);
  }
}

/* Pushes msg as a table; names: the stack index of push_names' table. */
static void push_message(lua_State *L, const ProtobufCMessage *msg, int names) {
  const ProtobufCMessageDescriptor *d = msg->descriptor;
  const message_info *info = info_of(L, d);
  const char *base = (const char *)msg;
  int first_name = (int)(info->fields - field_pool) + 1, table;
  luaL_checkstack(L, 8, "etcd3: response nested too deeply");
  lua_createtable(L, 0, (int)d->n_fields); /* stack: ..., table */
  table = lua_gettop(L);
  for (unsigned i = 0; i < d->n_fields; i++) {
    const ProtobufCFieldDescriptor *f = &d->fields[i];
    int is_id = info->fields[i].id_kind;
    if ((f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF) &&
        *(const uint32_t *)(base + f->quantifier_offset) != f->id)
      continue;
    if (f->label == PROTOBUF_C_LABEL_OPTIONAL &&
        f->type != PROTOBUF_C_TYPE_MESSAGE && f->type != PROTOBUF_C_TYPE_STRING &&
        !*(const protobuf_c_boolean *)(base + f->quantifier_offset))
      continue;
    lua_rawgeti(L, names, first_name + (int)i); /* stack: ..., table, name */
    if (lua_isnil(L, -1)) {
      lua_pop(L, 1);
      lua_pushstring(L, info->fields[i].name);
      lua_pushvalue(L, -1);
      lua_rawseti(L, names, first_name + (int)i);
    }
    if (f->label == PROTOBUF_C_LABEL_REPEATED) {
      size_t n = *(const size_t *)(base + f->quantifier_offset);
      size_t size = element_size(f->type);
      const char *elems = *(const char *const *)(base + f->offset);
      lua_createtable(L, (int)n, 0); /* stack: ..., name, array */
      for (size_t k = 0; k < n; k++) {
        if (push_value(L, f, is_id, elems + k * size, names))
          lua_rawseti(L, -2, (int)k + 1);
      }
    } else if (!push_value(L, f, is_id, base + f->offset, names)) {
      lua_pop(L, 1); /* the name: an ID of 0 is left out */
      continue;
    }
    lua_rawset(L, table);
  }
}

/* Pushes msg as a table (the codec's rules); used for stream messages. */
void etcd3_push_message(lua_State *L, const ProtobufCMessage *msg) {
  push_names(L);
  push_message(L, msg, lua_gettop(L)); /* stack: ..., names, table */
  lua_remove(L, -2);
}

static int read_varint(const uint8_t **p, const uint8_t *end, uint64_t *v) {
  *v = 0;
  for (int shift = 0; *p < end && shift < 64; shift += 7) {
    uint8_t b = *(*p)++;
    *v |= (uint64_t)(b & 0x7f) << shift;
    if (!(b & 0x80)) return 1;
  }
  return 0;
}

/* Whether the wire bytes of a message of type d nest messages no deeper
 * than `left` levels. protobuf-c's unpack recurses once per level with no
 * limit of its own: a peer's reply nested a few thousand levels deep (a
 * TxnResponse holds ResponseOps that hold TxnResponses) would overflow the
 * C stack. Bytes that do not parse are left for protobuf-c to refuse. */
static int nesting_ok(const ProtobufCMessageDescriptor *d, const uint8_t *p,
                      const uint8_t *end, int left) {
  if (left < 0) return 0;
  while (p < end) {
    uint64_t key, n;
    if (!read_varint(&p, end, &key)) return 1;
    switch (key & 7) {
      case 0: if (!read_varint(&p, end, &n)) return 1; break;
      case 1: if (end - p < 8) return 1; p += 8; break;
      case 5: if (end - p < 4) return 1; p += 4; break;
      case 2: {
        const ProtobufCFieldDescriptor *f;
        if (!read_varint(&p, end, &n) || n > (uint64_t)(end - p)) return 1;
        f = key >> 3 <= UINT32_MAX
                ? protobuf_c_message_descriptor_get_field(d, (unsigned)(key >> 3))
                : NULL;
        if (f && f->type == PROTOBUF_C_TYPE_MESSAGE &&
            !nesting_ok((const ProtobufCMessageDescriptor *)f->descriptor, p,
                        p + n, left - 1))
          return 0;
        p += n;
        break;
      }
      default: return 1;
    }
  }
  return 1;
}

/* The revision in the message's response header: every etcd response
 * has it as field 1. */
static int64_t header_revision_of(const ProtobufCMessage *msg) {
  const ProtobufCFieldDescriptor *f = msg->descriptor->fields;
  const Etcdserverpb__ResponseHeader *h;
  if (msg->descriptor->n_fields == 0 || f->id != 1 ||
      f->descriptor != &etcdserverpb__response_header__descriptor)
    return 0;
  h = *(Etcdserverpb__ResponseHeader *const *)((const char *)msg + f->offset);
  return h ? h->revision : 0;
}

static ProtobufCMessage *unpack_with(const ProtobufCMessageDescriptor *d, grpc_byte_buffer *buf,
                                     ProtobufCAllocator *allocator);

/* Pushes the state's kept box, or a new one (see take_kept). */
static char box_key;
static decoded *take_box(lua_State *L) {
  decoded *box = (decoded *)take_kept(L, &box_key);
  if (box) return box;
  box = (decoded *)lua_newuserdata(L, sizeof(decoded));
  box->msg = NULL;
  box->allocator.alloc = box_alloc;
  box->allocator.free = box_free;
  box->allocator.allocator_data = box;
  box->used = 0;
  box->spilled = 0;
  luaL_setmetatable(L, ETCD3_DECODED_MT);
  return box;
}

/* Pushes the message in buf, decoded as type d, as a table; on a message
 * that does not parse (or nests too deeply), pushes nothing and returns 0. */
int etcd3_decode(lua_State *L, const ProtobufCMessageDescriptor *d,
                 grpc_byte_buffer *buf, int64_t *header_revision) {
  decoded *box = take_box(L); /* stack: box */
  int ok;
  box->msg = unpack_with(d, buf, &box->allocator);
  ok = box->msg != NULL;
  if (ok) {
    *header_revision = header_revision_of(box->msg);
    etcd3_push_message(L, box->msg); /* stack: box, table */
  }
  decoded_free(box);
  keep(L, &box_key, -1 - ok);
  lua_remove(L, -1 - ok);
  return ok;
}

/* ---- byte buffers ----------------------------------------------------- */

grpc_byte_buffer *etcd3_pack(const ProtobufCMessage *msg) {
  grpc_slice slice = grpc_slice_malloc(protobuf_c_message_get_packed_size(msg));
  grpc_byte_buffer *buf;
  protobuf_c_message_pack(msg, GRPC_SLICE_START_PTR(slice));
  buf = grpc_raw_byte_buffer_create(&slice, 1);
  grpc_slice_unref(slice);
  return buf;
}

/* protobuf-c copies what it keeps (bytes, strings), so the slice goes
 * at once. A message nested deeper than a reply ever is does not parse
 * (protobuf-c and the codec recurse once per level): replies get two
 * levels more than requests, a response's header and key-values sitting
 * below what the request nested. */
static ProtobufCMessage *unpack_slice(const ProtobufCMessageDescriptor *d, grpc_slice slice,
                                      ProtobufCAllocator *allocator) {
  /* each level of nesting takes two bytes at least (a key, a length):
   * fewer bytes than twice the levels allowed cannot nest too deeply */
  if (GRPC_SLICE_LENGTH(slice) >= 2 * (MAX_DEPTH + 3) &&
      !nesting_ok(d, GRPC_SLICE_START_PTR(slice), GRPC_SLICE_END_PTR(slice), MAX_DEPTH + 2))
    return NULL;
  return protobuf_c_message_unpack(d, allocator, GRPC_SLICE_LENGTH(slice), GRPC_SLICE_START_PTR(slice));
}

/* allocator: NULL for malloc (the message is freed with
 * protobuf_c_message_free_unpacked(msg, NULL)). An uncompressed reply in
 * one slice (the usual small one) is read in place, without a copy. */
static ProtobufCMessage *unpack_with(const ProtobufCMessageDescriptor *d, grpc_byte_buffer *buf,
                                     ProtobufCAllocator *allocator) {
  grpc_byte_buffer_reader reader;
  grpc_slice slice;
  ProtobufCMessage *msg;
  if (!buf) return NULL;
  if (buf->type == GRPC_BB_RAW && buf->data.raw.compression == GRPC_COMPRESS_NONE &&
      buf->data.raw.slice_buffer.count == 1)
    return unpack_slice(d, buf->data.raw.slice_buffer.slices[0], allocator);
  if (!grpc_byte_buffer_reader_init(&reader, buf)) return NULL;
  slice = grpc_byte_buffer_reader_readall(&reader);
  grpc_byte_buffer_reader_destroy(&reader);
  msg = unpack_slice(d, slice, allocator);
  grpc_slice_unref(slice);
  return msg;
}

ProtobufCMessage *etcd3_unpack(const ProtobufCMessageDescriptor *d, grpc_byte_buffer *buf) {
  return unpack_with(d, buf, NULL);
}

/* ---- methods and status codes ----------------------------------------- */

/* Methods of one service (etcd 3.4: 16, Auth's). */
#define MAX_METHODS 32

/* "/etcdserverpb.KV/Range" for every method, built with the other tables
 * (static storage, see above). Bytes of one, with its NUL (etcd 3.4: 40). */
#define PATH_MAX_LEN 80
static char method_paths[N_SERVICES][MAX_METHODS][PATH_MAX_LEN];

static void build_paths(void) {
  for (size_t s = 0; s < N_SERVICES; s++) {
    if (services[s]->n_methods > MAX_METHODS) {
      tables_fail("MAX_METHODS (%d) is too small for %s (%u methods): raise it in src/codec.c",
                  MAX_METHODS, services[s]->name, services[s]->n_methods);
      return;
    }
    for (unsigned m = 0; m < services[s]->n_methods; m++) {
      int len = snprintf(method_paths[s][m], PATH_MAX_LEN, "/%s/%s", services[s]->name,
                         services[s]->methods[m].name);
      if (len < 0 || len >= PATH_MAX_LEN) {
        tables_fail("PATH_MAX_LEN (%d) is too small for /%s/%s: raise it in src/codec.c",
                    PATH_MAX_LEN, services[s]->name, services[s]->methods[m].name);
        method_paths[s][m][0] = '\0';
        return;
      }
    }
  }
}

/* Finds "KV.Range" (service short name '.' method name). */
const ProtobufCMethodDescriptor *etcd3_find_method(const char *rpc_name,
                                                   const char **path) {
  const char *dot = strchr(rpc_name, '.');
  if (!dot) return NULL;
  pthread_once(&tables_once, build_tables);
  for (size_t s = 0; s < N_SERVICES; s++) {
    const ProtobufCServiceDescriptor *sd = services[s];
    if (strlen(sd->short_name) != (size_t)(dot - rpc_name) ||
        strncmp(sd->short_name, rpc_name, (size_t)(dot - rpc_name)) != 0)
      continue;
    for (unsigned m = 0; m < sd->n_methods && m < MAX_METHODS; m++) {
      if (strcmp(sd->methods[m].name, dot + 1) == 0 && method_paths[s][m][0]) {
        *path = method_paths[s][m];
        return &sd->methods[m];
      }
    }
  }
  return NULL;
}

static const char *const status_names[] = {
  "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED",
  "NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED",
  "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED",
  "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
};

const char *etcd3_status_name(int status) {
  if (status < 0 || (size_t)status >= sizeof status_names / sizeof status_names[0])
    return "UNKNOWN";
  return status_names[status];
}

int etcd3_codec_open(lua_State *L) {
  /* the tables are checked here, so protos they do not fit fail require */
  pthread_once(&tables_once, build_tables);
  if (tables_error) return luaL_error(L, "%s", tables_error);
  luaL_newmetatable(L, ETCD3_ARENA_MT);
  lua_pushcfunction(L, arena_gc);
  lua_setfield(L, -2, "__gc");
  lua_pop(L, 1);
  luaL_newmetatable(L, ETCD3_DECODED_MT);
  lua_pushcfunction(L, decoded_gc);
  lua_setfield(L, -2, "__gc");
  lua_pop(L, 1);
  return 0;
}
