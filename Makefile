# lua-etcd3 — build, test, demo, install.
#
#   make                 etcd3.core for Lua 5.4    (build/lua5.4/etcd3/core.so)
#   make LUA=luajit      etcd3.core for LuaJIT 2.1 (build/luajit/etcd3/core.so)
#   make demo [LUA=…]    examples/demo.lua against a throwaway local etcd
#   make run SCRIPT=f.lua [ARGS="…"] [LUA=luajit]
#                        any script against the build tree, not installed
#                        (etcd at $ETCDCTL_ENDPOINTS, default 127.0.0.1:2379)
#   make check           every spec once on Lua 5.4 (no LuaJIT, sanitizer,
#                        soak, fuzz or benchmarks); one spec after `make
#                        spec-helpers`: busted spec/02-kv_spec.lua
#   make test            installs what is missing, then every spec on both
#                        runtimes, a sanitizer run, and luacheck
#   make install         honours LuaRocks' variables (INST_LIBDIR, INST_LUADIR)
#   make dist            the source rock build/dist/lua-etcd3-$(VERSION)-1.src.rock
#   make deb             the Debian package build/deb/lua-etcd3_$(VERSION)-1_amd64.deb
#
# etcd's .proto files come from an etcd source tree: ETCD_PROTO_DIR, or by
# default Debian's golang-etcd-server-dev unpacked into build/ (never committed).
# A source rock carries protoc-c's output instead, in proto/generated/ (made
# by `make dist`, never in the checkout): built from there, nothing is
# fetched and protoc-c is not needed.

LUA        ?= lua5.4
BUILD      ?= build/$(notdir $(LUA))$(if $(SANITIZE),-san)
GENERATED_PROTO_DIR := proto/generated
PROTO_OUT  := $(if $(wildcard $(GENERATED_PROTO_DIR)/rpc.pb-c.c),$(GENERATED_PROTO_DIR),build/proto)
ETCD_DEB_DIR := build/etcd-src
ETCD_PROTO_DIR ?= $(ETCD_DEB_DIR)/usr/share/gocode/src/go.etcd.io/etcd

ifeq ($(notdir $(LUA)),luajit)
LUA_INCDIR ?= /usr/include/luajit-2.1
else
LUA_INCDIR ?= /usr/include/$(notdir $(LUA))
endif

CC       ?= cc
CFLAGS   ?= -O2 -g
# Warnings are errors in the project's own builds only: `spec-helpers` (the
# specs' build) and every build of tools/test.sh (`make test`, which exports
# WERROR=-Werror) fail on one. A user's build (`make`, `make install`,
# `make demo`, the rocks) shows them and goes on: a newer compiler or gRPC
# may warn where ours does not.
WERROR   ?=
WARN      = -std=c99 -D_GNU_SOURCE -Wall -Wextra $(WERROR)
LIBFLAG  ?= -shared
ifneq ($(SANITIZE),)
CFLAGS   += -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined
LIBFLAG  += -fsanitize=address,undefined
endif
PKGS     := grpc libprotobuf-c
GRPC_CFLAGS := $(shell pkg-config --cflags $(PKGS) 2>/dev/null)
# -lgpr is required; a Lua module never links -llua.
GRPC_LIBS   := -lgrpc -lgpr -lprotobuf-c -lpthread

PROTOS   := kv auth rpc
PB_C     := $(PROTOS:%=$(PROTO_OUT)/%.pb-c.c)
SRCS     := $(wildcard src/*.c)
OBJS     := $(SRCS:src/%.c=$(BUILD)/%.o) $(PROTOS:%=$(BUILD)/%.pb-c.o)
MODULE   := $(BUILD)/etcd3/core.so

# Lua's version directory: 5.1 for LuaJIT, else the interpreter's own.
LUA_VERSION_DIR := $(if $(filter luajit,$(notdir $(LUA))),5.1,$(patsubst lua%,%,$(notdir $(LUA))))
INST_LIBDIR ?= /usr/local/lib/lua/$(LUA_VERSION_DIR)
INST_LUADIR ?= /usr/local/share/lua/$(LUA_VERSION_DIR)

SPEC_FORK := $(BUILD)/spec_fork.so

.PHONY: all deps dist deb version demo run test check lint install clean bench bench-smoke bench-stm bench-memory bench-profile bench-openresty bench-gateway bench-sync bench-ngx-instructions spec-helpers fuzz fuzz-build soak overload scale memcheck
all: $(MODULE)

# Test-only helper module (fork for the "use after fork" spec); not installed.
# The module built on the way has warnings as errors too.
spec-helpers: WERROR = -Werror
spec-helpers: $(MODULE) $(SPEC_FORK)
$(SPEC_FORK): spec/helpers/fork.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $(WARN) -fPIC -I$(LUA_INCDIR) $(LIBFLAG) -o $@ $<

$(MODULE): $(OBJS)
	@mkdir -p $(dir $@)
	$(CC) $(LIBFLAG) -o $@ $(OBJS) $(GRPC_LIBS) $(LDFLAGS)

$(BUILD)/%.o: src/%.c $(wildcard src/*.h) $(PB_C)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $(WARN) -fPIC -I$(LUA_INCDIR) -I$(PROTO_OUT) $(GRPC_CFLAGS) -c $< -o $@

# protoc-c output is not ours: compiled without -Werror's extra warnings.
$(BUILD)/%.pb-c.o: $(PROTO_OUT)/%.pb-c.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -fPIC -I$(PROTO_OUT) $(GRPC_CFLAGS) -c $< -o $@

# (no rule in a source rock: its generated sources are never remade)
ifneq ($(PROTO_OUT),$(GENERATED_PROTO_DIR))
$(PB_C): $(ETCD_PROTO_DIR)/etcdserver/etcdserverpb/rpc.proto proto/prepare.lua
	@mkdir -p $(PROTO_OUT)
	$(LUA) proto/prepare.lua $(ETCD_PROTO_DIR) $(PROTO_OUT)
	cd $(PROTO_OUT) && protoc-c --c_out=. $(PROTOS:%=%.proto)

# Debian's golang-etcd-server-dev, unpacked without installing its Go deps.
$(ETCD_DEB_DIR)/usr/share/gocode/src/go.etcd.io/etcd/etcdserver/etcdserverpb/rpc.proto:
	@mkdir -p $(ETCD_DEB_DIR)
	cd $(ETCD_DEB_DIR) && rm -f *.deb && apt-get download golang-etcd-server-dev
	dpkg-deb -x $(ETCD_DEB_DIR)/golang-etcd-server-dev_*.deb $(ETCD_DEB_DIR)
endif

# The release's version is the one etcd3._VERSION states ("lua-etcd3 X.Y.Z");
# the rock is X.Y.Z-$(ROCK_REVISION) (LuaRocks' revision of the rockspec,
# not of the code), from rockspec/lua-etcd3-X.Y.Z-$(ROCK_REVISION).rockspec.
VERSION       := $(shell sed -n 's/.*_VERSION = "lua-etcd3 \([^"]*\)".*/\1/p' lua/etcd3/init.lua)
ROCK_REVISION ?= 1
version:
	@echo $(VERSION)

# The source rock from the checkout's HEAD plus the generated protobuf-c
# sources and etcd's licence for them (tools/dist.sh). Run on a dev machine:
# it may fetch and generate the protos first; installing the rock does not.
dist: $(PB_C)
	sh tools/dist.sh $(VERSION)-$(ROCK_REVISION) $(PROTO_OUT) $(ETCD_PROTO_DIR)

# The Debian package lua-etcd3 (debian/, built with dh-lua) for Lua 5.1 to
# 5.4 and LuaJIT, from the source rock's tree (tools/deb.sh): HEAD, as the
# rock is.
deb: deps
	$(MAKE) -s dist > /dev/null
	sh tools/deb.sh build/dist/lua-etcd3-$(VERSION)-$(ROCK_REVISION).src.rock

deps:
	sh tools/deps.sh

BENCH_ENV := LUA_PATH="lua/?.lua;lua/?/init.lua;./?.lua;;" LUA_CPATH="build/lua5.4/?.so;;"

# Side by side with Go clientv3, python-etcd3 and Node etcd3 (bench/README.md).
bench: deps
	sh tools/deps.sh bench
	$(MAKE) -s LUA=lua5.4
	$(BENCH_ENV) lua5.4 bench/run.lua

# Every workload for every client at 1/50 size, one pair per peer: proves the harness works (CI).
bench-smoke: deps
	sh tools/deps.sh bench
	$(MAKE) -s LUA=lua5.4
	$(BENCH_ENV) lua5.4 bench/run.lua --scale 50 --pairs 1

# STM increments of one hot key from 4 processes, lua-etcd3 (Lua 5.4 and
# LuaJIT) against Go's concurrency.NewSTM, in pairs; then instructions per
# commit under callgrind (bench/stm.lua, bench/README.md "STM hot key").
# STM_ARGS="--n 50 --pairs 1 --callgrind 0": the smoke size CI runs.
STM_ARGS ?=
bench-stm: deps
	$(MAKE) -s LUA=lua5.4
	$(MAKE) -s LUA=luajit
	$(BENCH_ENV) lua5.4 bench/stm.lua $(STM_ARGS)

# RSS after require, after connect and per 1000 watchers (bench/README.md).
bench-memory: deps
	$(MAKE) -s LUA=lua5.4
	$(BENCH_ENV) lua5.4 tools/with-etcd.lua lua5.4 bench/memory.lua

# Where the client's time goes on A-D: strace, perf, callgrind (bench/README.md).
bench-profile: deps
	$(MAKE) -s LUA=lua5.4
	$(BENCH_ENV) lua5.4 tools/with-etcd.lua sh bench/profile.sh build/bench/profile

# the module and the Lua files as tools/env.sh points this runtime at them
RUN_ENV = ETCD3_LUA=$(notdir $(LUA)) ETCD3_BUILD=$(BUILD) . tools/env.sh &&

# Inside one real nginx worker, side by side with lua-resty-etcd
# (bench/README.md, "OpenResty"). The harness is kept outside this
# repository (it vendors lua-resty-etcd): OPENRESTY_BENCH is its directory.
# ROUNDS=1 OPENRESTY_BENCH_ARGS="--dur 2 --ns 50 --idle 2 --w3-n 5": smoke size.
OPENRESTY_BENCH ?= ../shared/peers/openresty
OPENRESTY_BENCH_ARGS ?=
ROUNDS ?= 3
bench-openresty:
	@test -x "$(OPENRESTY_BENCH)/run.sh" || { \
	  echo "bench-openresty: no $(OPENRESTY_BENCH)/run.sh (set OPENRESTY_BENCH to the harness directory)" >&2; exit 2; }
	$(MAKE) -s LUA=luajit
	PROJ="$(CURDIR)" ROUNDS="$(ROUNDS)" "$(OPENRESTY_BENCH)/run.sh" $(OPENRESTY_BENCH_ARGS)

# Instructions per serial get inside one nginx worker (callgrind), ours
# against lua-resty-etcd, by layer (bench/ngx_instructions.py, bench/README.md
# "OpenResty"); the harness's configuration and vendor dir at run time.
bench-ngx-instructions: deps
	$(MAKE) -s LUA=luajit
	$(MAKE) -s LUA=lua5.4
	ETCD3_LUA=lua5.4 ETCD3_BUILD=build/lua5.4 . tools/env.sh && lua5.4 tools/with-etcd.lua python3 bench/ngx_instructions.py --harness "$(OPENRESTY_BENCH)"

# A gateway's whole configuration in every nginx worker (bench/README.md,
# "Gateway"): etcd3.ngx mirror + changes() vs lua-resty-etcd readdir +
# watchdir per worker, 10 000 x 1 KiB JSON, 4 workers, in pairs.
# lua-resty-etcd is loaded from the harness's vendor dir at run time.
# GATEWAY_ARGS=--smoke: 1 pair, 500 keys (~1 min); --pairs N, --help.
GATEWAY_ARGS ?=
bench-gateway:
	@test -e "$(OPENRESTY_BENCH)/vendor/lua-resty-etcd/lib/resty/etcd.lua" || { \
	  echo "bench-gateway: no lua-resty-etcd under $(OPENRESTY_BENCH)/vendor (set OPENRESTY_BENCH)" >&2; exit 2; }
	@test -e /usr/lib/x86_64-linux-gnu/lua/5.1/cjson.so || { \
	  echo "bench-gateway: needs lua-cjson for nginx's LuaJIT (apt-get install lua-cjson)" >&2; exit 2; }
	$(MAKE) -s LUA=luajit
	python3 bench/gateway.py --resty-dir "$(OPENRESTY_BENCH)/vendor" $(GATEWAY_ARGS)

demo: deps
	$(MAKE) -s LUA=$(LUA)
	$(RUN_ENV) $(LUA) tools/with-etcd.lua $(LUA) examples/demo.lua

run: $(MODULE)
	@[ -n "$(SCRIPT)" ] || { echo 'usage: make run SCRIPT=file.lua [ARGS="..."] [LUA=luajit]' >&2; exit 2; }
	@$(RUN_ENV) $(LUA) $(SCRIPT) $(ARGS)

test: deps
	sh tools/test.sh

# The quick loop: the Lua 5.4 module and spec helpers, then spec/ once with
# busted's summary (tools/check.sh); `make test` runs everything.
check: deps
	$(MAKE) -s LUA=lua5.4 spec-helpers
	sh tools/check.sh

# libFuzzer targets for the codec (fuzz/): every reply decoded, every
# request encoded; `make fuzz FUZZ_SECONDS=600` runs each that long on a
# seed corpus recorded from a real etcd (tools/fuzz.sh).
FUZZ_DIR     := build/fuzz
FUZZ_SECONDS ?= 600
FUZZ_CFLAGS  := -g -O1 -fno-omit-frame-pointer $(WARN) -I/usr/include/lua5.4 -Isrc -I$(PROTO_OUT) \
                $(GRPC_CFLAGS) -fsanitize=address,undefined -fno-sanitize-recover=undefined
FUZZ_LIBS    := src/codec.c $(PB_C) -llua5.4 $(GRPC_LIBS) -lm
fuzz-build: $(FUZZ_DIR)/decode $(FUZZ_DIR)/encode $(FUZZ_DIR)/seed
$(FUZZ_DIR)/decode $(FUZZ_DIR)/encode: $(FUZZ_DIR)/%: fuzz/%.c fuzz/fuzz.h src/codec.c $(wildcard src/*.h) $(PB_C)
	@mkdir -p $(dir $@)
	clang $(FUZZ_CFLAGS) -fsanitize=fuzzer -o $@ $< $(FUZZ_LIBS)
$(FUZZ_DIR)/seed: fuzz/seed.c fuzz/fuzz.h src/codec.c $(wildcard src/*.h) $(PB_C)
	@mkdir -p $(dir $@)
	clang $(FUZZ_CFLAGS) -o $@ $< $(FUZZ_LIBS)
fuzz: deps
	sh tools/fuzz.sh $(FUZZ_SECONDS)

# Overload and scale on one client: 10 000 calls in flight, a 100 MiB range,
# 1000 leases kept alive (bench/overload.lua), then 1k/10k/100k watchers
# whose per-watcher costs must stay flat (bench/watchers.lua --flat).
# `make test` runs both at a small size on both runtimes.
OVERLOAD_ARGS ?= 10000 100 1000
SCALE_ARGS    ?= 1000 10000 100000
overload: deps
	$(MAKE) -s LUA=$(LUA)
	$(RUN_ENV) $(LUA) tools/with-etcd.lua $(LUA) bench/overload.lua $(OVERLOAD_ARGS)
	$(RUN_ENV) $(LUA) tools/with-etcd.lua $(LUA) bench/watchers.lua --flat $(SCALE_ARGS)

# Game-server scale (bench/scale.lua, bench/README.md "Game-server scale"):
# 20 processes x 50 registrations, 10 observers mirroring the prefix; a
# tenth of the registrants killed with SIGKILL must leave every observer's
# copy within TTL + 1 s, and nothing else; restarted, they must join again.
# Then the idle CPU of one process keeping 1000 leases alive. Its own etcd
# (data dir on /dev/shm); `make test` runs it at 4 x 10 with 3 observers.
GAME_SCALE_ARGS ?= --procs 20 --per 50 --observers 10
scale: deps
	$(MAKE) -s LUA=$(LUA)
	$(RUN_ENV) $(LUA) bench/scale.lua $(GAME_SCALE_ARGS)

# Linearizable reads: m:sync() + a local read against a linearizable get,
# in pairs, with nothing else writing and with the store moved on outside
# the prefix before each read (bench/sync.lua, bench/README.md "Mirror sync").
SYNC_ARGS ?=
bench-sync: deps
	$(MAKE) -s LUA=lua5.4
	$(BENCH_ENV) lua5.4 bench/sync.lua $(SYNC_ARGS)

# valgrind's memcheck over the KV, lease and watch specs (Lua 5.4): no
# definite leak, no invalid access (tools/memcheck.sh).
MEMCHECK_SPECS ?= spec/02-kv_spec.lua spec/05-lease_spec.lua spec/06-watch_spec.lua
memcheck: deps
	$(MAKE) -s LUA=lua5.4 spec-helpers
	sh tools/memcheck.sh $(MEMCHECK_SPECS)

# Mixed load on one client against a 3-member cluster, a member restarted
# every minute; RSS, fds and threads sampled every 10 s must stop growing
# after warm-up (tools/soak.lua states the bounds).
SOAK_MINUTES ?= 10
SOAK_LUA     ?= lua5.4
soak: deps
	$(MAKE) -s LUA=$(SOAK_LUA)
	LUA_PATH="lua/?.lua;lua/?/init.lua;./?.lua;;" LUA_CPATH="build/$(SOAK_LUA)/?.so;;" \
	  $(SOAK_LUA) tools/soak.lua $(SOAK_MINUTES)

lint:
	luacheck lua spec examples tools debian $(wildcard bench)

install: $(MODULE)
	mkdir -p $(INST_LIBDIR)/etcd3 $(INST_LUADIR)/etcd3
	cp $(MODULE) $(INST_LIBDIR)/etcd3/core.so
	cp lua/etcd3/*.lua $(INST_LUADIR)/etcd3/

clean:
	rm -rf build
