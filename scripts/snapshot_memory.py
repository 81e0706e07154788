#!/usr/bin/env python3
"""How much memory a snapshot takes while it is written, under orders.

    cargo build --release -p stockd -p stock-loadgen
    python3 scripts/snapshot_memory.py [--stockd target/release/stockd] [--duration 20s]

Starts stockd (by default 1 shard on CPU 0: --shards, --server-cpus)
with a fresh data dir on a free 127.0.0.1 port, preloads 100,000 items x 4
centers, then runs 1-line orders (16 connections x 16; the load
generator on CPU 1 with 1 thread by default: --loadgen-cpus, --threads,
--connections) for --duration, sampling the server's RSS every 10 ms.
With several shards every shard snapshots at the same mark, so a
window's growth is all of theirs. For each snapshot it prints the RSS when its
"snapshot begins" line was logged, the most RSS while it was written (up
to its closing line), the growth between the two, and how long it took.
The state itself grows meanwhile (every order adds an id), so the growth
is the snapshot's memory plus that. Everything it starts it stops, and
its data directory is removed.
"""
import argparse, datetime, json, os, re, shutil, subprocess, tempfile, threading, time

from procs import free_port, rss_bytes, wait_port


def log_time(line):
    """The UTC time a tracing log line starts with, as a Unix time; None if it has none."""
    m = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?)Z", line)
    if not m:
        return None
    stamp = m.group(1)[:26]  # microseconds at most
    fmt = "%Y-%m-%dT%H:%M:%S.%f" if "." in stamp else "%Y-%m-%dT%H:%M:%S"
    return datetime.datetime.strptime(stamp, fmt).replace(tzinfo=datetime.timezone.utc).timestamp()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--stockd", default="target/release/stockd")
    ap.add_argument("--loadgen", default="target/release/stock-loadgen")
    ap.add_argument("--duration", default="20s")
    ap.add_argument("--shards", type=int, default=1)
    ap.add_argument("--server-cpus", default="0", help="taskset list for stockd")
    ap.add_argument("--loadgen-cpus", default="1", help="taskset list for the load generator")
    ap.add_argument("--threads", type=int, default=1, help="load generator threads")
    ap.add_argument("--connections", type=int, default=16)
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="stockd-snapmem.")
    port = free_port()
    log_path = os.path.join(work, "stockd.log")
    env = dict(os.environ, RUST_LOG="info", NO_COLOR="1")
    with open(log_path, "w") as log:
        srv = subprocess.Popen(
            ["taskset", "-c", a.server_cpus, a.stockd, "--listen", f"127.0.0.1:{port}", "--shard-port-base", "0",
             "--shards", str(a.shards), "--data-dir", os.path.join(work, "data")],
            stdout=log, stderr=log, env=env)
    try:
        wait_port(port, "stockd", srv)
        lg = ["taskset", "-c", a.loadgen_cpus, a.loadgen, "--target", f"stockd://127.0.0.1:{port}", "--keys",
              "100000", "--centers", "4", "--quiet", "--threads", str(a.threads)]
        subprocess.run(lg + ["--duration", "1s", "--workload", "query", "--preload"], check=True,
                       stdout=subprocess.DEVNULL)
        samples, done = [], threading.Event()

        def sample():
            while not done.is_set():
                samples.append((time.time(), rss_bytes(srv.pid) >> 20))
                time.sleep(0.01)

        sampler = threading.Thread(target=sample)
        sampler.start()
        report = os.path.join(work, "orders.json")
        orders = ["--duration", a.duration, "--workload", "order", "--pipeline", "16",
                  "--connections", str(a.connections), "--json", report]
        subprocess.run(lg + orders, check=True, stdout=subprocess.DEVNULL)
        time.sleep(3)  # a snapshot under way at the end may finish
        done.set()
        sampler.join()
    finally:
        srv.terminate()
        srv.wait()
    orders = json.load(open(report))["throughput_ops_s"]
    lines = open(log_path).read().splitlines()
    shutil.rmtree(work)
    begins, ends = [], []
    for line in lines:
        t = log_time(line)
        if t is None:
            continue
        if "snapshot begins" in line:
            begins.append(t)
        elif "took_ms=" in line:
            ends.append((t, int(re.search(r"took_ms=(\d+)", line).group(1))))
    print(f"{a.stockd}: {orders:,.0f} orders/s, peak RSS {max(r for _, r in samples)} MB")
    print("| snapshot | RSS at its start MB | most RSS while written MB | growth MB | took ms |")
    print("|---|---|---|---|---|")
    for i, (e, took) in enumerate(ends, 1):
        b = max((t for t in begins if t <= e), default=None)  # the mark this closing line ends
        if b is None:
            continue
        before = [r for t, r in samples if t <= b]
        during = [r for t, r in samples if b <= t <= e]
        if before and during:
            print(f"| {i} | {before[-1]} | {max(during)} | {max(during) - before[-1]} | {took} |")


if __name__ == "__main__":
    main()
