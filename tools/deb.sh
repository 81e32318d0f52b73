#!/bin/sh
# usage: sh tools/deb.sh ROCK   (`make deb`, after `make dist`)
#
# Builds the Debian package lua-etcd3 (debian/, with dh-lua) into build/deb/
# from the source rock's tree: the checkout's HEAD plus the generated
# protobuf-c sources, so the build fetches nothing and needs no protoc-c.
# dpkg-buildpackage writes its output beside the source tree it builds, so
# that tree is unpacked in a temp directory, removed at the end; only the
# .deb files and the build's log (build/deb/build.log) are kept.
set -eu
rock=$1
out=build/deb
work=$(mktemp -d /tmp/etcd3-deb.XXXXXX)
trap 'rm -rf "$work"' EXIT
unzip -q "$rock" -d "$work"
rm -rf "$out"
mkdir -p "$out"
log=$(pwd)/$out/build.log
# (the make that ran this one passes nothing down: its -s would hide the
# compiler's command lines from the log)
(cd "$work/lua-etcd3" && env -u MAKEFLAGS -u MFLAGS -u MAKELEVEL dpkg-buildpackage -b -us -uc -j"$(nproc)") > "$log" 2>&1 ||
  { tail -n 60 "$log" >&2; echo "deb: dpkg-buildpackage failed, log: $log" >&2; exit 1; }
cp "$work"/*.deb "$out/"
ls "$out"/*.deb
