#!/bin/sh
# The release as a user installs it (the `rock` step of tools/test.sh):
#
# 1. `make dist` builds the source rock; etcd3._VERSION must be the rock's
#    version without its rockspec revision ("lua-etcd3 0.1.0" for rock
#    0.1.0-1), and CHANGELOG.md must have a section for that version.
# 2. From an empty temp directory holding only the rock and a copy of
#    examples/demo.lua, with a clean environment (no LUA_PATH, no checkout on
#    any path, and apt-get, protoc-c, git, curl and wget failing if called),
#    `luarocks install` builds it into a fresh tree for Lua 5.4, 5.3, 5.1
#    and LuaJIT (the four side by side; the compiler's warnings on, none
#    as an error), each runs the demo against
#    one throwaway etcd, then `luarocks remove` must leave no file of it in
#    its tree. The temp directory goes at the end, trees included.
#
# The throwaway etcd is tools/with-etcd.lua's, which runs this script again
# with --installs ROCK VERSION; the pieces are tools/rock-lib.sh's, shared
# with tools/check-openresty-tree.sh.
set -eu
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
. tools/rock-lib.sh

rock_begin tools/check-rock.sh "$@"

rock_version=$3
rock_workdir rock "$2"

# runtimes: name, interpreter, luarocks flags; LuaJIT uses Lua 5.1's tree
# layout and LuaJIT's headers
runtimes="lua5.4 lua5.3 lua5.1 luajit"
flags() {
  case $1 in
    lua5.4) echo "--lua-version 5.4" ;;
    lua5.3) echo "--lua-version 5.3" ;;
    lua5.1) echo "--lua-version 5.1" ;;
    luajit) echo "--lua-version 5.1 --lua-dir /usr" ;;
  esac
}
extra() { if [ "$1" = luajit ]; then echo "LUA_INCDIR=/usr/include/luajit-2.1"; fi; }
luadir() { case $1 in lua5.4) echo 5.4 ;; lua5.3) echo 5.3 ;; *) echo 5.1 ;; esac; }

for rt in $runtimes; do
  # shellcheck disable=SC2046
  rock_luarocks "$work/install-$rt.log" $(flags "$rt") --tree "$work/tree-$rt" install "$rock" $(extra "$rt") &
  echo "$!" > "$work/install-$rt.pid"
done
status=0
for rt in $runtimes; do
  if wait "$(cat "$work/install-$rt.pid")"; then
    rock_installed "$rt" "$work/install-$rt.log" || status=1
  else
    echo "== $rt: install FAILED"; tail -n 30 "$work/install-$rt.log"; status=1
  fi
done
[ "$status" = 0 ] || exit 1

for rt in $runtimes; do
  tree=$work/tree-$rt v=$(luadir "$rt")
  rock_demo "$rt" "$rt" "$tree/share/lua/$v" "$tree/lib/lua/$v"
  # shellcheck disable=SC2046
  rock_removed "$rt" "$tree" $(flags "$rt")
done
