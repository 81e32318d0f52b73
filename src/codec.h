/*
 * codec.h - Lua tables <-> protobuf-c messages <-> gRPC byte buffers, the
 * etcd RPC table, status names and 64-bit IDs.
 */
#ifndef ETCD3_CODEC_H
#define ETCD3_CODEC_H

#include <stdint.h>

#include <grpc/grpc.h>
#include <protobuf-c/protobuf-c.h>

#include "compat.h"

/* Bytes <-> messages (no Lua): one packer and one unpacker for every
 * call and stream. etcd3_unpack returns NULL on bytes that do not parse;
 * free its result with protobuf_c_message_free_unpacked(msg, NULL). */
grpc_byte_buffer *etcd3_pack(const ProtobufCMessage *msg);
ProtobufCMessage *etcd3_unpack(const ProtobufCMessageDescriptor *d, grpc_byte_buffer *buf);

/* Lua tables <-> messages. Encoding allocates in an arena userdata
 * (stack: ... arena), so a luaL_error half-way leaks nothing. */
int etcd3_arena_new(lua_State *L);      /* pushes an arena; returns its index */
void *etcd3_arena_alloc(lua_State *L, int arena_idx, size_t size);
void etcd3_arena_free(lua_State *L, int arena_idx);
ProtobufCMessage *etcd3_encode(lua_State *L, int idx, const ProtobufCMessageDescriptor *d,
                               int arena_idx);
/* Pushes buf decoded as type d (returns 1), or nothing (returns 0);
 * *header_revision: its response header's revision (0 without one). */
int etcd3_decode(lua_State *L, const ProtobufCMessageDescriptor *d, grpc_byte_buffer *buf,
                 int64_t *header_revision);
void etcd3_push_message(lua_State *L, const ProtobufCMessage *msg);

/* 64-bit IDs: 1 to 16 hex digits (as etcdctl prints them), or an integer. */
int etcd3_parse_id(const char *s, size_t len, uint64_t *id);
uint64_t etcd3_check_id(lua_State *L, int idx);

/* The etcd services the client calls (codec.c's list: the one place a
 * service is named); *n gets their count. */
const ProtobufCServiceDescriptor *const *etcd3_services(size_t *n);
/* "KV.Range" -> its descriptor and "/etcdserverpb.KV/Range" (static). */
const ProtobufCMethodDescriptor *etcd3_find_method(const char *rpc_name, const char **path);
const char *etcd3_status_name(int status);

int etcd3_codec_open(lua_State *L);

#endif
