/*
 * core.c - require "etcd3.core": opens every C type of the module from a
 * table, and the process utilities the Lua layer needs (monotonic time,
 * sleep, CPU time).
 *
 * Never initialises gRPC: that waits for the first client, so a process
 * may fork after require (a child of a process that ran grpc_init hangs
 * on its first call: docs/grpc-facts.md, "Fork").
 */
#include <errno.h>
#include <time.h>
#include <sys/resource.h>

#include "call.h"
#include "client.h"
#include "codec.h"
#include "engine.h"
#include "lease.h"
#include "feed.h"
#include "notifier.h"
#include "registration.h"
#include "server_stream.h"
#include "sink.h"
#include "watcher.h"

/* core.now() -> monotonic seconds */
static int core_now(lua_State *L) {
  lua_pushnumber(L, etcd3_now());
  return 1;
}

/* core.cpu_time() -> user + system CPU seconds of the whole process (all
 * threads, the engine's too): what the benchmarks report per operation. */
static int core_cpu_time(lua_State *L) {
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  lua_pushnumber(L, (double)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
                        (double)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6);
  return 1;
}

/* core.sleep(seconds): the plain-script strategy's sleep. */
static int core_sleep(lua_State *L) {
  double s = luaL_checknumber(L, 1);
  struct timespec ts;
  if (s <= 0) return 0;
  ts.tv_sec = (time_t)s;
  ts.tv_nsec = (long)((s - (double)ts.tv_sec) * 1e9);
  while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
  }
  return 0;
}

/* core.sink_available() -> whether watchers can write into nginx shared
 * dicts here (state:sink: lua-nginx-module's functions are in the process). */
static int core_sink_available(lua_State *L) {
  lua_pushboolean(L, etcd3_sink_available());
  return 1;
}

int luaopen_etcd3_core(lua_State *L);
int luaopen_etcd3_core(lua_State *L) {
  static const lua_CFunction open_types[] = {
    etcd3_codec_open, etcd3_call_open, etcd3_lease_open, etcd3_watcher_open,
    etcd3_server_stream_open, etcd3_registration_open, etcd3_notifier_open, etcd3_client_open,
    etcd3_feed_open,
    NULL,
  };
  static const luaL_Reg functions[] = {
    {"now", core_now}, {"sleep", core_sleep}, {"cpu_time", core_cpu_time},
    {"sink_available", core_sink_available}, {NULL, NULL},
  };
  lua_newtable(L); /* stack: module */
  for (const lua_CFunction *open = open_types; *open; open++) (*open)(L);
  luaL_setfuncs(L, functions, 0);
  lua_pushliteral(L, "etcd3.core 0.1");
  lua_setfield(L, -2, "_VERSION");
  return 1;
}
