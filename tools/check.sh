#!/bin/sh
# `make check`: every spec once on Lua 5.4 against build/lua5.4 (built by
# the Makefile first), ending with busted's summary line; non-zero exit
# when a spec failed or errored. No LuaJIT, sanitizer, soak, fuzz or
# benchmark run (`make test` runs all of them).
set -u
cd "$(dirname "$0")/.."
. tools/spec-pids.sh
ETCD3_SPEC_PIDFILE=$(mktemp /tmp/etcd3-check.XXXXXX)
export ETCD3_SPEC_PIDFILE
trap 'spec_pids_cleanup; rm -f "$ETCD3_SPEC_PIDFILE"' EXIT
trap 'exit 130' INT TERM
busted --lua=lua5.4 --cpath="build/lua5.4/?.so" spec
