#!/bin/sh
# usage: sh tools/fuzz.sh [SECONDS]    (`make fuzz FUZZ_SECONDS=600`)
#
# Builds the codec's libFuzzer targets (fuzz/), records a seed corpus of
# real replies from a throwaway etcd (tools/record-corpus.lua, encoded to
# wire bytes by fuzz/seed), then runs each target for SECONDS (default
# 600) and prints its executions and executions per second. Fails on any
# crash, leak, sanitizer report or broken round trip; the input that did
# it is left in build/fuzz/artifacts/. FUZZ_TARGETS="encode" runs one.
set -eu
cd "$(dirname "$0")/.."
SECS=${1:-600}
MAKE=${MAKE:-make}
DIR=build/fuzz
$MAKE -s LUA=lua5.4 all fuzz-build
rm -rf "$DIR/seeds-decode"
mkdir -p "$DIR/seeds-decode" "$DIR/corpus-decode" "$DIR/corpus-encode" "$DIR/artifacts"
# the recording runs on the interpreter: never under a sanitizer preload
env -u LD_PRELOAD LUA_PATH="lua/?.lua;lua/?/init.lua;./?.lua;;" LUA_CPATH="build/lua5.4/?.so;;" \
  lua5.4 tools/record-corpus.lua "$DIR/recorded.lua"
"$DIR/seed" "$DIR/recorded.lua" "$DIR/seeds-decode"
status=0
for t in ${FUZZ_TARGETS:-decode encode}; do
  # the working corpus grows across runs (build/, never committed); the
  # seeds are recorded afresh each time
  seeds=""
  [ "$t" = decode ] && seeds="$DIR/seeds-decode"
  # shellcheck disable=SC2086
  if "$DIR/$t" -max_total_time="$SECS" -print_final_stats=1 -timeout=30 -rss_limit_mb=2048 \
      -artifact_prefix="$DIR/artifacts/$t-" "$DIR/corpus-$t" $seeds > "$DIR/$t.log" 2>&1; then
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$DIR/$t.log")
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$DIR/$t.log")
    echo "fuzz $t: ${runs} executions in ${SECS} s, ${rate} exec/s, corpus $(ls "$DIR/corpus-$t" | wc -l) inputs"
  else
    echo "fuzz $t: FAILED (log $DIR/$t.log, input in $DIR/artifacts/)"
    grep -E "ERROR|SUMMARY|^[a-z].*(changed|does not|unexpected)" "$DIR/$t.log" | head -n 20
    status=1
  fi
done
exit $status
