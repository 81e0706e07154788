#!/usr/bin/env bash
# A/B one workload between two or more stockd builds: a fresh server and
# data dir per run, the builds alternating, ROUNDS rounds (default 3).
#
#   scripts/ab.sh BEFORE_STOCKD AFTER_STOCKD [MORE_STOCKD...] -- LOADGEN_ARGS...
#   scripts/ab.sh /tmp/base/target/release/stockd target/release/stockd -- --workload order
#   CONNECTIONS=4 DURATION=15s scripts/ab.sh A B -- --workload order
#   SHARDS=8 scripts/ab.sh old/stockd mid/stockd new/stockd -- --workload query-batch --pipeline 16
#
# Each run preloads the keys (a 1 s query run with --preload), then runs
# the workload with CONNECTIONS (default 16) connections for DURATION
# (default 5s), the server and the load generator sharing the machine's
# CPUs as in scripts/bench.sh. Prints "build round ops/s p50 p99 p99.9
# server_us_per_op" per run (build: before and after for two builds, else
# b1, b2, ... in the order given; server CPU from /proc over the
# workload), then the medians of each build and their ratio to the first.
# Waits PAUSE seconds (default 2) after each run: deleting a data
# directory on a disk with online discard slows the next run's fdatasyncs
# for a while. Uses this tree's stock-loadgen (build it first: cargo build
# --release -p stock-loadgen; or LG=/path/to/stock-loadgen) and python3 to
# read its JSON report. On a many-core machine SERVER_CPUS and
# LOADGEN_CPUS pin the server and the load generator apart (taskset lists,
# as in scripts/scale.sh), the load generator with a thread per CPU of its
# own.
set -euo pipefail
cd "$(dirname "$0")/.."
usage() { echo "usage: $0 BEFORE_STOCKD AFTER_STOCKD [MORE_STOCKD...] -- LOADGEN_ARGS..." >&2; exit 2; }
builds=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do builds+=("$1"); shift; done
[ ${#builds[@]} -ge 2 ] && [ $# -ge 1 ] || usage
shift
labels=(before after)
if [ ${#builds[@]} -gt 2 ]; then labels=(); for i in "${!builds[@]}"; do labels+=("b$((i + 1))"); done; fi
for i in "${!builds[@]}"; do echo "${labels[$i]}: ${builds[$i]}"; done
ROUNDS=${ROUNDS:-3} SHARDS=${SHARDS:-1} DURATION=${DURATION:-5s} CONNECTIONS=${CONNECTIONS:-16} PAUSE=${PAUSE:-2}
LG=${LG:-target/release/stock-loadgen}
KEYS=(--keys 100000 --centers 4)
SERVER_PIN=() LG_PIN=()
if [ -n "${SERVER_CPUS:-}" ]; then SERVER_PIN=(taskset -c "$SERVER_CPUS"); fi
if [ -n "${LOADGEN_CPUS:-}" ]; then
    . scripts/cpus.sh
    LG_PIN=(taskset -c "$LOADGEN_CPUS")
    KEYS+=(--threads "$(count_cpus "$LOADGEN_CPUS")")
fi
. scripts/ports.sh
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
rows=$(mktemp)
pid="" dir=""
# Stops the server of the run in progress, should a run fail (a load
# generator that refuses its arguments, say) or the script be interrupted.
cleanup() {
    if [ -n "$pid" ]; then kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null; fi
    if [ -n "$dir" ]; then rm -rf "$dir"; fi
    rm -f "$rows"
    true
}
trap cleanup EXIT
for round in $(seq "$ROUNDS"); do
    for i in "${!builds[@]}"; do
        who=${labels[$i]} bin=${builds[$i]}
        dir=$(mktemp -d) port=$(free_port)
        RUST_LOG=warn "${SERVER_PIN[@]}" "$bin" --listen 127.0.0.1:"$port" --shard-port-base 0 --shards "$SHARDS" --data-dir "$dir" \
            > "$dir/stockd.log" 2>&1 &
        pid=$!
        wait_port "$port" 100
        "${LG_PIN[@]}" "$LG" --target stockd://127.0.0.1:"$port" "${KEYS[@]}" --quiet --duration 1s --workload query --preload > /dev/null
        t0=$(cpu_ticks "$pid")
        "${LG_PIN[@]}" "$LG" --target stockd://127.0.0.1:"$port" "${KEYS[@]}" --connections "$CONNECTIONS" --quiet \
            --duration "$DURATION" --json "$dir/report.json" "$@" > /dev/null
        t1=$(cpu_ticks "$pid")
        python3 - "$dir/report.json" "$who" "$round" "$t0" "$t1" "$(getconf CLK_TCK)" <<'EOF' | tee -a "$rows"
import json, sys
d = json.load(open(sys.argv[1])); l = d["latency_us"]
server_us = (int(sys.argv[5]) - int(sys.argv[4])) / int(sys.argv[6]) * 1e6 / max(1, d["ops"])
print(sys.argv[2], sys.argv[3], int(d["throughput_ops_s"]), l["p50"], l["p99"], l["p999"], round(server_us, 2))
EOF
        kill "$pid"; wait "$pid" 2>/dev/null || true
        pid=""
        rm -rf "$dir"
        dir=""
        sleep "$PAUSE"
    done
done
python3 - "$rows" <<'EOF'
import statistics, sys
runs = {}
for line in open(sys.argv[1]):
    who, _, *vals = line.split()
    runs.setdefault(who, []).append([float(v) for v in vals])
med = {w: [statistics.median(c) for c in zip(*r)] for w, r in runs.items()}
first = next(iter(med))
for w, m in med.items():
    print(f"median {w}: {m[0]:,.0f} ops/s, p50/p99/p99.9 {m[1]:.0f}/{m[2]:.0f}/{m[3]:.0f} us, server {m[4]:.2f} us/op")
for w, m in med.items():
    if w != first:
        print(f"{w}/{first}: {m[0] / med[first][0]:.2f}x ops/s, {m[4] / med[first][4]:.2f}x server CPU per op")
EOF
