#!/usr/bin/env python3
"""Gateway benchmark: a whole configuration in every nginx worker.

10 000 keys of ~1 KiB JSON under one prefix, nginx with 4 workers, each
worker holding its own table of every key decoded with cjson:

  ours   etcd3.ngx mirror{} (one writer) + view:changes() + decode (cjson)
  resty  lua-resty-etcd readdir + watchdir in every worker (APISIX's pattern),
         loaded at run time from --resty-dir (the side-by-side harness's
         vendor dir; it is not part of this project)

Runs in pairs (ours, resty / resty, ours, ...), each run in a fresh nginx:
  1 start: nginx start -> every worker's table holds every key (decoded)
  2 RSS per worker (VmRSS, RssAnon, RssShmem), the shared dict's use (ours)
  3 one put -> visible in every worker's table, over --lat-n puts
  4 worker CPU per change (sum over the workers of utime+stime), etcd's
  5 catch-up after a compaction: nginx SIGSTOPped, etcd restarted (every
    connection drops), --catchup-n puts, compaction, SIGCONT; the time and
    worker CPU until every worker's table is at the last revision
--traffic measures 3-5 through requests instead (a keep-alive connection to
each worker, GET /route): visible = served by every worker; CPU per change
with one request to each worker after each change, minus the same requests
without changes. --ours-request: ours' workers apply the changes when a
request comes (as a gateway's router does), with no follower at all.
Everything it starts (etcd, nginx) is stopped by PID.
"""
import argparse
import base64
import http.client
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TCK = os.sysconf("SC_CLK_TCK")
PREFIX = "/gw/routes/"


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def b64(s):
    return base64.b64encode(s.encode() if isinstance(s, str) else s).decode()


def make_value(i, seq, size):
    """An APISIX-like route, padded with `desc` to about `size` bytes."""
    v = {
        "id": "r%05d" % i, "seq": seq, "uri": "/api/v1/svc%d/items/*" % (i % 997),
        "methods": ["GET", "POST", "PUT"], "priority": i % 10,
        "hosts": ["svc%d.example.com" % (i % 97)],
        "upstream": {"type": "roundrobin", "scheme": "http",
                     "nodes": {"10.%d.%d.%d:8080" % (i % 250, (i // 7) % 250, k): 1 for k in range(1, 4)},
                     "timeout": {"connect": 6, "send": 6, "read": 6}},
        "plugins": {"limit-count": {"count": 100 + i % 50, "time_window": 60, "key": "remote_addr"},
                    "proxy-rewrite": {"regex_uri": ["^/api/v1/svc%d/(.*)" % (i % 997), "/$1"]}},
        "labels": {"team": "t%d" % (i % 13), "env": "prod"}, "desc": "",
    }
    base = len(json.dumps(v, separators=(",", ":")))
    v["desc"] = ("route %d " % i * 200)[: max(0, size - base)]
    return json.dumps(v, separators=(",", ":"))


class Etcd:
    def __init__(self, work):
        self.port, self.peer = free_port(), free_port()
        self.data = tempfile.mkdtemp(prefix="gwbench-etcd.", dir="/dev/shm")
        self.log = open(os.path.join(work, "etcd.log"), "ab")
        self.proc = None
        self.conn = None

    def start(self):
        url, purl = "http://127.0.0.1:%d" % self.port, "http://127.0.0.1:%d" % self.peer
        self.proc = subprocess.Popen(
            ["etcd", "--name", "gw", "--data-dir", self.data, "--listen-client-urls", url,
             "--advertise-client-urls", url, "--listen-peer-urls", purl,
             "--initial-advertise-peer-urls", purl, "--initial-cluster", "gw=" + purl,
             "--quota-backend-bytes", str(4 << 30), "--log-level", "warn"],
            stdout=self.log, stderr=self.log)
        for _ in range(300):
            try:
                self.call("/v3/maintenance/status", {})
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("etcd did not start")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if self.conn:
            self.conn.close()
            self.conn = None

    def call(self, path, body):
        for attempt in range(2):
            try:
                if self.conn is None:
                    self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
                self.conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
                r = self.conn.getresponse()
                data = r.read()
                if r.status != 200:
                    raise RuntimeError("etcd %s: %d %s" % (path, r.status, data[:200]))
                return json.loads(data)
            except (OSError, http.client.HTTPException):
                if self.conn:
                    self.conn.close()
                self.conn = None
                if attempt == 1:
                    raise

    def put(self, key, value):
        return int(self.call("/v3/kv/put", {"key": b64(key), "value": b64(value)})["header"]["revision"])

    def txn_puts(self, kvs):
        ops = [{"request_put": {"key": b64(k), "value": b64(v)}} for k, v in kvs]
        return int(self.call("/v3/kv/txn", {"success": ops})["header"]["revision"])

    def compact(self, rev):
        self.call("/v3/kv/compaction", {"revision": rev, "physical": True})

    def cpu(self):
        return proc_cpu(self.proc.pid)


CPU_SOURCE = ["stat"]


def task_cpu_ns(pid, tid):
    """One thread's on-CPU time, ns (schedstat; 0 once it ended)."""
    try:
        with open("/proc/%d/task/%s/schedstat" % (pid, tid)) as f:
            return int(f.read().split()[0])
    except OSError:
        return 0


def load_keys(etcd, keys, size):
    """Puts the `keys` keys of a configuration, 100 to a txn."""
    batch = []
    for i in range(keys):
        batch.append((PREFIX + "k%05d" % i, make_value(i, 0, size)))
        if len(batch) == 100 or i == keys - 1:
            etcd.txn_puts(batch)
            batch = []


def proc_cpu(pid):
    """utime + stime of the whole process (all its threads), in seconds;
    with --cpu-source schedstat the threads' on-CPU time in ns (threads that
    ended meanwhile are missing from it)."""
    if CPU_SOURCE[0] == "schedstat":
        return sum(task_cpu_ns(pid, t) for t in os.listdir("/proc/%d/task" % pid)) / 1e9
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TCK


def proc_mem(pid):
    out = {}
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[k] = int(v.split()[0])  # kB
    return out


class Nginx:
    def __init__(self, args, client, etcd_port, tag):
        self.args, self.client = args, client
        self.dir = os.path.join(args.work, "nginx-" + tag)
        os.makedirs(self.dir, exist_ok=True)
        self.port = free_port()
        rd = args.resty_dir
        resty_path = "".join("%s/%s/lib/?.lua;" % (rd, d) for d in ("lua-resty-etcd", "lua-resty-http", "lua-typeof"))
        subs = {
            "DIR": self.dir, "HERE": os.path.join(HERE, "gateway"), "PROJ": args.proj,
            "WORKERS": str(args.workers), "PORT": str(self.port), "ETCD_PORT": str(etcd_port),
            "CLIENT": client, "PREFIX": PREFIX, "OURS_POLL": repr(args.ours_poll), "KEYS": str(args.keys),
            "USER": "user root root;" if os.getuid() == 0 else "",
            "DICT": "lua_shared_dict etcd_cfg %s;" % args.dict_size if client == "ours" else "",
            "RESTY_PATH": resty_path if client == "resty" else "",
        }
        with open(os.path.join(HERE, "gateway", "nginx.conf.tmpl")) as f:
            conf = f.read()
        for k, v in subs.items():
            conf = conf.replace("@%s@" % k, v)
        self.conf = os.path.join(self.dir, "nginx.conf")
        with open(self.conf, "w") as f:
            f.write(conf)
        self.proc = None
        self.conn = None

    def start(self):
        t0 = time.time()
        self.proc = subprocess.Popen(["nginx", "-p", self.dir, "-c", self.conf],
                                     stdout=subprocess.DEVNULL, stderr=open(os.path.join(self.dir, "stderr"), "wb"))
        return t0

    def status(self):
        for attempt in range(3):
            try:
                if self.conn is None:
                    self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                self.conn.request("GET", "/status")
                r = self.conn.getresponse()
                return json.loads(r.read())
            except (OSError, http.client.HTTPException, ValueError):
                if self.conn:
                    self.conn.close()
                self.conn = None
                if attempt == 2:
                    return None
                time.sleep(0.02)

    def pids(self, st):
        return [int(st["pid:%d" % w]) for w in range(self.args.workers)]

    def all_pids(self, st):
        return [self.proc.pid] + self.pids(st)

    def stop(self, st):
        if self.conn:
            self.conn.close()
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                for pid in (self.pids(st) if st else []):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                self.proc.kill()
                self.proc.wait()


class Workers:
    """One keep-alive connection to each nginx worker (the listener is
    reuseport: the kernel spreads connections over the workers, and GET
    /route answers with the worker's id), to ask a given worker what its
    table holds, as a request routed there would see it."""

    def __init__(self, ng, timeout=30):
        self.conns, self.requests = {}, 0
        end, spare = time.time() + timeout, []
        while len(self.conns) < ng.args.workers:
            if time.time() > end:
                raise RuntimeError("could not reach every worker: %s" % sorted(self.conns))
            c = http.client.HTTPConnection("127.0.0.1", ng.port, timeout=30)
            w = self._get(c, "")[0]
            if w in self.conns:
                spare.append(c)  # kept open: a closed one's port may come back to the same worker
            else:
                self.conns[w] = c
        for c in spare:
            c.close()

    def _get(self, c, key):
        c.request("GET", "/route?k=" + key)
        self.requests += 1
        return [int(x) for x in c.getresponse().read().split()]

    def ask(self, w, key):
        """-> (its table's revision, the key's seq there)"""
        return self._get(self.conns[w], key)[1:]

    def until(self, cond, key, timeout, every):
        """Asks every worker not yet there until cond(rev, seq) holds for all;
        returns the time each first answered so."""
        done, end = {}, time.time() + timeout
        while len(done) < len(self.conns):
            for w in self.conns:
                if w not in done and cond(*self.ask(w, key)):
                    done[w] = time.time()
            if len(done) < len(self.conns):
                if time.time() > end:
                    return None
                time.sleep(every)
        return done

    def close(self):
        for c in self.conns.values():
            c.close()


def wait_all(ng, cond, timeout, every):
    end = time.time() + timeout
    while time.time() < end:
        st = ng.status()
        if st and cond(st):
            return st
        time.sleep(every)
    return None


def workers_cpu(pids):
    return sum(proc_cpu(p) for p in pids)


def task_switches(pid, tid):
    """Context switches (voluntary + not) of one thread (0 once it ended)."""
    try:
        with open("/proc/%d/task/%s/status" % (pid, tid)) as f:
            return sum(int(line.split()[1]) for line in f if "ctxt_switches" in line)
    except OSError:
        return 0


def ctx_switches(pid):
    """Context switches of all the process's threads: its wake-ups."""
    return sum(task_switches(pid, t) for t in os.listdir("/proc/%d/task" % pid))


def each_cpu(pids):
    return [proc_cpu(p) for p in pids]


def run_one(args, etcd, client, rnd, seq):
    """One fresh nginx with `client`; returns a record of the 5 figures."""
    W = args.workers
    ng = Nginx(args, client, etcd.port, "%s-%d" % (client, rnd))
    rec = {"client": client, "round": rnd}
    st, wk = None, None
    try:
        # 1 start -> every worker holds every key decoded
        t0 = ng.start()
        st = wait_all(ng, lambda s: all("full:%d" % w in s for w in range(W)), args.timeout, 0.05)
        if not st:
            raise RuntimeError("%s: workers did not load %d keys in %ds (see %s/error.log)"
                               % (client, args.keys, args.timeout, ng.dir))
        full = [st["full:%d" % w] - t0 for w in range(W)]
        rec["start_s"] = max(full)
        rec["start_per_worker_s"] = full
        pids = ng.pids(st)
        # 2 memory, once settled
        time.sleep(args.settle)
        st = ng.status()
        mems = [proc_mem(p) for p in pids]
        rec["mem_kb"] = mems
        rec["rss_kb_mean"] = statistics.mean(m["VmRSS"] for m in mems)
        rec["anon_kb_mean"] = statistics.mean(m["RssAnon"] for m in mems)
        if "dict_capacity" in st:
            rec["dict_used_kb"] = (st["dict_capacity"] - st["dict_free"]) / 1024
        # --traffic: a connection to each worker; what it serves is what counts
        wk = Workers(ng) if args.traffic else None
        # 3 put -> visible in every worker
        rng = random.Random(rnd * 7919 + (client == "ours"))
        lats = []
        for _ in range(args.lat_n):
            i = rng.randrange(args.keys)
            seq += 1
            val = make_value(i, seq, args.value_size)
            ts = time.time()
            rev = etcd.put(PREFIX + "k%05d" % i, val)
            if wk:
                want = seq
                done = wk.until(lambda r, s: s >= want, PREFIX + "k%05d" % i, 30, args.poll)
                if not done:
                    raise RuntimeError("%s: put seq %d not served in 30 s" % (client, want))
                lats.append(max(done.values()) - ts)
            else:
                st = wait_all(ng, lambda s: all(s.get("rev:%d" % w, 0) >= rev for w in range(W)), 30, args.poll)
                if not st:
                    raise RuntimeError("%s: put rev %d not seen in 30 s" % (client, rev))
                lats.append(max(st["t:%d" % w] for w in range(W)) - ts)
            time.sleep(args.lat_gap)
        rec["lat_ms"] = [x * 1000 for x in lats]
        rec["lat_p50_ms"] = pctl(rec["lat_ms"], 50)
        rec["lat_p99_ms"] = pctl(rec["lat_ms"], 99)
        # 4 CPU per change (idle first: what the workers burn with nothing changing)
        c0, w0 = workers_cpu(pids), each_cpu(pids)
        time.sleep(args.idle)
        rec["idle_cpu_ms_per_s"] = (workers_cpu(pids) - c0) * 1000 / args.idle
        rec["idle_cpu_ms_per_s_each"] = [(b - a) * 1000 / args.idle for a, b in zip(w0, each_cpu(pids))]
        if wk:  # the same requests without puts: what the traffic alone costs
            c0, r0 = workers_cpu(pids), wk.requests
            for _ in range(args.cpu_n):
                time.sleep(args.cpu_gap)
                for w in range(W):
                    wk.ask(w, PREFIX + "k%05d" % rng.randrange(args.keys))
            req_cpu = (workers_cpu(pids) - c0) / (wk.requests - r0)  # s per request (and its share of idle)
            rec["req_cpu_us"] = req_cpu * 1e6
        c0, e0, t_a, w0 = workers_cpu(pids), etcd.cpu(), time.time(), each_cpu(pids)
        x0 = [ctx_switches(p) for p in pids]
        r0 = wk.requests if wk else 0
        for _ in range(args.cpu_n):
            i = rng.randrange(args.keys)
            seq += 1
            rev = etcd.put(PREFIX + "k%05d" % i, make_value(i, seq, args.value_size))
            time.sleep(args.cpu_gap)
            if wk:  # one request to each worker after each change
                for w in range(W):
                    wk.ask(w, PREFIX + "k%05d" % i)
        if wk:
            ok = wk.until(lambda r, s: r >= rev, "", 60, 0.05)
        else:
            ok = st = wait_all(ng, lambda s: all(s.get("rev:%d" % w, 0) >= rev for w in range(W)), 60, 0.05)
        if not ok:
            raise RuntimeError("%s: cpu phase: rev %d not reached" % (client, rev))
        dt = time.time() - t_a
        cw, ce = workers_cpu(pids) - c0, etcd.cpu() - e0
        rec["cpu_us_per_change"] = cw * 1e6 / args.cpu_n
        rec["cpu_us_per_change_each"] = [(b - a) * 1e6 / args.cpu_n for a, b in zip(w0, each_cpu(pids))]
        rec["ctx_switches_per_change_each"] = [(ctx_switches(p) - a) / args.cpu_n for a, p in zip(x0, pids)]
        if wk:  # minus what the same requests cost without changes
            rec["cpu_us_per_change_net"] = (cw - req_cpu * (wk.requests - r0)) * 1e6 / args.cpu_n
        else:
            rec["cpu_us_per_change_net"] = (cw - rec["idle_cpu_ms_per_s"] / 1000 * dt) * 1e6 / args.cpu_n
        rec["etcd_cpu_us_per_change"] = ce * 1e6 / args.cpu_n
        # 5 catch-up after a compaction while disconnected
        if wk:  # (phase 4 waited through the requests: the workers' pids and counts)
            st = ng.status()
        allp = ng.all_pids(st)
        reloads0 = sum(st.get("reloads:%d" % w, 0) for w in range(W))
        for p in allp:
            os.kill(p, signal.SIGSTOP)
        try:
            etcd.stop()  # every connection to etcd drops
            etcd.start()
            kvs = []
            for _ in range(args.catchup_n):
                i = rng.randrange(args.keys)
                seq += 1
                kvs.append((PREFIX + "k%05d" % i, make_value(i, seq, args.value_size)))
            for k, v in kvs:
                target = etcd.put(k, v)
            etcd.compact(target)
            c0, e0, w0 = workers_cpu(pids), etcd.cpu(), each_cpu(pids)
            t_c = time.time()
        finally:
            for p in allp:
                os.kill(p, signal.SIGCONT)
        if wk:  # each worker asked every 50 ms what its table holds
            r0 = wk.requests
            served = wk.until(lambda r, s: r >= target, "", 60, 0.05)
            if not served:
                raise RuntimeError("%s: catch-up: rev %d not served" % (client, target))
        else:
            time.sleep(args.window)  # no polling inside the window, then until every worker is there
        st = wait_all(ng, lambda s: all(s.get("rev:%d" % w, 0) >= target for w in range(W)), 60, 0.2)
        if not st:
            raise RuntimeError("%s: catch-up: rev %d not reached" % (client, target))
        time.sleep(args.settle)
        cw, ce = workers_cpu(pids) - c0, etcd.cpu() - e0
        win = time.time() - t_c
        done = [served[w] for w in range(W)] if wk else [st["t:%d" % w] for w in range(W)]
        rec["catchup_s"] = max(done) - t_c
        if client == "resty":  # from each worker's full read's start (after lua-resty-etcd's health check pause)
            rec["catchup_read_s"] = max(done[w] - st.get("read_t0:%d" % w, t_c) for w in range(W))
        rec["catchup_cpu_ms"] = cw * 1000
        rec["catchup_cpu_ms_each"] = [(b - a) * 1000 for a, b in zip(w0, each_cpu(pids))]
        if wk:  # minus the requests' own cost
            rec["catchup_cpu_ms_net"] = (cw - req_cpu * (wk.requests - r0)) * 1000
        else:
            rec["catchup_cpu_ms_net"] = (cw - rec["idle_cpu_ms_per_s"] / 1000 * win) * 1000
        rec["catchup_etcd_cpu_ms"] = ce * 1000
        rec["catchup_full_reads"] = sum(st.get("reloads:%d" % w, 0) for w in range(W)) - reloads0
        rec["keys_held"] = [st.get("n:%d" % w) for w in range(W)]
    finally:
        if wk:
            wk.close()
        ng.stop(st)
    return rec, seq


def pctl(xs, p):
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


FIGS = [  # key, label, lower is better
    ("start_s", "1. start -> every worker holds all keys decoded (s)"),
    ("rss_kb_mean", "2. RSS per worker, VmRSS (MiB)"),
    ("anon_kb_mean", "2. RSS per worker, RssAnon (MiB)"),
    ("lat_p50_ms", "3. put -> seen in every worker, p50 (ms)"),
    ("lat_p99_ms", "3. put -> seen in every worker, p99 (ms)"),
    ("cpu_us_per_change", "4. worker CPU per change, sum of 4 (us)"),
    ("cpu_us_per_change_net", "4. the same minus idle CPU (us)"),
    ("etcd_cpu_us_per_change", "4. etcd CPU per change (us)"),
    ("idle_cpu_ms_per_s", "   idle worker CPU, sum of 4 (ms/s)"),
    ("catchup_s", "5. catch-up after compaction: time (s)"),
    ("catchup_read_s", "5. resty: from its full read's start (s)"),
    ("catchup_cpu_ms", "5. catch-up: worker CPU, sum of 4 (ms)"),
    ("catchup_cpu_ms_net", "5. catch-up: worker CPU minus idle (ms)"),
    ("catchup_etcd_cpu_ms", "5. catch-up: etcd CPU (ms)"),
]


def fmt(x, key):
    if key in ("rss_kb_mean", "anon_kb_mean"):
        x = x / 1024
    return "%.3g" % x if abs(x) < 100 else "%.0f" % x


def summary(args, recs, machine):
    by = {"ours": [r for r in recs if r["client"] == "ours"], "resty": [r for r in recs if r["client"] == "resty"]}
    pairs = sorted(set(r["round"] for r in recs))
    lines = ["Gateway: %d keys x ~%d B JSON, %d workers, %d pairs (%s)%s"
             % (args.keys, args.value_size, args.workers, len(pairs), time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                mode_line(args)),
             "machine: %s" % machine, "",
             "| figure | ours median (min-max) | resty median (min-max) | ours/resty per pair: median (min-max) |",
             "|---|---|---|---|"]
    relabel = {  # --traffic: phases 3-5 as every worker's requests see them
        "lat_p50_ms": "3. put -> served by every worker, p50 (ms)",
        "lat_p99_ms": "3. put -> served by every worker, p99 (ms)",
        "cpu_us_per_change": "4. worker CPU per change with its requests, sum of 4 (us)",
        "cpu_us_per_change_net": "4. the same minus the same requests without changes (us)",
        "catchup_s": "5. catch-up after compaction: until every worker serves it (s)",
        "catchup_cpu_ms_net": "5. catch-up: worker CPU minus the requests' (ms)",
    } if args.traffic else {}
    for key, label in FIGS:
        label = relabel.get(key, label)
        o = [r[key] for r in by["ours"] if key in r]
        s = [r[key] for r in by["resty"] if key in r]
        if not o and not s:
            continue
        ratios = []
        for p in pairs:
            ro = [r[key] for r in by["ours"] if r["round"] == p and key in r]
            rs = [r[key] for r in by["resty"] if r["round"] == p and key in r]
            if ro and rs and rs[0] > 0:
                ratios.append(ro[0] / rs[0])
        rt = "%.3g (%.3g-%.3g)" % (statistics.median(ratios), min(ratios), max(ratios)) if ratios else "-"
        def cell(xs):
            return "%s (%s-%s)" % (fmt(statistics.median(xs), key), fmt(min(xs), key), fmt(max(xs), key)) if xs else "-"
        lines.append("| %s | %s | %s | %s |" % (label, cell(o), cell(s), rt))
    du = [r["dict_used_kb"] for r in by["ours"] if "dict_used_kb" in r]
    if du:
        lines.append("")
        lines.append("ours: shared dict in use %.1f MiB (of %s), one copy for all workers" % (statistics.median(du) / 1024, args.dict_size))
    fr = {c: [r.get("catchup_full_reads") for r in by[c]] for c in by}
    lines.append("full reads by the workers in catch-up (per run): ours %s, resty %s" % (fr["ours"], fr["resty"]))
    return "\n".join(lines) + "\n"


def mode_line(args):
    out = ""
    if args.ours_poll < 0:
        out += ", ours' workers apply changes at request time"
    elif args.ours_poll > 0:
        out += ", ours' workers look every %g s" % args.ours_poll
    if args.traffic:
        out += ", traffic: after each change one request to each worker (keep-alive, one connection per worker)"
    return out


def machine_line():
    model = "?"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "%s, %d CPUs, kernel %s, load %s" % (model, os.cpu_count(), os.uname().release,
                                               " ".join("%.2f" % x for x in os.getloadavg()))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=None)
    ap.add_argument("--proj", default=os.path.dirname(HERE))
    ap.add_argument("--resty-dir", default=os.environ.get("RESTY_ETCD_VENDOR", "/work/shared/peers/openresty/vendor"),
                    help="dir holding lua-resty-etcd/, lua-resty-http/, lua-typeof/ (each with lib/)")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--keys", type=int, default=10000)
    ap.add_argument("--value-size", type=int, default=1024)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--dict-size", default="48m")
    ap.add_argument("--lat-n", type=int, default=50)
    ap.add_argument("--lat-gap", type=float, default=0.1)
    ap.add_argument("--poll", type=float, default=None,
                    help="phase 3: look again every N s (default 0.005, with --traffic 0.001)")
    ap.add_argument("--idle", type=float, default=3)
    ap.add_argument("--ours-poll", type=float, default=0,
                    help="ours' workers: 0 = view:wait (default), else look at view:changes() every N s")
    ap.add_argument("--cpu-n", type=int, default=400)
    ap.add_argument("--cpu-gap", type=float, default=0.02)
    ap.add_argument("--catchup-n", type=int, default=100)
    ap.add_argument("--window", type=float, default=6)
    ap.add_argument("--settle", type=float, default=1)
    ap.add_argument("--timeout", type=float, default=180)
    ap.add_argument("--cpu-source", choices=["stat", "schedstat"], default="stat",
                    help="/proc/PID/stat utime+stime (10 ms ticks) or the threads' schedstat (ns)")
    ap.add_argument("--smoke", action="store_true", help="1 pair, 500 keys, short phases")
    ap.add_argument("--traffic", action="store_true",
                    help="phases 3-5 through requests: a connection to each worker; visible = served by every "
                         "worker; CPU per change with one request to each worker per change, minus the same "
                         "requests without changes")
    ap.add_argument("--ours-request", action="store_true",
                    help="ours' workers apply changes at request time only (no follower); implies --traffic")
    args = ap.parse_args()
    if args.ours_request:
        args.ours_poll, args.traffic = -1, True
    if args.poll is None:
        args.poll = 0.001 if args.traffic else 0.005
    CPU_SOURCE[0] = args.cpu_source
    if args.smoke:
        args.pairs, args.keys, args.lat_n, args.cpu_n, args.catchup_n = 1, 500, 10, 50, 20
        args.idle, args.window, args.dict_size = 1, 3, "8m"
    args.work = args.work or tempfile.mkdtemp(prefix="gwbench.")
    os.makedirs(args.work, exist_ok=True)
    if not os.path.exists(os.path.join(args.proj, "build/luajit/etcd3/core.so")):
        sys.exit("build first: make LUA=luajit")
    if not os.path.exists(os.path.join(args.resty_dir, "lua-resty-etcd/lib/resty/etcd.lua")):
        sys.exit("no lua-resty-etcd under --resty-dir %s" % args.resty_dir)
    print("work dir:", args.work, flush=True)
    machine = machine_line()
    print("machine:", machine, flush=True)
    etcd = Etcd(args.work)
    recs = []
    try:
        etcd.start()
        t = time.time()
        load_keys(etcd, args.keys, args.value_size)
        print("loaded %d keys in %.1f s" % (args.keys, time.time() - t), flush=True)
        seq = 0
        with open(os.path.join(args.work, "results.jsonl"), "a") as out:
            for rnd in range(1, args.pairs + 1):
                order = ["ours", "resty"] if rnd % 2 == 1 else ["resty", "ours"]
                for client in order:
                    rec, seq = run_one(args, etcd, client, rnd, seq)
                    rec["load"] = os.getloadavg()[0]
                    out.write(json.dumps(rec) + "\n")
                    out.flush()
                    recs.append(rec)
                    print("pair %d %-5s start %.2fs rss %.0fMiB lat p50 %.1fms p99 %.1fms cpu/change %.0fus "
                          "etcd %.0fus catch-up %.2fs %.0fms cpu (full reads %d)" % (
                              rnd, client, rec["start_s"], rec["rss_kb_mean"] / 1024, rec["lat_p50_ms"],
                              rec["lat_p99_ms"], rec["cpu_us_per_change"], rec["etcd_cpu_us_per_change"],
                              rec["catchup_s"], rec["catchup_cpu_ms"], rec["catchup_full_reads"]), flush=True)
    finally:
        etcd.stop()
        shutil.rmtree(etcd.data, ignore_errors=True)
    text = summary(args, recs, machine + " (at start); load at end %.2f" % os.getloadavg()[0])
    with open(os.path.join(args.work, "summary.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
