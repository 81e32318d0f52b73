#!/bin/sh
# The whole test run (`make test`): builds etcd3.core for Lua 5.4 and
# LuaJIT, runs every spec under both, builds for Lua 5.1 and 5.3 and runs
# the demo there, runs it again with the module built
# with AddressSanitizer + UBSan, checks that the release's source rock
# (`make dist`) installs offline on Lua 5.4, 5.3, 5.1 and LuaJIT, runs the
# demo and removes cleanly, and that etcd3._VERSION is the rock's version
# (tools/check-rock.sh), installs it into OpenResty's tree as the README
# says and loads it from there in nginx (tools/check-openresty-tree.sh),
# that the Debian package (`make deb`) installs, runs the demo with the
# system paths only under Lua 5.4 to 5.1 and LuaJIT and purges cleanly
# (tools/check-deb.sh), runs luacheck, runs the benchmark harness and the
# STM hot-key benchmark at a small size, fuzzes the codec and soaks a
# client for a minute each, overloads one and runs the game-server scale
# at a small size, runs valgrind's memcheck over the KV, lease and watch specs, and
# ends with one line "N passed, M failed".
#
# Every etcd (and nginx, and wrong peer) the specs start is recorded by PID
# in a file; whatever a crashed run left behind is stopped by those PIDs at
# the end.
set -u
cd "$(dirname "$0")/.."
MAKE=${MAKE:-make}
# every build of this run has warnings as errors (a user's build does not:
# see the Makefile)
WERROR=-Werror
export WERROR
LOG=$(mktemp -d /tmp/etcd3-test.XXXXXX)
export ETCD3_SPEC_PIDFILE="$LOG/pids"
: > "$ETCD3_SPEC_PIDFILE"
passed=0
failed=0
failed_steps=

. tools/spec-pids.sh
trap spec_pids_cleanup EXIT INT TERM

# count_busted LOGFILE: adds busted's summary line to the totals
count_busted() {
  line=$(grep -E '^[0-9]+ successes? / [0-9]+ failures? / [0-9]+ errors? / [0-9]+ pending' "$1" | tail -n 1)
  if [ -z "$line" ]; then
    echo "!! no busted summary in $1 (the run crashed)"
    failed=$((failed + 1)); failed_steps="$failed_steps $(basename "$1" .log)(crashed)"
    return
  fi
  s=$(echo "$line" | awk '{print $1}'); f=$(echo "$line" | awk '{print $4}'); e=$(echo "$line" | awk '{print $7}')
  passed=$((passed + s))
  failed=$((failed + f + e))
}

# step NAME COMMAND...: a check that passes or fails as a whole
step() {
  name=$1; shift
  if "$@" > "$LOG/$name.log" 2>&1; then
    passed=$((passed + 1)); echo "== $name: ok"
  else
    failed=$((failed + 1)); failed_steps="$failed_steps $name"
    echo "== $name: FAILED"; tail -n 40 "$LOG/$name.log"
  fi
}

# start_specs NAME LUA CPATH [env...]: the whole spec/ directory under one
# runtime, in the background (finish_specs waits and counts). The three
# runs share the machine: most of a spec's time is spent waiting for etcd,
# and the specs hold their bounds on a loaded machine (they were run side
# by side with busy loops before this), so running them at once takes the
# time of the longest instead of the sum.
spec_runs=
start_specs() {
  name=$1; lua=$2; cpath=$3; shift 3
  echo "== specs under $name: started"
  env "$@" busted --lua="$lua" --cpath="$cpath" --output=utfTerminal spec > "$LOG/$name.log" 2>&1 &
  spec_runs="$spec_runs $name:$!"
}

finish_specs() {
  for run in $spec_runs; do
    wait "${run#*:}"
    name=${run%%:*}
    echo "== specs under $name"
    # the progress line is long: what failed and the summary
    grep -avE '^(●|◼|◌|✱|[+*-])*$' "$LOG/$name.log" | tail -n 60
    count_busted "$LOG/$name.log"
  done
}

build_ok=1
for target in "LUA=lua5.4" "LUA=luajit" "LUA=lua5.4 SANITIZE=1" "LUA=luajit SANITIZE=1"; do
  # shellcheck disable=SC2086
  $MAKE -s $target spec-helpers > "$LOG/build.log" 2>&1 || { build_ok=0; cat "$LOG/build.log"; }
done
# both compilers, warnings as errors
step build-clang $MAKE -s CC=clang BUILD=build/clang-check
# PUC Lua 5.1 and 5.3: the module builds and the demo (puts, gets, deletes
# against a throwaway etcd) runs; the specs run on 5.4 and LuaJIT only
for v in 5.1 5.3; do
  step "lua$v-demo" $MAKE -s demo LUA="lua$v"
done

# the Go peer of the interop specs, once, before the runs that use it
step gopeer sh -c '. tools/env.sh lua5.4 && lua5.4 -e "assert(require(\"spec.helpers.gopeer\").build())"'

if [ "$build_ok" = 1 ]; then
  passed=$((passed + 1))
  start_specs lua5.4 lua5.4 "build/lua5.4/?.so"
  start_specs luajit luajit "build/luajit/?.so"
  # A non-instrumented interpreter loading an instrumented module needs
  # the ASan runtime preloaded. Leak checking covers the whole process.
  # The nginx it starts inherits the preload and loads the instrumented
  # LuaJIT build (the engine thread writes into nginx's shared dicts).
  ASAN_LIB=$(gcc -print-file-name=libasan.so)
  UBSAN_LIB=$(gcc -print-file-name=libubsan.so)
  start_sanitized() {
    start_specs "$1" lua5.4 "build/lua5.4-san/?.so" \
      ETCD3_SPEC_NGX_BUILD=build/luajit-san \
      LD_PRELOAD="$ASAN_LIB $UBSAN_LIB" \
      ASAN_OPTIONS="detect_leaks=1:abort_on_error=1:log_path=$LOG/asan:suppressions=$(pwd)/tools/asan.supp" \
      LSAN_OPTIONS="suppressions=$(pwd)/tools/lsan.supp:print_suppressions=0" \
      UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:log_path=$LOG/ubsan"
  }
  start_sanitized lua5.4-sanitized
  finish_specs
  # LeakSanitizer's tracer itself now and then crashes at the exit of a
  # process whose threads are still ending (gRPC's, after its shutdown;
  # google/sanitizers#1353): such a report says that no leak check ran, not
  # that a leak was found. Then, and only then, the sanitized run is made
  # again, once; any report of the second run fails the step.
  # -> whether there are reports and every one is that crash alone
  tracer_crashed() {
    ls "$LOG"/ubsan.* > /dev/null 2>&1 && return 1
    ls "$LOG"/asan.* > /dev/null 2>&1 || return 1
    for report in "$LOG"/asan.*; do
      grep -q "LeakSanitizer has encountered a fatal error" "$report" || return 1
      grep -q "ERROR: " "$report" && return 1
    done
    return 0
  }
  if tracer_crashed; then
    echo "== sanitizer reports: only LeakSanitizer's tracer crashed at exit:"
    cat "$LOG"/asan.* | head -n 20
    mkdir "$LOG/tracer-crash" && mv "$LOG"/asan.* "$LOG/tracer-crash/"
    spec_runs=
    start_sanitized lua5.4-sanitized-again
    finish_specs
  fi
  # (ls of both patterns failed whenever one matched nothing: an ASan report
  # without a UBSan one went unnoticed)
  if ls "$LOG"/asan.* "$LOG"/ubsan.* 2>/dev/null | grep -q .; then
    echo "== sanitizer reports:"; cat "$LOG"/asan.* "$LOG"/ubsan.* 2>/dev/null | head -n 80
    failed=$((failed + 1)); failed_steps="$failed_steps sanitizers"
  else
    echo "== sanitizers: no reports"; passed=$((passed + 1))
  fi
else
  echo "== build FAILED"; failed=$((failed + 1)); failed_steps="$failed_steps build"
fi

# the folders to check are the Makefile's (`make lint`)
step luacheck $MAKE -s lint
step rock sh tools/check-rock.sh
# the rock installed into OpenResty's tree (its layout reproduced with
# Debian's luajit2) by README's luarocks line, loaded by Debian's nginx from
# README's lua_package_path lines
step openresty-tree sh tools/check-openresty-tree.sh
step deb sh tools/check-deb.sh
# the benchmark harness at 1/50 size (benchmarks are not tests: no figure
# is asserted, only that every workload ran for every client)
step bench-smoke $MAKE -s bench-smoke
# the STM hot-key benchmark at a small size: 4 processes x 50 increments,
# one pair per runtime, no callgrind; every round's counter must equal its
# commits (`make bench-stm` runs 5 pairs of 4 x 500 and callgrind)
step bench-stm-smoke $MAKE -s bench-stm STM_ARGS="--n 50 --pairs 1 --callgrind 0"

# the codec's libFuzzer targets, 60 s each, on a seed corpus recorded
# from etcd afresh (`make fuzz` runs them longer)
step fuzz sh tools/fuzz.sh 60
# one minute of mixed load with a member restarted: RSS, fds and threads
# stay within their bounds after warm-up (`make soak` runs 10 minutes)
step soak $MAKE -s soak SOAK_MINUTES=1
step soak-luajit $MAKE -s soak SOAK_MINUTES=1 SOAK_LUA=luajit

# overload and scale at a small size on both runtimes: 2000 calls in
# flight, a 16 MiB range, 200 leases kept alive; 1k and 10k watchers with
# flat per-watcher costs (`make overload` runs 10k calls, 100 MiB, 1000
# leases and up to 100k watchers)
for lua in lua5.4 luajit; do
  step "overload-$lua" $MAKE -s overload LUA=$lua OVERLOAD_ARGS="2000 16 200" SCALE_ARGS="1000 10000"
done
# game-server scale at a small size on both runtimes: 4 processes x 10
# registrations, 3 observers; one killed with SIGKILL leaves every
# observer's copy within TTL + 1 s and joins again when restarted; 200
# leases kept alive (`make scale` runs 20 x 50, 10 observers, 1000 leases)
for lua in lua5.4 luajit; do
  step "scale-$lua" $MAKE -s scale LUA=$lua \
    GAME_SCALE_ARGS="--procs 4 --per 10 --observers 3 --window 5 --leases 200 --idle 5"
done
# valgrind's memcheck over the KV, lease and watch specs
step memcheck $MAKE -s memcheck

# what failed, by name, beside the total (a CI log may keep only its tail)
for f in "$LOG"/*.log; do
  grep -aE -A2 '^(Failure|Error) → ' "$f" 2>/dev/null | grep -av '^--$' | sed "s|^|!! $(basename "$f" .log): |"
done
[ -z "$failed_steps" ] || echo "!! steps and runs that failed:$failed_steps"
echo "logs: $LOG"
echo "$passed passed, $failed failed"
[ "$failed" = 0 ] && [ "$passed" -gt 0 ]
