#!/usr/bin/env bash
# Where the CPU goes, thread by thread, while a workload runs: each thread
# of stockd and of the load generator, its busy time (user, system), its
# CPU per operation, and how long it waited for a core while runnable.
# On a machine whose cores the server and the load generator share, that
# last column is what a thread loses to the others.
#
#   scripts/threads.sh [STOCKD] -- LOADGEN_ARGS...
#   scripts/threads.sh -- --workload order --pipeline 16
#   SHARDS=2 DURATION=12 scripts/threads.sh /tmp/old/stockd -- --workload query
#
# Starts STOCKD (default target/release/stockd) on a free loopback port
# with SHARDS shards (default 1) and a fresh data directory, preloads the
# keys (100,000 items x 4 centers), runs the workload for DURATION seconds
# (default 10) with CONNECTIONS connections (default 16), and reads
# /proc/PID/task/*/stat and schedstat of both processes 3 s into the run
# and 5 s later. Per operation figures divide by the run's mean rate (the
# load generator's report). Stops what it started.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/stockd_args.sh
parse_stockd_args "$@"
SHARDS=${SHARDS:-1} DURATION=${DURATION:-10} CONNECTIONS=${CONNECTIONS:-16}
LG=${LG:-target/release/stock-loadgen}
[ "$DURATION" -ge 9 ] || { echo "DURATION must be at least 9 (seconds): the window is 3 s to 8 s" >&2; exit 2; }
. scripts/ports.sh
dir=$(mktemp -d)
port=$(free_port)
pid="" lg=""
cleanup() {
    if [ -n "$lg" ]; then kill "$lg" 2>/dev/null && wait "$lg" 2>/dev/null; fi
    if [ -n "$pid" ]; then kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null; fi
    rm -rf "$dir"
    true
}
trap cleanup EXIT
RUST_LOG=warn "$bin" --listen 127.0.0.1:"$port" --shard-port-base 0 --shards "$SHARDS" --data-dir "$dir/data" \
    > "$dir/stockd.log" 2>&1 &
pid=$!
wait_port "$port" 100
KEYS=(--target stockd://127.0.0.1:"$port" --keys 100000 --centers 4 --quiet)
"$LG" "${KEYS[@]}" --duration 1s --workload query --preload > /dev/null
"$LG" "${KEYS[@]}" --connections "$CONNECTIONS" --duration "${DURATION}s" --json "$dir/report.json" "${loadgen_args[@]}" \
    > /dev/null &
lg=$!
# One line per thread: process, thread id, name, user ticks, system ticks,
# nanoseconds waited on a run queue, times it ran.
sample() {
    for p in "$pid" "$lg"; do
        for t in /proc/"$p"/task/*; do
            read -r -a stat < "$t/stat" || continue
            read -r _ wait slices < "$t/schedstat" || continue
            # The name is field 2, in parentheses and without spaces in
            # these programs; user and system ticks are fields 14 and 15.
            echo "$p ${t##*/} ${stat[1]} ${stat[13]} ${stat[14]} $wait $slices"
        done
    done
}
sleep 3
before=$(sample)
sleep 5
after=$(sample)
wait "$lg"
lg=""
python3 - "$dir/report.json" "$pid" 5 "$before" "$after" <<'EOF'
import json, os, sys
report, server, window, before, after = sys.argv[1:6]
window = float(window)
rate = json.load(open(report))["throughput_ops_s"]
hz = os.sysconf("SC_CLK_TCK")
def parse(text):
    rows = {}
    for line in text.splitlines():
        p, t, name, user, system, wait, slices = line.split()
        rows[(p, t)] = (name.strip("()"), int(user), int(system), int(wait), int(slices))
    return rows
b, a = parse(before), parse(after)
print(f"{rate:,.0f} operations/s (the run's mean); {window:.0f} s window")
print(f"{'':7} {'thread':18} {'user %':>7} {'sys %':>6} {'us/op':>7} {'waited %':>8} {'runs/s':>8}")
totals = {}
for key in sorted(a, key=lambda k: (k[0] != server, k[1])):
    if key not in b:
        continue
    name, user, system, wait, slices = a[key]
    _, user0, system0, wait0, slices0 = b[key]
    u, s = (user - user0) / hz / window, (system - system0) / hz / window
    if u + s == 0:
        continue
    per_op = (u + s) / rate * 1e6
    who = "stockd" if key[0] == server else "loadgen"
    totals[who] = totals.get(who, 0) + per_op
    print(f"{who:7} {name:18} {u * 100:7.1f} {s * 100:6.1f} {per_op:7.3f} "
          f"{(wait - wait0) / 1e9 / window * 100:8.1f} {(slices - slices0) / window:8,.0f}")
print("CPU per operation, us: " + ", ".join(f"{who} {v:.3f}" for who, v in totals.items()))
EOF
