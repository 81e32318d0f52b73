/*
 * encode.c - libFuzzer target: request tables built from fuzzed bytes,
 * encoded by the module's codec (etcd3_encode) as each request message the
 * client sends, under lua_pcall.
 *
 * The tables are what a confused caller (or a bug in the Lua layer) could
 * hand the codec: the right field names with values of every wrong type,
 * huge and negative integers, 2^63, NaN and infinities, strings that are
 * not UTF-8 or not IDs, enum names that do not exist, deep nesting along
 * the messages' own recursion (a transaction inside a transaction ...),
 * arrays with holes, functions, userdata, and tables whose metatable hands
 * out fresh values. Raising a Lua error is the right answer to most of
 * them; crashing, leaking or reading freed memory is not. A request that
 * encodes must pack and unpack again.
 *
 * Input: byte 0 picks the RPC method; the rest drives the generator.
 */
#include <math.h>
#include <stdint.h>

#include "fuzz.h"

/* ---- field names, as the codec spells them ---------------------------- */

/* The names come from the codec itself: a message with field i set to a
 * value other than its default is pushed by etcd3_push_message next to one
 * left at the defaults, and the one key whose value differs is the name. */
typedef struct names {
  const ProtobufCMessageDescriptor *d;
  char **field;
} names;

static names *known;
static size_t n_known;

/* Pushes d's message with field i (if i >= 0) set to a non-default value. */
static void push_with(lua_State *L, const ProtobufCMessageDescriptor *d, int i) {
  char *base = (char *)calloc(1, d->sizeof_message);
  ProtobufCMessage *sub = NULL;
  uint64_t elem[2] = { 0, 0 }; /* one zeroed element of any type but message */
  const ProtobufCFieldDescriptor *f = i >= 0 ? &d->fields[i] : NULL;
  ProtobufCBinaryData x = { 1, (uint8_t *)"x" };
  d->message_init((ProtobufCMessage *)base);
  if (f && f->type == PROTOBUF_C_TYPE_MESSAGE) {
    const ProtobufCMessageDescriptor *sd = f->descriptor;
    sub = (ProtobufCMessage *)calloc(1, sd->sizeof_message);
    sd->message_init(sub);
  }
  if (f && f->label == PROTOBUF_C_LABEL_REPEATED) {
    *(size_t *)(base + f->quantifier_offset) = 1;
    if (sub) memcpy(elem, &sub, sizeof sub);
    *(void **)(base + f->offset) = elem;
  } else if (f) {
    void *slot = base + f->offset;
    switch (f->type) {
      case PROTOBUF_C_TYPE_MESSAGE: *(ProtobufCMessage **)slot = sub; break;
      case PROTOBUF_C_TYPE_STRING: *(const char **)slot = "x"; break;
      case PROTOBUF_C_TYPE_BYTES: *(ProtobufCBinaryData *)slot = x; break;
      case PROTOBUF_C_TYPE_BOOL: *(protobuf_c_boolean *)slot = 1; break;
      case PROTOBUF_C_TYPE_INT64: case PROTOBUF_C_TYPE_SINT64: case PROTOBUF_C_TYPE_SFIXED64:
      case PROTOBUF_C_TYPE_UINT64: case PROTOBUF_C_TYPE_FIXED64: case PROTOBUF_C_TYPE_DOUBLE:
        *(uint64_t *)slot = 1; break;
      default: *(uint32_t *)slot = 1; break;
    }
    if (f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF)
      *(uint32_t *)(base + f->quantifier_offset) = f->id;
    else if (f->label == PROTOBUF_C_LABEL_OPTIONAL && f->type != PROTOBUF_C_TYPE_MESSAGE &&
             f->type != PROTOBUF_C_TYPE_STRING)
      *(protobuf_c_boolean *)(base + f->quantifier_offset) = 1;
  }
  lua_pushcfunction(L, fuzz_push);
  lua_pushlightuserdata(L, base);
  if (lua_pcall(L, 1, 1, 0) != LUA_OK) abort();
  free(sub);
  free(base);
}

static char *field_name(lua_State *L, const ProtobufCMessageDescriptor *d,
                        unsigned i) {
  char *name = NULL;
  push_with(L, d, -1);
  push_with(L, d, (int)i);
  lua_pushnil(L);
  while (lua_next(L, -2)) {
    lua_pushvalue(L, -2);
    lua_rawget(L, -5);
    if (!fuzz_same(L, -1, -2)) {
      if (name) {
        fprintf(stderr, "%s field %s: more than one key changed\n", d->name,
                d->fields[i].name);
        abort();
      }
      name = strdup(lua_tostring(L, -3));
    }
    lua_pop(L, 2);
  }
  lua_pop(L, 2);
  if (!name) abort();
  return name;
}

static names *names_of(const ProtobufCMessageDescriptor *d) {
  for (size_t k = 0; k < n_known; k++)
    if (known[k].d == d) return &known[k];
  return NULL;
}

static void learn(lua_State *L, const ProtobufCMessageDescriptor *d) {
  names *nm;
  if (names_of(d)) return;
  known = (names *)realloc(known, (n_known + 1) * sizeof *known);
  nm = &known[n_known++];
  nm->d = d;
  nm->field = (char **)calloc(d->n_fields ? d->n_fields : 1, sizeof(char *));
  for (unsigned i = 0; i < d->n_fields; i++) nm->field[i] = field_name(L, d, i);
  for (unsigned i = 0; i < d->n_fields; i++)
    if (d->fields[i].type == PROTOBUF_C_TYPE_MESSAGE) learn(L, d->fields[i].descriptor);
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  lua_State *L = fuzz_state();
  (void)argc;
  (void)argv;
  for (unsigned k = 0; k < fuzz_n_methods(); k++) learn(L, fuzz_method(k, NULL)->input);
  lua_close(L);
  return 0;
}

/* ---- the generator ---------------------------------------------------- */

typedef struct input {
  const uint8_t *p;
  size_t n;
} input;

static unsigned byte(input *in) {
  if (!in->n) return 0;
  in->n--;
  return *in->p++;
}

static uint64_t u64(input *in) {
  uint64_t v = 0;
  for (int i = 0; i < 8; i++) v = v << 8 | byte(in);
  return v;
}

static void gen_string(lua_State *L, input *in, size_t max) {
  size_t len = byte(in);
  if (len > in->n) len = in->n;
  if (len > max) len = max;
  lua_pushlstring(L, (const char *)in->p, len);
  in->p += len;
  in->n -= len;
}

static const char *const odd_strings[] = {
  "", "0", "1", "-1", " 1", "1 ", "0x10", "g", "7fffffffffffffff",
  "8000000000000000", "ffffffffffffffff", "10000000000000000", "PUT",
  "DELETE", "NOEXIST", "\xff\xfe", "\xc0\x80", "a\0b", "9223372036854775808",
};

static void gen_message(lua_State *L, input *in, const ProtobufCMessageDescriptor *d,
                        int depth);

/* __index handing out a fresh string for every key: nothing but the codec
 * holds on to it. */
static int fresh_index(lua_State *L) {
  lua_pushfstring(L, "fresh %s %p", lua_tostring(L, 2), lua_topointer(L, 1));
  return 1;
}

static int raising_index(lua_State *L) {
  return luaL_error(L, "index %s refused", lua_tostring(L, 2));
}

/* Pushes a value for field f (NULL: any field), of the field's type or not. */
static void gen_value(lua_State *L, input *in, const ProtobufCFieldDescriptor *f,
                      int depth, int element) {
  unsigned op = byte(in) % 16;
  luaL_checkstack(L, 10, "generator");
  if (depth > 48) op = 2;
  switch (op) {
    case 0: /* the field's own type */
      if (!f) {
        lua_pushinteger(L, (lua_Integer)byte(in));
      } else if (f->label == PROTOBUF_C_LABEL_REPEATED && !element) {
        unsigned n = byte(in) % 8;
        lua_createtable(L, (int)n, 0);
        for (unsigned i = 1; i <= n; i++) {
          gen_value(L, in, f, depth + 1, 1);
          lua_rawseti(L, -2, (int)i);
        }
      } else if (f->type == PROTOBUF_C_TYPE_MESSAGE) {
        gen_message(L, in, f->descriptor, depth + 1);
      } else if (f->type == PROTOBUF_C_TYPE_ENUM) {
        const ProtobufCEnumDescriptor *ed = f->descriptor;
        lua_pushstring(L, ed->values[byte(in) % ed->n_values].name);
      } else if (f->type == PROTOBUF_C_TYPE_BOOL) {
        lua_pushboolean(L, byte(in) & 1);
      } else if (f->type == PROTOBUF_C_TYPE_STRING || f->type == PROTOBUF_C_TYPE_BYTES) {
        gen_string(L, in, 255);
      } else {
        lua_pushinteger(L, (lua_Integer)u64(in));
      }
      break;
    case 1: lua_pushnil(L); break;
    case 2: lua_pushboolean(L, byte(in) & 1); break;
    case 3: lua_pushinteger(L, (lua_Integer)u64(in)); break;
    case 4: {
      static const lua_Integer ints[] = {
        INT64_MIN, INT64_MAX, -1, 0, 1, 4294967296LL, 2147483648LL,
        -2147483649LL, 9007199254740993LL, -9007199254740993LL,
      };
      lua_pushinteger(L, ints[byte(in) % (sizeof ints / sizeof ints[0])]);
      break;
    }
    case 5: {
      const lua_Number nums[] = {
        NAN, INFINITY, -INFINITY, 9223372036854775808.0, -9223372036854775808.0,
        18446744073709551616.0, 0.5, -0.0, 1e300, -1e-300, 4294967296.5,
      };
      lua_pushnumber(L, nums[byte(in) % (sizeof nums / sizeof nums[0])]);
      break;
    }
    case 6: gen_string(L, in, 255); break;
    case 7: lua_pushstring(L, odd_strings[byte(in) % (sizeof odd_strings / sizeof odd_strings[0])]); break;
    case 8: { /* an array of whatever */
      unsigned n = byte(in) % 6;
      lua_createtable(L, (int)n, 0);
      for (unsigned i = 1; i <= n; i++) {
        gen_value(L, in, f, depth + 1, 0);
        if (lua_isnil(L, -1)) lua_pop(L, 1); else lua_rawseti(L, -2, (int)(i * (1 + byte(in) % 3)));
      }
      break;
    }
    case 9: { /* deep nesting along the messages' own fields */
      const ProtobufCMessageDescriptor *d = f && f->type == PROTOBUF_C_TYPE_MESSAGE ? f->descriptor : NULL;
      unsigned levels = byte(in) * 4, pick = byte(in); /* past the codec's limit */
      int top = lua_gettop(L);
      lua_newtable(L);      /* the outermost table, at top + 1 */
      lua_pushvalue(L, -1); /* the innermost so far, at top + 2 */
      for (unsigned k = 0; k < levels && d; k++) {
        const ProtobufCFieldDescriptor *sub = NULL;
        unsigned n = 0;
        for (unsigned i = 0; i < d->n_fields; i++)
          if (d->fields[i].type == PROTOBUF_C_TYPE_MESSAGE) n++;
        for (unsigned i = 0, seen = 0; i < d->n_fields && n; i++)
          if (d->fields[i].type == PROTOBUF_C_TYPE_MESSAGE && seen++ == pick % n) sub = &d->fields[i];
        if (!sub) break;
        lua_newtable(L);
        if (sub->label == PROTOBUF_C_LABEL_REPEATED) {
          lua_createtable(L, 1, 0);
          lua_pushvalue(L, -2);
          lua_rawseti(L, -2, 1);
        } else {
          lua_pushvalue(L, -1);
        }
        lua_setfield(L, top + 2, names_of(d)->field[sub - d->fields]);
        lua_replace(L, top + 2);
        d = sub->descriptor;
      }
      lua_settop(L, top + 1);
      break;
    }
    case 10: lua_pushcfunction(L, fresh_index); break;
    case 11:
      if (byte(in) & 1) lua_pushlightuserdata(L, (void *)in);
      else lua_newuserdata(L, byte(in));
      break;
    case 12: /* a table that answers every key with a fresh string */
      lua_newtable(L);
      lua_newtable(L);
      lua_pushcfunction(L, fresh_index);
      lua_setfield(L, -2, "__index");
      lua_setmetatable(L, -2);
      break;
    case 13: /* a table whose every lookup raises */
      lua_newtable(L);
      lua_newtable(L);
      lua_pushcfunction(L, raising_index);
      lua_setfield(L, -2, "__index");
      lua_setmetatable(L, -2);
      break;
    case 14: { /* a long string */
      size_t len = (size_t)byte(in) << 8 | byte(in);
      char *s = (char *)malloc(len + 1);
      memset(s, (int)byte(in), len);
      lua_pushlstring(L, s, len);
      free(s);
      break;
    }
    default:
      if (f && f->type == PROTOBUF_C_TYPE_MESSAGE) gen_message(L, in, f->descriptor, depth + 1);
      else gen_message(L, in, NULL, depth + 1);
      break;
  }
}

/* Pushes a table for message d (NULL: keys of no message). */
static void gen_message(lua_State *L, input *in, const ProtobufCMessageDescriptor *d,
                        int depth) {
  unsigned n = byte(in) % 12;
  names *nm = d ? names_of(d) : NULL;
  lua_newtable(L);
  if (n == 11) { /* the keys not set below come from __index, fresh each time */
    lua_newtable(L);
    lua_pushcfunction(L, fresh_index);
    lua_setfield(L, -2, "__index");
    lua_setmetatable(L, -2);
  }
  for (unsigned k = 0; k < n && in->n; k++) {
    unsigned sel = byte(in);
    const ProtobufCFieldDescriptor *f = NULL;
    if (nm && d->n_fields && sel % 8 != 7) {
      f = &d->fields[byte(in) % d->n_fields];
      lua_pushstring(L, nm->field[f - d->fields]);
    } else if (sel & 8) {
      gen_string(L, in, 32); /* a key no message has */
    } else {
      lua_pushinteger(L, (lua_Integer)(byte(in) % 4)); /* array part */
    }
    gen_value(L, in, f, depth, 0);
    lua_rawset(L, -3);
  }
}

/* (method index, input) -> encoded, packed and unpacked; raises on bad input */
static int encode_one(lua_State *L) {
  const ProtobufCMessageDescriptor *d =
      (const ProtobufCMessageDescriptor *)lua_touserdata(L, 1);
  input *in = (input *)lua_touserdata(L, 2);
  int arena, req;
  ProtobufCMessage *msg, *back;
  size_t n;
  uint8_t *buf;
  gen_message(L, in, d, 0);
  req = lua_gettop(L);
  arena = etcd3_arena_new(L);
  /* the generator's own garbage goes first, so what the codec holds is
   * what a collection during encoding can take from it */
  lua_gc(L, LUA_GCCOLLECT, 0);
  msg = etcd3_encode(L, req, d, arena);
  n = protobuf_c_message_get_packed_size(msg);
  buf = (uint8_t *)lua_newuserdata(L, n ? n : 1);
  if (protobuf_c_message_pack(msg, buf) != n) abort();
  back = protobuf_c_message_unpack(d, NULL, n, buf);
  if (!back) {
    fprintf(stderr, "an encoded %s does not unpack\n", d->name);
    abort();
  }
  protobuf_c_message_free_unpacked(back, NULL);
  etcd3_arena_free(L, arena);
  return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  input in = { data + 1, size ? size - 1 : 0 };
  lua_State *L;
  if (size < 1) return 0;
  L = fuzz_state();
  lua_pushcfunction(L, encode_one);
  lua_pushlightuserdata(L, (void *)fuzz_method(data[0], NULL)->input);
  lua_pushlightuserdata(L, &in);
  lua_pcall(L, 2, 0, 0); /* an error is a fine answer */
  lua_close(L);
  return 0;
}
