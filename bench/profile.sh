#!/bin/sh
# Where lua-etcd3's client time goes on workloads A-D (bench/README.md,
# "Where the time goes"). Run by `make bench-profile`, under
# tools/with-etcd.lua (which sets ETCDCTL_ENDPOINTS), from the repo root,
# with LUA_PATH/LUA_CPATH set for build/lua5.4.
#
# For each workload it runs bench/lua_driver.lua on CPU 1:
# - strace -c -f at two sizes: syscalls per operation = the difference / the
#   difference of sizes (start-up and connect cancel out);
# - perf record (cpu-clock: this VM has no hardware counters) at the large
#   size: the share of samples per shared object and per symbol;
# - valgrind --tool=callgrind (one file per thread) at two small sizes:
#   user-space instructions per operation, per thread, per shared object,
#   per function, and on the main thread inside and outside the calls from
#   Lua into etcd3.core, by the same difference;
# - when the Go clientv3 driver is built (build/bench/peersbench-go, made by
#   `make bench` or `make bench-smoke`): the same callgrind runs of it, on
#   CPU 1 as in the bench (so GOMAXPROCS is 1). valgrind 3.19 cannot run
#   `rdtscp`, which Go's runtime uses when the CPU has it, and callgrind
#   asserts on the signals of Go's asynchronous preemption: both are turned
#   off with GODEBUG (the preemption signal only interrupts a goroutine that
#   ran 10 ms without yielding).
# CALLGRIND_ONLY=1 skips strace and perf (the instruction counts alone).
# Everything lands in $OUT; bench/profile_summary.lua prints the summary.
set -eu
OUT=${1:-build/bench/profile}
EP=${ETCDCTL_ENDPOINTS:?run under tools/with-etcd.lua}
SMALL=${SMALL:-100}
LARGE=${LARGE:-2000}
CG_LARGE=${CG_LARGE:-600}
CALLGRIND_ONLY=${CALLGRIND_ONLY:-}
GO_DRIVER=build/bench/peersbench-go
TOOLS="valgrind:valgrind taskset:util-linux"
[ -n "$CALLGRIND_ONLY" ] || TOOLS="strace:strace perf:linux-perf $TOOLS"
for tool in $TOOLS; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || { echo "needs ${tool%%:*} (Debian: apt-get install ${tool#*:})" >&2; exit 1; }
done
mkdir -p "$OUT"
DRV="taskset -c 1 lua5.4 bench/lua_driver.lua -endpoint $EP"

for w in A:put B:get C:getser D:cput; do
  id=${w%%:*}
  mode=${w#*:}
  extra=""
  [ "$mode" = cput ] && extra="-c 64"
  echo "== $id ($mode)" >&2
  if [ -z "$CALLGRIND_ONLY" ]; then
    for n in $SMALL $LARGE; do
      strace -qq -c -f -o "$OUT/strace-$id-$n.txt" $DRV -mode "$mode" -n "$n" $extra -prefix "s$id$n/" >/dev/null
    done
    perf record -q -e cpu-clock -F 4000 -g -o "$OUT/perf-$id.data" \
      $DRV -mode "$mode" -n "$LARGE" $extra -prefix "p$id/" >"$OUT/perf-$id.json" 2>/dev/null
    perf report -q -i "$OUT/perf-$id.data" --no-children --sort dso --stdio >"$OUT/perf-$id-dso.txt" 2>/dev/null
    perf report -q -i "$OUT/perf-$id.data" --no-children --sort dso,sym --stdio -g none \
      >"$OUT/perf-$id-sym.txt" 2>/dev/null
  fi
  for n in $SMALL $CG_LARGE; do
    rm -f "$OUT/callgrind-$id-$n.out"*
    valgrind -q --tool=callgrind --separate-threads=yes --callgrind-out-file="$OUT/callgrind-$id-$n.out" \
      lua5.4 bench/lua_driver.lua -endpoint "$EP" -mode "$mode" -n "$n" $extra -prefix "c$id$n/" >/dev/null
    rm -f "$OUT/callgrind-go-$id-$n.out"*
    [ -x "$GO_DRIVER" ] || continue
    GODEBUG=cpu.rdtscp=off,asyncpreemptoff=1 taskset -c 1 valgrind -q --tool=callgrind --separate-threads=yes \
      --callgrind-out-file="$OUT/callgrind-go-$id-$n.out" \
      "$GO_DRIVER" -endpoint "$EP" -mode "$mode" -n "$n" $extra -prefix "g$id$n/" >/dev/null 2>&1
  done
done
[ -x "$GO_DRIVER" ] || echo "no $GO_DRIVER (make bench-smoke builds it): Go's instructions left out" >&2
lua5.4 bench/profile_summary.lua "$OUT" "$SMALL" "$LARGE" "$CG_LARGE"
