/*
 * decode.c - libFuzzer target: arbitrary bytes decoded as each response
 * message the client reads, into Lua tables, by the module's codec.
 *
 * Input: byte 0 picks the RPC method (modulo the number of methods in the
 * etcd services); the rest is the response message as it would arrive off
 * the wire (a hostile or broken peer chooses every byte of it).
 *
 * Checked beyond "no crash, no leak, no undefined behaviour": a message
 * that decodes gives a table that encodes back (etcd3_encode) to a message
 * that decodes to the same table. A codec that loses or bends a value on
 * the way in would break that round trip.
 */
#include "fuzz.h"

/* (table, descriptor) -> the table encoded and packed, as a string */
static int pack_table(lua_State *L) {
  const ProtobufCMessageDescriptor *d =
      (const ProtobufCMessageDescriptor *)lua_touserdata(L, 2);
  int arena = etcd3_arena_new(L);
  ProtobufCMessage *msg = etcd3_encode(L, 1, d, arena);
  size_t n = protobuf_c_message_get_packed_size(msg);
  uint8_t *buf = (uint8_t *)lua_newuserdata(L, n ? n : 1);
  if (protobuf_c_message_pack(msg, buf) != n) abort();
  lua_pushlstring(L, (const char *)buf, n);
  etcd3_arena_free(L, arena);
  return 1;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  const ProtobufCMethodDescriptor *m;
  lua_State *L;
  if (size < 1) return 0;
  m = fuzz_method(data[0], NULL);
  L = fuzz_state();
  if (fuzz_decode(L, m->output, data + 1, size - 1)) {
    int first = lua_gettop(L);
    size_t n;
    const char *packed;
    lua_pushcfunction(L, pack_table);
    lua_pushvalue(L, first);
    lua_pushlightuserdata(L, (void *)m->output);
    if (lua_pcall(L, 2, 1, 0) != LUA_OK) {
      /* replies may nest a little deeper than requests */
      if (strstr(lua_tostring(L, -1), "nested too deeply")) {
        lua_close(L);
        return 0;
      }
      fprintf(stderr, "a decoded %s does not encode back: %s\n",
              m->output->name, lua_tostring(L, -1));
      abort();
    }
    packed = lua_tolstring(L, -1, &n);
    if (!fuzz_decode(L, m->output, (const uint8_t *)packed, n)) {
      fprintf(stderr, "a re-encoded %s does not decode\n", m->output->name);
      abort();
    }
    if (!fuzz_same(L, first, -1)) {
      fprintf(stderr, "%s changed on the round trip\n", m->output->name);
      abort();
    }
  }
  lua_close(L);
  return 0;
}
