#!/usr/bin/env python3
"""Where a gateway's CPU per change goes, thread by thread.

One nginx (bench/gateway/, 4 workers) with one client, `--keys` keys of
~1 KiB JSON, then `--changes` puts `--gap` s apart; prints each worker
thread's CPU (schedstat, ns) and context switches per change, each
worker's sum, and etcd's CPU per change. No pairs: run it twice with
different code (`--proj`) and alternate, to compare.

  python3 bench/gateway_threads.py                   # ours, 2000 keys, 300 changes
  python3 bench/gateway_threads.py --client resty
  python3 bench/gateway_threads.py --ours-poll 0.05  # ours' workers on a 50 ms timer
  python3 bench/gateway_threads.py --ours-poll -1    # ours' writer alone (workers apply at request time)
  python3 bench/gateway_threads.py --perf /tmp/w.data  # and sample the workers' threads (perf's cpu-clock)
"""
import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import gateway as g  # noqa: E402  (the same etcd, nginx and values)


def threads(pid):
    """{ "comm/tid": (on-CPU ns, context switches) } of a process."""
    out = {}
    for t in os.listdir("/proc/%d/task" % pid):
        try:
            with open("/proc/%d/task/%s/comm" % (pid, t)) as f:
                comm = f.read().strip()
        except OSError:
            continue
        out["%s/%s" % (comm, t)] = (g.task_cpu_ns(pid, t), g.task_switches(pid, t))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--proj", default=os.path.dirname(HERE))
    ap.add_argument("--client", choices=["ours", "resty"], default="ours")
    ap.add_argument("--resty-dir", default=os.environ.get("RESTY_ETCD_VENDOR", "/work/shared/peers/openresty/vendor"))
    ap.add_argument("--keys", type=int, default=2000)
    ap.add_argument("--changes", type=int, default=300)
    ap.add_argument("--gap", type=float, default=0.02)
    ap.add_argument("--ours-poll", type=float, default=0)
    ap.add_argument("--perf", metavar="FILE", help="perf record (cpu-clock, 10 kHz) the workers during the changes")
    args = ap.parse_args()
    # what gateway.Nginx reads
    args.work = tempfile.mkdtemp(prefix="gwthreads.")
    args.workers, args.value_size, args.dict_size = 4, 1024, "48m"
    etcd = g.Etcd(args.work)
    ng, st, loaded = None, None, None
    try:
        etcd.start()
        g.load_keys(etcd, args.keys, args.value_size)
        ng = g.Nginx(args, args.client, etcd.port, args.client)
        ng.start()
        st = g.wait_all(ng, lambda s: all("full:%d" % w in s for w in range(4)), 120, 0.05)
        if not st:
            sys.exit("the workers did not load the keys (see %s)" % ng.dir)
        loaded = st  # (its pids let stop() kill stuck workers)
        time.sleep(1)
        pids = ng.pids(st)
        perf = None
        if args.perf:
            perf = subprocess.Popen(["perf", "record", "-q", "-e", "cpu-clock", "-F", "10000", "-o", args.perf,
                                     "-p", ",".join(str(p) for p in pids)])
            time.sleep(0.5)
        before, etcd0 = {p: threads(p) for p in pids}, etcd.cpu()
        rng, rev = random.Random(1), 0
        for seq in range(1, args.changes + 1):
            i = rng.randrange(args.keys)
            rev = etcd.put(g.PREFIX + "k%05d" % i, g.make_value(i, seq, args.value_size))
            time.sleep(args.gap)
        if args.ours_poll < 0:  # nothing applies the changes (no requests come): the writer alone
            time.sleep(2)
            st = loaded
        else:
            st = g.wait_all(ng, lambda s: all(s.get("rev:%d" % w, 0) >= rev for w in range(4)), 60, 0.05)
        if not st:
            sys.exit("the workers did not reach revision %d (see %s)" % (rev, ng.dir))
        after, n = {p: threads(p) for p in pids}, args.changes
        if perf:
            perf.send_signal(2)
            perf.wait()
        sums = []
        for w, p in enumerate(pids):
            total = 0
            for name, (ns, cs) in sorted(after[p].items()):
                ns0, cs0 = before[p].get(name, (0, 0))
                total += ns - ns0
                if ns - ns0 > 1000 * n:  # threads that did something
                    print("worker %d %-24s %6.0f us %5.2f switches per change" % (w, name, (ns - ns0) / 1e3 / n,
                                                                                 (cs - cs0) / n))
            sums.append(total / 1e3 / n)
        print("per change: workers %s us, sum %.0f us; etcd %.0f us" % (
            " ".join("%.0f" % s for s in sums), sum(sums), (etcd.cpu() - etcd0) * 1e6 / n))
    finally:
        if ng:
            ng.stop(st or loaded)
        etcd.stop()
        shutil.rmtree(etcd.data, ignore_errors=True)
        shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
