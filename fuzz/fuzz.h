/*
 * fuzz.h - what the codec fuzz targets share: the list of etcd RPC methods
 * (their request and response types come from the service descriptors, so
 * every message the client sends or reads is covered without a hand-kept
 * list), a fresh Lua state per input, and a deep comparison of two tables.
 *
 * The targets link the module's codec (src/codec.c) and protoc-c's output;
 * they use etcd3_encode, etcd3_decode (the path every unary reply takes),
 * etcd3_push_message, the arena and etcd3_codec_open (the metatables).
 */
#ifndef ETCD3_FUZZ_H
#define ETCD3_FUZZ_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lua.h>
#include <lauxlib.h>
#include <lualib.h>

#include <grpc/byte_buffer.h>
#include <grpc/slice.h>

#include "codec.h"
#include "rpc.pb-c.h"

/* Number of methods over all services (the codec's list). */
static inline unsigned fuzz_n_methods(void) {
  size_t n_services;
  const ProtobufCServiceDescriptor *const *services = etcd3_services(&n_services);
  unsigned n = 0;
  for (size_t s = 0; s < n_services; s++) n += services[s]->n_methods;
  return n;
}

/* The k-th method (k taken modulo the count); *service gets its service. */
static inline const ProtobufCMethodDescriptor *fuzz_method(unsigned k,
    const ProtobufCServiceDescriptor **service) {
  size_t n_services;
  const ProtobufCServiceDescriptor *const *services = etcd3_services(&n_services);
  k %= fuzz_n_methods();
  for (size_t s = 0; s < n_services; s++) {
    if (k < services[s]->n_methods) {
      if (service) *service = services[s];
      return &services[s]->methods[k];
    }
    k -= services[s]->n_methods;
  }
  abort();
}

/* Index of "KV.Range" (service short name '.' method), or -1. */
static inline int fuzz_method_index(const char *rpc) {
  unsigned n = fuzz_n_methods();
  for (unsigned k = 0; k < n; k++) {
    const ProtobufCServiceDescriptor *sd;
    const ProtobufCMethodDescriptor *m = fuzz_method(k, &sd);
    size_t sl = strlen(sd->short_name);
    if (strncmp(rpc, sd->short_name, sl) == 0 && rpc[sl] == '.' &&
        strcmp(rpc + sl + 1, m->name) == 0)
      return (int)k;
  }
  return -1;
}

/* A Lua state with the codec's metatables, as the module registers them;
 * the collector runs almost continuously, so a value the codec would hold
 * without a reference is soon freed under it (ASan then reports the use). */
static inline lua_State *fuzz_state(void) {
  lua_State *L = luaL_newstate();
  if (!L) abort();
  luaL_openlibs(L);
  etcd3_codec_open(L);
  lua_gc(L, LUA_GCINC, 10, 400, 0);
  return L;
}

/* Pushes the message (light userdata 1) as a table: run under lua_pcall. */
static inline int fuzz_push(lua_State *L) {
  etcd3_push_message(L, (const ProtobufCMessage *)lua_touserdata(L, 1));
  return 1;
}

/* (descriptor, byte buffer) -> etcd3_decode's table, or nil */
static inline int fuzz_decode_call(lua_State *L) {
  int64_t header_revision;
  if (!etcd3_decode(L, (const ProtobufCMessageDescriptor *)lua_touserdata(L, 1),
                    (grpc_byte_buffer *)lua_touserdata(L, 2), &header_revision))
    lua_pushnil(L);
  return 1;
}

/* Decodes buf as d the way a reply off the wire is decoded, under pcall;
 * 1 when a table was pushed, 0 when the bytes are refused (nothing
 * pushed). */
static inline int fuzz_decode(lua_State *L, const ProtobufCMessageDescriptor *d,
                              const uint8_t *buf, size_t len) {
  grpc_slice slice = grpc_slice_from_copied_buffer((const char *)buf, len);
  grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&slice, 1);
  int rc;
  grpc_slice_unref(slice);
  lua_pushcfunction(L, fuzz_decode_call);
  lua_pushlightuserdata(L, (void *)d);
  lua_pushlightuserdata(L, bb);
  rc = lua_pcall(L, 2, 1, 0);
  grpc_byte_buffer_destroy(bb);
  if (rc != LUA_OK) {
    /* the codec's only error while pushing: a message nested past what
     * the Lua stack takes */
    const char *err = lua_tostring(L, -1);
    if (!err || !strstr(err, "nested too deeply")) {
      fprintf(stderr, "unexpected error decoding a message: %s\n", err ? err : "?");
      abort();
    }
    lua_pop(L, 1);
    return 0;
  }
  if (lua_isnil(L, -1)) {
    lua_pop(L, 1);
    return 0;
  }
  return 1;
}

/* Deep equality of the plain values at a and b (tables compared by
 * contents, both ways); the codec bounds how deep decoded tables go. */
static inline int fuzz_same(lua_State *L, int a, int b) {
  a = lua_absindex(L, a);
  b = lua_absindex(L, b);
  if (lua_type(L, a) != lua_type(L, b)) return 0;
  if (lua_type(L, a) != LUA_TTABLE) return lua_rawequal(L, a, b);
  luaL_checkstack(L, 6, "fuzz_same");
  for (int pass = 0; pass < 2; pass++) {
    int x = pass ? b : a, y = pass ? a : b;
    lua_pushnil(L);
    while (lua_next(L, x)) {
      int same;
      lua_pushvalue(L, -2);
      lua_rawget(L, y);
      same = pass ? !lua_isnil(L, -1) : fuzz_same(L, -2, -1);
      lua_pop(L, 2);
      if (!same) {
        lua_pop(L, 1);
        return 0;
      }
    }
  }
  return 1;
}

#endif
