# shellcheck shell=sh
# Sourced (from the checkout root) by the checks that install the release's
# source rock as a user does: tools/check-rock.sh and
# tools/check-openresty-tree.sh. Each runs twice: first in the checkout
# (rock_dist, then rock_with_etcd runs the script again under a throwaway
# etcd with --installs ROCK ROCK_VERSION), then in an empty temp directory
# (rock_workdir) where it installs, runs and removes the rock.

# rock_begin SCRIPT "$@": in the checkout (no --installs), rock_dist then
# rock_with_etcd SCRIPT, which does not return; with --installs, nothing.
rock_begin() {
  if [ "${2:-}" != --installs ]; then
    rock_dist
    rock_with_etcd "$1"
  fi
}

# rock_dist: `make dist`; sets rock (its path) and rock_version (0.1.0-1).
# etcd3._VERSION must be the rock's version without its rockspec revision
# ("lua-etcd3 0.1.0" for rock 0.1.0-1), and CHANGELOG.md must have a
# section for that version.
rock_dist() {
  make -s dist > /dev/null
  version=$(make -s version)
  rock_version=$(sed -n 's/^version = "\(.*\)"$/\1/p' rockspec/lua-etcd3-"$version"-*.rockspec)
  # the rockspec's revision (-1) is LuaRocks', the code's version is before it
  if [ "lua-etcd3 ${rock_version%-*}" != "lua-etcd3 $version" ]; then
    echo "rock: rock $rock_version but etcd3._VERSION says $version" >&2; exit 1
  fi
  grep -q "^## \[$version\]" CHANGELOG.md ||
    { echo "rock: CHANGELOG.md has no \"## [$version]\" section" >&2; exit 1; }
  rock=$(pwd)/build/dist/lua-etcd3-$rock_version.src.rock
}

# rock_with_etcd SCRIPT: runs `sh SCRIPT --installs ROCK ROCK_VERSION` with
# ETCDCTL_ENDPOINTS naming a throwaway etcd (tools/with-etcd.lua, on the
# Lua 5.4 build), in place of this shell.
rock_with_etcd() {
  rock_script=$1
  set -- # (tools/env.sh reads its runtime from $1)
  make -s LUA=lua5.4 # the throwaway etcd's helper uses etcd3.core
  ETCD3_LUA=lua5.4 . tools/env.sh
  exec lua5.4 tools/with-etcd.lua sh "$rock_script" --installs "$rock" "$rock_version"
}

# rock_workdir NAME ROCK: cds into $work, a new temp directory holding only
# the rock and a copy of examples/demo.lua, removed at exit with all that
# the check put in it; sets rock to the rock's file name. The install must
# fetch nothing and generate nothing: $work/no-fetch holds tools that would
# (apt-get, protoc-c, git, curl, wget…), each recording its call in
# $work/fetched and failing; rock_luarocks puts them first on PATH.
rock_workdir() {
  work=$(mktemp -d "/tmp/etcd3-$1.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  cp "$2" "$work/"
  cp examples/demo.lua "$work/demo.lua"
  cd "$work" || exit 1
  rock=$(basename "$2")
  mkdir "$work/no-fetch"
  for tool in apt-get apt dpkg-deb protoc-c protoc git curl wget; do
    printf '#!/bin/sh\necho "%s called during the install: $*" >> "%s/fetched"\nexit 1\n' \
      "$tool" "$work" > "$work/no-fetch/$tool"
    chmod +x "$work/no-fetch/$tool"
  done
}

# clean COMMAND...: runs a command with nothing of the caller's environment
# but PATH, HOME (the temp dir) and etcd's endpoint
clean() {
  env -i PATH=/usr/local/bin:/usr/bin:/bin HOME="$work" ETCDCTL_ENDPOINTS="$ETCDCTL_ENDPOINTS" "$@"
}

# rock_luarocks LOG ARG...: `luarocks ARG...` in the clean environment with
# the failing fetchers first on PATH, its output in LOG
rock_luarocks() {
  rock_log=$1; shift
  clean env PATH="$work/no-fetch:/usr/local/bin:/usr/bin:/bin" luarocks "$@" > "$rock_log" 2>&1
}

# rock_installed NAME LOG: after an install that succeeded, whose output is
# in LOG: nothing was fetched, and the compiler ran with -Wall -Wextra but
# no -Werror (a user's compiler may warn where ours does not: the rockspec
# clears WERROR).
rock_installed() {
  [ ! -e "$work/fetched" ] || { echo "== $1: fetched during an install:"; cat "$work/fetched"; return 1; }
  grep -q -- '-Wall -Wextra' "$2" || { echo "== $1: no compiler command with -Wall -Wextra in $2"; return 1; }
  if grep -q -- '-Werror' "$2"; then
    echo "== $1: the rock built with -Werror:"; grep -m 3 -- '-Werror' "$2"; return 1
  fi
  echo "== $1: installed"
}

# rock_demo NAME INTERPRETER SHARE LIB: with the installed files on the
# paths only (SHARE: the tree's share/lua/5.x, LIB: its lib/lua/5.x), the
# installed module's version is the rock's, and the demo runs against the
# throwaway etcd.
rock_demo() {
  clean env LUA_PATH="$3/?.lua;$3/?/init.lua" LUA_CPATH="$4/?.so" "$2" -e "
    local want = 'lua-etcd3 ' .. ('$rock_version'):match('^(.*)%-%d+$')
    local got = require('etcd3')._VERSION
    assert(got == want, 'etcd3._VERSION is ' .. got .. ', the rock is $rock_version')"
  clean env LUA_PATH="$3/?.lua;$3/?/init.lua" LUA_CPATH="$4/?.so" "$2" demo.lua \
    > "$work/demo-$1.log" 2>&1 || { echo "== $1: demo FAILED"; cat "$work/demo-$1.log"; return 1; }
  echo "== $1: demo ok"
}

# rock_removed NAME TREE ARG...: `luarocks ARG... --tree TREE remove
# lua-etcd3` leaves no file of it in TREE
rock_removed() {
  rock_name=$1 rock_tree=$2; shift 2
  clean luarocks "$@" --tree "$rock_tree" remove lua-etcd3 > "$work/remove-$rock_name.log" 2>&1 ||
    { echo "== $rock_name: remove FAILED"; cat "$work/remove-$rock_name.log"; return 1; }
  left=$(cd "$rock_tree" && find . -path '*etcd3*')
  [ -z "$left" ] || { echo "== $rock_name: left behind after remove:"; echo "$left"; return 1; }
  echo "== $rock_name: removed, nothing left"
}
