#!/bin/sh
# Installs the Debian packages lua-etcd3 needs to build, test and demo,
# when any is missing (apt-get update runs once, only then).
# `deps.sh bench`: what the side-by-side benchmark's peers need instead.
set -e
if [ "${1:-}" = bench ]; then
PKGS="python3-etcd3 util-linux"
command -v node > /dev/null 2>&1 || PKGS="$PKGS nodejs npm"
else
# python3-grpcio: the gRPC server that is not etcd in the wrong-peer spec;
# libclang-rt-14-dev: libFuzzer, for the codec's fuzz targets;
# valgrind: memcheck over the KV, lease and watch specs (`make memcheck`);
# lua-cjson: the gateway example's JSON decoder (nginx's LuaJIT and the spec);
# golang-go, golang-etcd-server-dev: the Go peers of the interop specs (and
# of the benchmark), built offline from Debian's etcd sources;
# dh-lua, debhelper, dpkg-dev (and Lua 5.2): the Debian package (`make deb`)
PKGS="make gcc clang pkg-config libgrpc-dev libprotobuf-c-dev protobuf-c-compiler
lua5.4 liblua5.4-dev luajit2 libluajit2-5.1-dev lua5.3 liblua5.3-dev lua5.1 liblua5.1-0-dev
lua5.2 liblua5.2-dev dh-lua debhelper dpkg-dev
lua-busted lua-check luarocks
etcd-server etcd-client lua-cqueues nginx libnginx-mod-http-lua lua-cjson curl
python3-grpcio libclang-rt-14-dev valgrind golang-go golang-etcd-server-dev"
fi
missing=""
for p in $PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
done
[ -z "$missing" ] && exit 0
echo "installing:$missing"
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
# .ci/run has already run apt-get update once
[ -n "${ETCD3_APT_UPDATED:-}" ] || $SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends $missing
