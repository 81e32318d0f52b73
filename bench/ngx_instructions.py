#!/usr/bin/env python3
"""Instructions per serial get inside one nginx worker, lua-etcd3 against
lua-resty-etcd, by layer (`make bench-ngx-instructions`, bench/README.md
"OpenResty": instructions per get).

One nginx (Debian's, lua-nginx-module, master_process off, so the worker is
the process valgrind runs) under callgrind, with the OpenResty harness's
configuration and handlers (OPENRESTY_BENCH: ../shared/peers/openresty,
whose vendor/ holds lua-resty-etcd; nothing of it is copied here): both
clients loaded, each answering /CLIENT/get with one get of a 16-byte key
(64-byte value). Run from tools/with-etcd.lua (ETCDCTL_ENDPOINTS).

For each client: warm-up requests, then callgrind's counters zeroed
(callgrind_control -z), N requests on one keep-alive connection, counters
dumped (-d): every instruction of the worker's threads for N requests,
HTTP included, divided by N; then split by shared object. Prints a table.
"""
import argparse
import glob
import http.client
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gateway import free_port  # noqa: E402 (the gateway bench's, one copy)

GET_KEY, GET_VALUE = "/orbench/get/k01", "v" * 64
WATCH_KEY = "/orbench/watch/k"


def layer(obj):
    """A shared object's group for the table."""
    name = os.path.basename(obj)
    for pattern, group in (("core.so", "etcd3.core (our C)"),
                           ("libgrpc", "gRPC (+ absl, upb, gpr)"), ("libabsl", "gRPC (+ absl, upb, gpr)"),
                           ("libupb", "gRPC (+ absl, upb, gpr)"), ("libgpr", "gRPC (+ absl, upb, gpr)"),
                           ("libprotobuf-c", "protobuf-c"), ("libluajit", "LuaJIT (VM, JIT, Lua code)"),
                           ("nginx", "nginx (HTTP)"), ("ngx_http_lua", "lua-nginx-module"),
                           ("ndk_http", "lua-nginx-module"), ("libc.so", "libc"), ("ld-linux", "ld.so"),
                           ("cjson", "lua-cjson"), ("libssl", "OpenSSL"), ("libcrypto", "OpenSSL"),
                           ("libpcre", "PCRE"), ("libz", "zlib")):
        if pattern in name:
            return group
    if name.startswith("???") or name == "":
        return "JIT-compiled Lua (no object)"
    return "other (" + name + ")"


def by_object(path):
    """Self instructions of a callgrind dump by group of shared object: the
    raw file read directly (a cost line after "calls=" is the call's
    inclusive cost, not the caller's own), so that calls still running at
    the dump (the event loop, gRPC's threads) count once."""
    names, groups, total = {}, Counter(), 0
    current, skip = "???", False
    for line in open(path, errors="replace"):
        if line.startswith(("ob=", "cob=")):
            m = re.match(r"c?ob=\((\d+)\)(?: (.*))?$", line.rstrip("\n"))
            if m and m.group(2):
                names[m.group(1)] = m.group(2)
            if line.startswith("ob="):
                current = names.get(m.group(1), "???") if m else line[3:].strip()
        elif line.startswith("calls="):
            skip = True
        elif line[:1].isdigit() or line[:1] in "+-*":
            if skip:
                skip = False
                continue
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                groups[layer(current)] += int(parts[1])
                total += int(parts[1])
    return total, groups


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--harness", default=os.environ.get("OPENRESTY_BENCH", "../shared/peers/openresty"))
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=50)
    args = ap.parse_args()
    proj = os.getcwd()
    here = os.path.abspath(args.harness)
    endpoint = os.environ["ETCDCTL_ENDPOINTS"]
    subprocess.run(["etcdctl", "put", GET_KEY, GET_VALUE], check=True, capture_output=True,
                   env=dict(os.environ, ETCDCTL_API="3"))
    work = tempfile.mkdtemp(prefix="etcd3-ngxcg.")
    port = free_port()
    conf = open(os.path.join(here, "nginx.conf.tmpl")).read()
    for k, v in {"DIR": work, "HERE": here, "PROJ": proj, "CLIENTS": "ours,resty",
                 "ETCD_PORT": endpoint.split(":")[-1], "GET_KEY": GET_KEY, "WATCH_KEY": WATCH_KEY,
                 "PORT": str(port)}.items():
        conf = conf.replace("@" + k + "@", v)
    # one process, the worker itself, under valgrind
    conf = conf.replace("master_process on;", "master_process off;").replace("worker_cpu_affinity 10;", "")
    with open(os.path.join(work, "nginx.conf"), "w") as f:
        f.write(conf)
    for d in ("body", "proxy", "fastcgi", "uwsgi", "scgi", "logs"):
        os.makedirs(os.path.join(work, d), exist_ok=True)
    out = os.path.join(work, "cg.out")
    nginx = subprocess.Popen(["valgrind", "-q", "--tool=callgrind", "--callgrind-out-file=" + out,
                              "nginx", "-p", work, "-c", os.path.join(work, "nginx.conf")],
                             stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, "valgrind.log"), "w"))
    try:
        conn = None
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                conn.request("GET", "/ready")
                r = conn.getresponse()
                body = r.read()
                if r.status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        else:
            sys.exit("nginx did not get ready: " + open(os.path.join(work, "error.log")).read()[-2000:])
        results = {}
        for client in ("ours", "resty"):
            for _ in range(args.warmup):
                conn.request("GET", "/%s/get" % client)
                r = conn.getresponse()
                assert r.read() == GET_VALUE.encode(), client
            subprocess.run(["callgrind_control", "-z", str(nginx.pid)], check=True, capture_output=True)
            for _ in range(args.requests):
                conn.request("GET", "/%s/get" % client)
                r = conn.getresponse()
                assert r.read() == GET_VALUE.encode(), client
            before = set(glob.glob(out + "*"))
            subprocess.run(["callgrind_control", "-d", str(nginx.pid)], check=True, capture_output=True)
            time.sleep(1)  # (the dump is written by the process itself)
            dumps = sorted(set(glob.glob(out + "*")) - before)
            total, groups = by_object(dumps[-1])
            results[client] = (total / args.requests, {g: n / args.requests for g, n in groups.items()})
        names = sorted(set(results["ours"][1]) | set(results["resty"][1]),
                       key=lambda g: -max(results["ours"][1].get(g, 0), results["resty"][1].get(g, 0)))
        print("Instructions per serial get in one nginx worker (all threads, HTTP request included), "
              "%d requests on one keep-alive connection, callgrind" % args.requests)
        print()
        print("| | lua-etcd3 | lua-resty-etcd |")
        print("|---|---:|---:|")
        print("| **all** | **%.1f k** | **%.1f k** |" % (results["ours"][0] / 1e3, results["resty"][0] / 1e3))
        for g in names:
            print("| %s | %.1f k | %.1f k |" % (g, results["ours"][1].get(g, 0) / 1e3, results["resty"][1].get(g, 0) / 1e3))
        print("| **lua-etcd3 / lua-resty-etcd** | **%.2f** | |" % (results["ours"][0] / results["resty"][0]))
    finally:
        nginx.terminate()
        try:
            nginx.wait(timeout=30)
        except subprocess.TimeoutExpired:
            nginx.kill()
            nginx.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
