# lua-etcd3 — build, test, demo, install.
#
#   make                 etcd3.core for Lua 5.4    (build/lua5.4/etcd3/core.so)
#   make LUA=luajit      etcd3.core for LuaJIT 2.1 (build/luajit/etcd3/core.so)
#   make demo            examples/demo.lua against a throwaway local etcd
#   make test            installs what is missing, then every spec on both
#                        runtimes, a sanitizer run, and luacheck
#   make install         honours LuaRocks' variables (INST_LIBDIR, INST_LUADIR)
#
# etcd's .proto files come from an etcd source tree: ETCD_PROTO_DIR, or by
# default Debian's golang-etcd-server-dev unpacked into build/ (never committed).

LUA        ?= lua5.4
BUILD      ?= build/$(notdir $(LUA))$(if $(SANITIZE),-san)
PROTO_OUT  := build/proto
ETCD_DEB_DIR := build/etcd-src
ETCD_PROTO_DIR ?= $(ETCD_DEB_DIR)/usr/share/gocode/src/go.etcd.io/etcd

ifeq ($(notdir $(LUA)),luajit)
LUA_INCDIR ?= /usr/include/luajit-2.1
else
LUA_INCDIR ?= /usr/include/$(notdir $(LUA))
endif

CC       ?= cc
CFLAGS   ?= -O2 -g
WARN     := -std=c99 -D_GNU_SOURCE -Wall -Wextra -Werror
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

INST_LIBDIR ?= /usr/local/lib/lua/5.4
INST_LUADIR ?= /usr/local/share/lua/5.4

SPEC_FORK := $(BUILD)/spec_fork.so

.PHONY: all deps demo test check lint install clean bench bench-smoke bench-openresty spec-helpers
all: $(MODULE)

# Test-only helper module (fork for the "use after fork" spec); not installed.
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

$(PB_C): $(ETCD_PROTO_DIR)/etcdserver/etcdserverpb/rpc.proto proto/prepare.lua
	@mkdir -p $(PROTO_OUT)
	$(LUA) proto/prepare.lua $(ETCD_PROTO_DIR) $(PROTO_OUT)
	cd $(PROTO_OUT) && protoc-c --c_out=. kv.proto auth.proto rpc.proto

# Debian's golang-etcd-server-dev, unpacked without installing its Go deps.
$(ETCD_DEB_DIR)/usr/share/gocode/src/go.etcd.io/etcd/etcdserver/etcdserverpb/rpc.proto:
	@mkdir -p $(ETCD_DEB_DIR)
	cd $(ETCD_DEB_DIR) && rm -f *.deb && apt-get download golang-etcd-server-dev
	dpkg-deb -x $(ETCD_DEB_DIR)/golang-etcd-server-dev_*.deb $(ETCD_DEB_DIR)

deps:
	sh tools/deps.sh

BENCH_ENV := LUA_PATH="lua/?.lua;lua/?/init.lua;./?.lua;;" LUA_CPATH="build/lua5.4/?.so;;"

# Side by side with Go clientv3, python-etcd3 and Node etcd3 (bench/README.md).
bench: deps
	sh tools/deps.sh bench
	$(MAKE) -s LUA=lua5.4
	$(BENCH_ENV) lua5.4 bench/run.lua

# Every workload at 1/50 size, one round: proves the harness works (CI).
bench-smoke: deps
	sh tools/deps.sh bench
	$(MAKE) -s LUA=lua5.4
	$(BENCH_ENV) lua5.4 bench/run.lua --scale 50 --rounds 1

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

demo: deps
	$(MAKE) -s LUA=lua5.4
	LUA_PATH="lua/?.lua;lua/?/init.lua;./?.lua;;" LUA_CPATH="build/lua5.4/?.so;;" \
	  lua5.4 tools/with-etcd.lua lua5.4 examples/demo.lua

test: deps
	sh tools/test.sh

lint:
	luacheck lua spec examples tools $(wildcard bench)

install: $(MODULE)
	mkdir -p $(INST_LIBDIR)/etcd3 $(INST_LUADIR)/etcd3
	cp $(MODULE) $(INST_LIBDIR)/etcd3/core.so
	cp lua/etcd3/*.lua $(INST_LUADIR)/etcd3/

clean:
	rm -rf build
