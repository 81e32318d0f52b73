/*
 * seed.c - the decode fuzzer's seed corpus from recorded etcd replies.
 *
 *   seed RECORDED.lua OUTDIR
 *
 * RECORDED.lua is what tools/record-corpus.lua wrote: real replies, as the
 * codec decoded them. Each is encoded back with the codec (etcd3_encode, as
 * the reply's message type) and written to OUTDIR as one input of the
 * decode target: the method's index, then the message's wire bytes.
 */
#include "fuzz.h"

static int encode_reply(lua_State *L) {
  const ProtobufCMessageDescriptor *d =
      (const ProtobufCMessageDescriptor *)lua_touserdata(L, 2);
  int arena = etcd3_arena_new(L);
  ProtobufCMessage *msg = etcd3_encode(L, 1, d, arena);
  size_t n = protobuf_c_message_get_packed_size(msg);
  uint8_t *buf = (uint8_t *)lua_newuserdata(L, n ? n : 1);
  protobuf_c_message_pack(msg, buf);
  lua_pushlstring(L, (const char *)buf, n);
  etcd3_arena_free(L, arena);
  return 1;
}

int main(int argc, char **argv) {
  lua_State *L;
  int written = 0;
  if (argc != 3) {
    fprintf(stderr, "usage: %s RECORDED.lua OUTDIR\n", argv[0]);
    return 2;
  }
  L = fuzz_state();
  if (luaL_dofile(L, argv[1]) != LUA_OK || !lua_istable(L, -1)) {
    fprintf(stderr, "seed: %s: %s\n", argv[1], lua_tostring(L, -1));
    return 1;
  }
  for (int i = 1; lua_rawgeti(L, 1, i) == LUA_TTABLE; i++) {
    const char *rpc;
    int k;
    size_t n;
    const char *bytes;
    char path[4096];
    FILE *f;
    unsigned char index;
    lua_getfield(L, -1, "rpc");
    rpc = lua_tostring(L, -1);
    k = rpc ? fuzz_method_index(rpc) : -1;
    if (k < 0) {
      fprintf(stderr, "seed: unknown rpc %s\n", rpc ? rpc : "?");
      return 1;
    }
    lua_pushcfunction(L, encode_reply);
    lua_getfield(L, -3, "response");
    lua_pushlightuserdata(L, (void *)fuzz_method((unsigned)k, NULL)->output);
    if (lua_pcall(L, 2, 1, 0) != LUA_OK) {
      fprintf(stderr, "seed: %s: %s\n", rpc, lua_tostring(L, -1));
      return 1;
    }
    bytes = lua_tolstring(L, -1, &n);
    snprintf(path, sizeof path, "%s/%03d-%s", argv[2], i, rpc);
    f = fopen(path, "wb");
    index = (unsigned char)k;
    if (!f || fwrite(&index, 1, 1, f) != 1 || fwrite(bytes, 1, n, f) != n || fclose(f) != 0) {
      fprintf(stderr, "seed: cannot write %s\n", path);
      return 1;
    }
    written++;
    lua_pop(L, 3);
  }
  lua_close(L);
  printf("seed: %d inputs in %s\n", written, argv[2]);
  return 0;
}
