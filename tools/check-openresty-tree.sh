#!/bin/sh
# The release installed into OpenResty's own tree, as README.md's
# "Installing with LuaRocks" says (the `openresty-tree` step of
# tools/test.sh). OpenResty's packages cannot be installed on this machine;
# its layout is reproduced under a temp directory PREFIX standing for
# /usr/local/openresty:
#
#   PREFIX/luajit/bin/luajit                Debian's luajit2 (OpenResty's
#   PREFIX/luajit/include/luajit-2.1/       LuaJIT branch), its headers and
#   PREFIX/luajit/lib/libluajit-5.1.so*     shared library, copied
#
# 1. `make dist` builds the source rock (with tools/check-rock.sh's checks
#    of its version).
# 2. From an empty temp directory, in a clean environment with the tools
#    that fetch or generate failing if called, the README's luarocks line
#    for OpenResty's LuaJIT runs with /usr/local/openresty replaced by
#    PREFIX (Debian's LuaRocks 3, finding LuaJIT, its version and its
#    headers from --lua-dir alone); the module must land in
#    PREFIX/luajit/share/lua/5.1 and PREFIX/luajit/lib/lua/5.1, built
#    without -Werror.
# 3. The demo runs with PREFIX/luajit/bin/luajit against a throwaway etcd.
# 4. Debian's nginx with lua-nginx-module runs a config whose only Lua paths
#    are the README's lua_package_path and lua_package_cpath lines for that
#    tree (PREFIX for /usr/local/openresty), in an empty environment
#    (tools/openresty-tree.lua): in a worker, etcd3, etcd3.ngx and
#    etcd3.core load from PREFIX, and a put, a get and a watch work.
# 5. `luarocks remove` leaves no file of lua-etcd3 in the tree. The temp
#    directory goes at the end.
set -eu
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
. tools/rock-lib.sh

rock_begin tools/check-openresty-tree.sh "$@"

rock_version=$3
rock_workdir openresty-tree "$2"
# the temp dir stands for /usr/local: nginx's workers (nobody) read it
chmod a+rx "$work"

prefix=$work/openresty
jit=$prefix/luajit
mkdir -p "$jit/bin" "$jit/include" "$jit/lib"
cp /usr/bin/luajit "$jit/bin/luajit"
cp -r /usr/include/luajit-2.1 "$jit/include/"
cp -P "$(pkg-config --variable=libdir luajit)"/libluajit-5.1.so* "$jit/lib/"

# README's line, on PREFIX: one line starting "luarocks --lua-dir
# /usr/local/openresty/luajit", installing this rock
line=$(grep '^luarocks --lua-dir /usr/local/openresty/luajit ' "$top/README.md")
if [ "$(echo "$line" | wc -l)" != 1 ] || [ "${line%"install $rock"}" = "$line" ]; then
  echo "README.md has no one luarocks line for OpenResty's LuaJIT installing $rock:"; echo "$line"; exit 1
fi
echo "README: $line"
set -f
# shellcheck disable=SC2046
set -- $(echo "$line" | sed "s|/usr/local/openresty/|$prefix/|g")
set +f
shift # luarocks
rock_luarocks "$work/install.log" "$@" ||
  { echo "== openresty-tree: install FAILED"; tail -n 30 "$work/install.log"; exit 1; }
rock_installed openresty-tree "$work/install.log"
grep -q -- "-I$jit/include/luajit-2.1" "$work/install.log" ||
  { echo "== the build did not use $jit/include/luajit-2.1:"; grep -m 3 -- ' -c ' "$work/install.log"; exit 1; }
for file in share/lua/5.1/etcd3/init.lua share/lua/5.1/etcd3/ngx.lua lib/lua/5.1/etcd3/core.so; do
  [ -f "$jit/$file" ] || { echo "== $jit/$file not installed"; exit 1; }
done

rock_demo openresty-luajit "$jit/bin/luajit" "$jit/share/lua/5.1" "$jit/lib/lua/5.1"

(cd "$top" && lua5.4 tools/openresty-tree.lua "$prefix")

# the install's luarocks flags, without the install
rock_removed openresty-tree "$jit" --lua-dir "$jit" --lua-version 5.1
