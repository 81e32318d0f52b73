#!/bin/sh
# usage: sh tools/memcheck.sh SPEC...   (`make memcheck`)
#
# Runs each spec file under valgrind's memcheck with Lua 5.4 and the
# module of build/lua5.4: the run fails on any invalid access, use of
# uninitialised memory or definitely lost block (valgrind exits 99), or on
# a failing spec. No suppression file: none is needed with gRPC 1.51 and
# Lua 5.4 on Debian 12 (gRPC's and Lua's one-time allocations stay
# reachable, or "possibly lost" for the stacks of the threads gRPC keeps,
# and neither kind is counted as an error).
# etcd, etcdctl and the shells the specs start are not traced.
# valgrind runs one thread at a time: --fair-sched=yes hands the CPU round
# the threads in turn, so the engine thread renews a lease while a spec
# keeps the Lua thread busy (without it, "a busy Lua CPU loop" starved the
# engine thread past the lease's TTL).
set -u
cd "$(dirname "$0")/.."
command -v valgrind > /dev/null || { echo "memcheck: valgrind is not installed" >&2; exit 2; }
LOG=${MEMCHECK_LOG:-$(mktemp -d /tmp/etcd3-memcheck.XXXXXX)}
status=0
for spec in "$@"; do
  name=$(basename "$spec" .lua)
  valgrind --tool=memcheck --fair-sched=yes --leak-check=full --show-leak-kinds=definite \
    --errors-for-leak-kinds=definite --error-exitcode=99 --num-callers=40 \
    --log-file="$LOG/$name.valgrind" \
    lua5.4 /usr/bin/busted --cpath="build/lua5.4/?.so" "$spec" > "$LOG/$name.out" 2>&1
  rc=$?
  summary=$(grep -E '^[0-9]+ success' "$LOG/$name.out" | tail -n 1)
  errors=$(grep 'ERROR SUMMARY' "$LOG/$name.valgrind" | sed 's/^==[0-9]*== //')
  lost=$(grep 'definitely lost:' "$LOG/$name.valgrind" | sed 's/^==[0-9]*== *//')
  echo "memcheck $name: exit $rc; ${summary:-no busted summary}; $errors; ${lost:-no leak summary}"
  if [ "$rc" != 0 ]; then
    status=1
    grep -A 30 -E 'Invalid|uninitialised|definitely lost in' "$LOG/$name.valgrind" | head -n 80
    tail -n 20 "$LOG/$name.out"
  fi
done
echo "memcheck logs: $LOG"
exit $status
