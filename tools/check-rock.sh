#!/bin/sh
# Installs the rock with `luarocks make` into a temp tree, for Lua 5.4 and
# for LuaJIT, and requires it from outside the checkout.
set -eu
top=$(cd "$(dirname "$0")/.." && pwd)
tree=$(mktemp -d /tmp/etcd3-rock.XXXXXX)
trap 'rm -rf "$tree"' EXIT
cd "$top"
luarocks --lua-version 5.4 --tree "$tree/5.4" make rockspec/lua-etcd3-scm-1.rockspec
luarocks --lua-version 5.1 --lua-dir /usr --tree "$tree/jit" make rockspec/lua-etcd3-scm-1.rockspec \
  LUA_INCDIR=/usr/include/luajit-2.1
cd /
lua5.4 -e "package.path='$tree/5.4/share/lua/5.4/?.lua;$tree/5.4/share/lua/5.4/?/init.lua'
  package.cpath='$tree/5.4/lib/lua/5.4/?.so'
  local e = require 'etcd3'; assert(e.prefix_end('a') == 'b'); print(e._VERSION, 'lua5.4 ok')"
luajit -e "package.path='$tree/jit/share/lua/5.1/?.lua;$tree/jit/share/lua/5.1/?/init.lua'
  package.cpath='$tree/jit/lib/lua/5.1/?.so'
  local e = require 'etcd3'; assert(e.prefix_end('a') == 'b'); print(e._VERSION, 'luajit ok')"
