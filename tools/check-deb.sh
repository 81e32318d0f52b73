#!/bin/sh
# The Debian package as a user installs it (the `deb` step of tools/test.sh):
#
# 1. `make deb` builds build/deb/lua-etcd3_VERSION_ARCH.deb (debian/, with
#    dh-lua; its build already checks that etcd3._VERSION is
#    debian/changelog's upstream version, under each Lua).
# 2. apt-get installs it, its Depends from the archive. A lua-etcd3 this
#    check did not install is never replaced: the check fails instead.
# 3. From an empty temp directory holding only a copy of examples/demo.lua,
#    with nothing of the caller's environment but PATH, HOME (the temp dir)
#    and etcd's endpoint (no LUA_PATH, no LUA_CPATH: each interpreter's
#    own system paths), under Lua 5.4, 5.3, 5.2, 5.1 and LuaJIT: etcd3 and
#    etcd3.core are the package's files (LuaJIT loads the Lua 5.1 ones),
#    etcd3._VERSION is the package's version, and the demo runs against
#    one throwaway etcd (tools/with-etcd.lua, which runs this script again
#    with --demos VERSION).
# 4. `dpkg --purge lua-etcd3` leaves no file or directory of it. The purge
#    also runs when a step before it failed.
set -eu
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"

if [ "${1:-}" = --demos ]; then
  version=$2
  work=$(mktemp -d /tmp/etcd3-deb-demo.XXXXXX)
  trap 'rm -rf "$work"' EXIT
  cp examples/demo.lua "$work/demo.lua"
  cd "$work"
  clean() {
    env -i PATH=/usr/local/bin:/usr/bin:/bin HOME="$work" ETCDCTL_ENDPOINTS="$ETCDCTL_ENDPOINTS" "$@"
  }
  multiarch=$(dpkg-architecture -qDEB_HOST_MULTIARCH)
  for rt in lua5.4 lua5.3 lua5.2 lua5.1 luajit; do
    case $rt in luajit) v=5.1 ;; *) v=${rt#lua} ;; esac
    clean "$rt" -e "
      local function find(name, path) -- the file require will load (5.1 has no package.searchpath)
        for template in path:gmatch('[^;]+') do
          local file = template:gsub('%?', (name:gsub('%.', '/')))
          local f = io.open(file)
          if f then f:close() return file end
        end
      end
      local lua, core = find('etcd3', package.path), find('etcd3.core', package.cpath)
      assert(lua == '/usr/share/lua/$v/etcd3/init.lua', 'etcd3 is ' .. tostring(lua))
      assert(core == '/usr/lib/$multiarch/lua/$v/etcd3/core.so', 'etcd3.core is ' .. tostring(core))
      local got = require('etcd3')._VERSION
      assert(got == 'lua-etcd3 $version', 'etcd3._VERSION is ' .. got .. ', the package is $version')
      print('$rt: ' .. got .. ' from ' .. lua .. ' and ' .. core)"
    clean "$rt" demo.lua > "$work/demo-$rt.log" 2>&1 ||
      { echo "== $rt: demo FAILED"; cat "$work/demo-$rt.log"; exit 1; }
    echo "== $rt: demo ok"
  done
  exit 0
fi

SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
installed() { dpkg-query -W -f='${db:Status-Status}' lua-etcd3 2>/dev/null | grep -qv '^not-installed$'; }
if installed; then
  echo "deb: lua-etcd3 is already installed here; this check installs and purges its own (dpkg --purge lua-etcd3 first)" >&2
  exit 1
fi

make -s deb > /dev/null
deb_version=$(dpkg-parsechangelog -S Version)
deb=$top/build/deb/lua-etcd3_${deb_version}_$(dpkg --print-architecture).deb
[ -f "$deb" ] || { echo "deb: make deb made no $deb" >&2; exit 1; }

trap '$SUDO dpkg --purge lua-etcd3 > /dev/null 2>&1 || true' EXIT
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$deb" > build/deb/install.log 2>&1 ||
  { cat build/deb/install.log; echo "deb: apt-get install failed" >&2; exit 1; }
echo "== installed $(basename "$deb")"
files=$(dpkg -L lua-etcd3)

make -s LUA=lua5.4 # the throwaway etcd's helper uses etcd3.core
(ETCD3_LUA=lua5.4 . tools/env.sh &&
  lua5.4 tools/with-etcd.lua sh tools/check-deb.sh --demos "${deb_version%-*}")

$SUDO dpkg --purge lua-etcd3 > build/deb/purge.log 2>&1 ||
  { cat build/deb/purge.log; echo "deb: dpkg --purge failed" >&2; exit 1; }
trap - EXIT
! installed || { echo "deb: lua-etcd3 is still known to dpkg after the purge" >&2; exit 1; }
# every path of the package names etcd3; the directories it shares with
# other packages (/usr/share/lua/5.4) do not, and stay
left=$(echo "$files" | grep etcd3 | while read -r f; do [ ! -e "$f" ] && [ ! -L "$f" ] || echo "$f"; done)
[ -z "$left" ] || { echo "== left behind after the purge:"; echo "$left"; exit 1; }
echo "== purged, nothing left"
