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
#    and LuaJIT (the four side by side), each runs the demo against
#    one throwaway etcd, then `luarocks remove` must leave no file of it in
#    its tree. The temp directory goes at the end, trees included.
#
# The throwaway etcd is tools/with-etcd.lua's, which runs this script again
# with --installs ROCK VERSION.
set -eu
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"

if [ "${1:-}" != --installs ]; then
  make -s dist > /dev/null
  version=$(make -s version)
  rock_version=$(sed -n 's/^version = "\(.*\)"$/\1/p' rockspec/lua-etcd3-"$version"-*.rockspec)
  # the rockspec's revision (-1) is LuaRocks', the code's version is before it
  if [ "lua-etcd3 ${rock_version%-*}" != "lua-etcd3 $version" ]; then
    echo "rock: rock $rock_version but etcd3._VERSION says $version" >&2; exit 1
  fi
  grep -q "^## \[$version\]" CHANGELOG.md ||
    { echo "rock: CHANGELOG.md has no \"## [$version]\" section" >&2; exit 1; }
  make -s LUA=lua5.4 # the throwaway etcd's helper uses etcd3.core
  ETCD3_LUA=lua5.4 . tools/env.sh
  exec lua5.4 tools/with-etcd.lua sh tools/check-rock.sh --installs \
    "$top/build/dist/lua-etcd3-$rock_version.src.rock" "$rock_version"
fi

rock=$2 rock_version=$3
work=$(mktemp -d /tmp/etcd3-rock.XXXXXX)
trap 'rm -rf "$work"' EXIT
cp "$rock" "$work/"
cp examples/demo.lua "$work/demo.lua"
cd "$work"
rock=$(basename "$rock")

# clean LUA: runs a command with nothing of the caller's environment but
# PATH, HOME (the temp dir) and etcd's endpoint
clean() {
  env -i PATH=/usr/local/bin:/usr/bin:/bin HOME="$work" ETCDCTL_ENDPOINTS="$ETCDCTL_ENDPOINTS" "$@"
}

# The install must fetch nothing and generate nothing: the tools that would
# are shadowed on its PATH by ones that record their call and fail.
mkdir "$work/no-fetch"
for tool in apt-get apt dpkg-deb protoc-c protoc git curl wget; do
  printf '#!/bin/sh\necho "%s called during the install: $*" >> "%s/fetched"\nexit 1\n' \
    "$tool" "$work" > "$work/no-fetch/$tool"
  chmod +x "$work/no-fetch/$tool"
done

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
  clean env PATH="$work/no-fetch:/usr/local/bin:/usr/bin:/bin" \
    luarocks $(flags "$rt") --tree "$work/tree-$rt" install "$rock" $(extra "$rt") \
    > "$work/install-$rt.log" 2>&1 &
  echo "$!" > "$work/install-$rt.pid"
done
status=0
for rt in $runtimes; do
  if wait "$(cat "$work/install-$rt.pid")"; then
    echo "== $rt: installed"
  else
    echo "== $rt: install FAILED"; tail -n 30 "$work/install-$rt.log"; status=1
  fi
done
[ ! -e "$work/fetched" ] || { cat "$work/fetched"; status=1; }
[ "$status" = 0 ] || exit 1

for rt in $runtimes; do
  tree=$work/tree-$rt v=$(luadir "$rt")
  share=$tree/share/lua/$v lib=$tree/lib/lua/$v
  # the installed module's version is the rock's (the check of step 1,
  # on what was installed)
  clean env LUA_PATH="$share/?.lua;$share/?/init.lua" LUA_CPATH="$lib/?.so" "$rt" -e "
    local want = 'lua-etcd3 ' .. ('$rock_version'):match('^(.*)%-%d+$')
    local got = require('etcd3')._VERSION
    assert(got == want, 'etcd3._VERSION is ' .. got .. ', the rock is $rock_version')"
  clean env LUA_PATH="$share/?.lua;$share/?/init.lua" LUA_CPATH="$lib/?.so" "$rt" demo.lua \
    > "$work/demo-$rt.log" 2>&1 || { echo "== $rt: demo FAILED"; cat "$work/demo-$rt.log"; exit 1; }
  echo "== $rt: demo ok"
  # shellcheck disable=SC2046
  clean luarocks $(flags "$rt") --tree "$tree" remove lua-etcd3 > "$work/remove-$rt.log" 2>&1 ||
    { echo "== $rt: remove FAILED"; cat "$work/remove-$rt.log"; exit 1; }
  left=$(cd "$tree" && find . -path '*etcd3*')
  [ -z "$left" ] || { echo "== $rt: left behind after remove:"; echo "$left"; exit 1; }
  echo "== $rt: removed, nothing left"
done
