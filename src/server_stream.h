/*
 * server_stream.h - a server-streaming call (Maintenance.Snapshot): the
 * etcd3.ServerStream userdata.
 */
#ifndef ETCD3_SERVER_STREAM_H
#define ETCD3_SERVER_STREAM_H

#include "compat.h"
#include "engine.h"

/* core client:snapshot(endpoint_index) -> stream of SnapshotResponse */
int etcd3_snapshot_start(lua_State *L, etcd3_engine *e, size_t channel);
int etcd3_server_stream_open(lua_State *L);

#endif
