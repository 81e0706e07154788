#!/usr/bin/env python3
"""Memory per resident row, stockd against Redis, in one run; or per
remembered order id.

    cargo build --release -p stockd -p stock-loadgen -p stockd-client
    python3 scripts/memory.py [--rows 1000000 10000000] [--redis redis-server]
    python3 scripts/memory.py --ids 8s [--lines 3] [--rounds 3] [--stockd-builds A B ...]

For each row count: starts stockd (1 shard, a fresh data dir, a free
127.0.0.1 port), reads its RSS from /proc, preloads rows/4 items x 4
centers through the load generator (stockd: 256-line INBOUND receipts, so
remembered receipt ids are 1/256 of the rows), waits for the RSS to settle,
and reports (RSS after - RSS before) / rows. Then the same for
redis-server (no persistence), which the load generator fills with one
string key per row. Prints a Markdown table. Everything it starts it stops.

With --ids DURATION: for each stockd build given (alternating, --rounds
rounds), a fresh server (1 shard) with 100,000 items x 4 centers preloaded,
then orders of --lines lines (default 1) with distinct ids for DURATION (uniform keys, open
loop at 100,000 orders/s, so that every build remembers about as many
ids: tables grow in steps, so bytes per id depend on the count); reports
(RSS after - RSS before) / the ids it remembers (STATS).
Everything a remembered id costs counts: its entry, its index entry, its
place in the eviction line, and whatever the allocator keeps of the
orders' passing allocations.
"""
import argparse, contextlib, shutil, subprocess, tempfile, time

from procs import free_port, rss_bytes, wait_port


def settled_rss(pid):
    """RSS once it stops changing (a snapshot may be written after the preload)."""
    last = rss_bytes(pid)
    for _ in range(60):
        time.sleep(0.5)
        now = rss_bytes(pid)
        if abs(now - last) < 256 * 1024:
            return now
        last = now
    return last


@contextlib.contextmanager
def server(name, cmd):
    """Starts `cmd` ({port} and {data} filled in: a free port, a fresh
    directory) and waits until it listens; yields (process, port); stops
    it and removes the directory."""
    port = free_port()
    data = tempfile.mkdtemp(prefix="stockd-mem-")
    proc = subprocess.Popen([c.format(port=port, data=data) for c in cmd],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, name, proc)
        yield proc, port
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(data, ignore_errors=True)


def measure(name, cmd, target, rows, loadgen):
    with server(name, cmd) as (proc, port):
        before = settled_rss(proc.pid)
        t = time.monotonic()
        subprocess.run([loadgen, "--target", target.format(port=port), "--keys", str(rows // 4), "--centers", "4",
                        "--threads", "1", "--connections", "1", "--duration", "1s", "--workload", "query",
                        "--preload", "--quiet"], check=True, stdout=subprocess.DEVNULL)
        load_s = time.monotonic() - t
        after = settled_rss(proc.pid)
    per_row = (after - before) / rows
    print(f"| {name} | {rows:,} | {before / 2**20:.1f} | {after / 2**20:.1f} | {per_row:.1f} | {load_s:.1f} |", flush=True)
    return per_row


def stat(stockctl, port, name):
    out = subprocess.run([stockctl, "--addr", f"127.0.0.1:{port}", "stats"], check=True,
                         capture_output=True, text=True).stdout
    for line in out.splitlines():
        k, _, v = line.partition(" ")
        if k == name:
            return int(v)
    raise SystemExit(f"stats has no {name}:\n{out}")


def measure_ids(stockd, duration, lines, loadgen, stockctl):
    cmd = [stockd, "--listen", "127.0.0.1:{port}", "--shards", "1", "--shard-port-base", "0", "--data-dir", "{data}"]
    with server(stockd, cmd) as (proc, port):
        base = [loadgen, "--target", f"stockd://127.0.0.1:{port}", "--keys", "100000", "--centers", "4", "--quiet"]
        subprocess.run(base + ["--duration", "1s", "--workload", "query", "--preload"], check=True,
                       stdout=subprocess.DEVNULL)
        before = settled_rss(proc.pid)
        ids_before = stat(stockctl, port, "ids")
        subprocess.run(base + ["--duration", duration, "--workload", "order", "--lines", str(lines),
                               "--connections", "16", "--pipeline", "16", "--rate", "100000"],
                       check=True, stdout=subprocess.DEVNULL)
        after = settled_rss(proc.pid)
        ids = stat(stockctl, port, "ids") - ids_before
    per_id = (after - before) / ids
    print(f"| {stockd} | {ids:,} | {before / 2**20:.1f} | {after / 2**20:.1f} | {per_id:.1f} |", flush=True)
    return per_id


def main_ids(a):
    builds = a.stockd_builds or [a.stockd]
    print("| stockd | ids | RSS before MB | RSS after MB | bytes per id |")
    print("|---|---|---|---|---|")
    got = {b: [] for b in builds}
    for _ in range(a.rounds):
        for b in builds:
            got[b].append(measure_ids(b, a.ids, a.lines, a.loadgen, a.stockctl))
    print()
    first = sorted(got[builds[0]])[len(got[builds[0]]) // 2]
    for b in builds:
        med = sorted(got[b])[len(got[b]) // 2]
        print(f"{b}: median {med:.1f} B/id, {med / first:.2f}x the first")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--stockd", default="target/release/stockd")
    ap.add_argument("--stockd-builds", nargs="+", help="with --ids: builds to compare, alternating")
    ap.add_argument("--ids", metavar="DURATION", help="measure bytes per remembered order id instead of per row")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--lines", type=int, default=1, help="with --ids: lines per order")
    ap.add_argument("--loadgen", default="target/release/stock-loadgen")
    ap.add_argument("--stockctl", default="target/release/stockctl")
    ap.add_argument("--redis", default=shutil.which("redis-server") or "redis-server")
    a = ap.parse_args()
    if a.ids:
        return main_ids(a)
    print("| server | rows | RSS before MB | RSS after MB | bytes per row | preload s |")
    print("|---|---|---|---|---|---|")
    results = []
    for rows in a.rows:
        s = measure("stockd --shards 1", [a.stockd, "--listen", "127.0.0.1:{port}", "--shards", "1",
                                          "--shard-port-base", "0", "--data-dir", "{data}"],
                    "stockd://127.0.0.1:{port}", rows, a.loadgen)
        r = measure("redis-server (string keys)", [a.redis, "--port", "{port}", "--bind", "127.0.0.1",
                                                   "--save", "", "--appendonly", "no"],
                    "redis://127.0.0.1:{port}", rows, a.loadgen)
        results.append((rows, s, r))
    print()
    for rows, s, r in results:
        print(f"{rows:,} rows: stockd {s:.1f} B/row, Redis {r:.1f} B/row, ratio {s / r:.2f}")


if __name__ == "__main__":
    main()
