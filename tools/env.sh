# Source this from the checkout to run any Lua script against the build
# tree, without installing:
#
#   make LUA=luajit                 # build/luajit/etcd3/core.so
#   . tools/env.sh luajit           # bash; in sh: ETCD3_LUA=luajit . tools/env.sh
#   luajit examples/demo.lua
#
# The runtime (lua5.4 by default, luajit, lua5.3, lua5.1) picks the build
# directory (ETCD3_BUILD overrides it). It sets LUA_PATH and LUA_CPATH (and
# LUA_PATH_5_x/LUA_CPATH_5_x for Lua 5.3/5.4, which those read first) to
# lua/, the checkout root (spec.helpers, tools) and the build directory;
# the default paths follow (";;").
etcd3_root=$(pwd)
# bash knows the sourced file's own path; other shells: run from the checkout
[ -n "${BASH_SOURCE:-}" ] && etcd3_root=$(cd "$(dirname "$BASH_SOURCE")/.." && pwd)
etcd3_lua=${1:-${ETCD3_LUA:-lua5.4}}
etcd3_lua=${etcd3_lua##*/}
etcd3_build=${ETCD3_BUILD:-build/$etcd3_lua}
case $etcd3_build in /*) ;; *) etcd3_build=$etcd3_root/$etcd3_build ;; esac
if [ ! -f "$etcd3_root/lua/etcd3/init.lua" ]; then
  echo "tools/env.sh: source it from the lua-etcd3 checkout" >&2
else
  [ -f "$etcd3_build/etcd3/core.so" ] ||
    echo "tools/env.sh: $etcd3_build/etcd3/core.so is not built yet (make LUA=$etcd3_lua)" >&2
  LUA_PATH="$etcd3_root/lua/?.lua;$etcd3_root/lua/?/init.lua;$etcd3_root/?.lua;;"
  LUA_CPATH="$etcd3_build/?.so;;"
  export LUA_PATH LUA_CPATH
  case $etcd3_lua in
    lua5.[34])
      etcd3_v=$(echo "$etcd3_lua" | sed 's/lua5\./5_/')
      eval "export LUA_PATH_$etcd3_v=\"\$LUA_PATH\" LUA_CPATH_$etcd3_v=\"\$LUA_CPATH\""
      unset etcd3_v ;;
  esac
fi
unset etcd3_root etcd3_lua etcd3_build
