#!/usr/bin/env bash
# Sustained orders through snapshots, then a restart after kill -9, for one
# or more stockd builds alternating: what a server that has taken orders for
# a while pays (its state mostly remembered ids, a snapshot of them due each
# time the log has grown by half the state), which runs of a few seconds
# never reach.
#
#   scripts/sustained.sh STOCKD [MORE_STOCKD...] [-- LOADGEN_ARGS...]
#   scripts/sustained.sh /tmp/old/stockd target/release/stockd
#   DURATION=60s SHARDS=2 ROUNDS=3 scripts/sustained.sh target/release/stockd -- --pipeline 32
#
# Each run: a fresh server and data directory, 100,000 items x 4 centers
# preloaded, 1-line orders (CONNECTIONS x 16 unless LOADGEN_ARGS say
# otherwise) for DURATION (default 30s), then kill -9 and a restart on the
# same directory, timed to its "recovered" line. Prints per run: orders/s,
# p99, the slowest whole second, each snapshot's time (mark to manifest),
# the last snapshot's bytes and bytes per state entry, and the restart's
# time to load the snapshot and to be recovered. The server and the load
# generator share the machine's CPUs, as in scripts/bench.sh, unless
# SERVER_CPUS and LOADGEN_CPUS pin them apart (taskset lists, as in
# scripts/ab.sh; the load generator then runs a thread per CPU of its own).
# Uses this tree's stock-loadgen (or LG=/path) and python3.
set -euo pipefail
cd "$(dirname "$0")/.."
usage() { echo "usage: $0 STOCKD [MORE_STOCKD...] [-- LOADGEN_ARGS...]" >&2; exit 2; }
builds=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do builds+=("$1"); shift; done
[ ${#builds[@]} -ge 1 ] || usage
[ $# -gt 0 ] && shift
ROUNDS=${ROUNDS:-2} SHARDS=${SHARDS:-1} DURATION=${DURATION:-30s} CONNECTIONS=${CONNECTIONS:-16}
LG=${LG:-target/release/stock-loadgen}
SERVER_PIN=() LG_PIN=() LG_THREADS=()
if [ -n "${SERVER_CPUS:-}" ]; then SERVER_PIN=(taskset -c "$SERVER_CPUS"); fi
if [ -n "${LOADGEN_CPUS:-}" ]; then
    . scripts/cpus.sh
    LG_PIN=(taskset -c "$LOADGEN_CPUS")
    LG_THREADS=(--threads "$(count_cpus "$LOADGEN_CPUS")")
fi
. scripts/ports.sh
pid="" dir=""
cleanup() {
    if [ -n "$pid" ]; then kill -9 "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; fi
    if [ -n "$dir" ]; then rm -rf "$dir"; fi
    true
}
trap cleanup EXIT
start() { # start BIN LOGFILE: a server on $dir, $port
    RUST_LOG=info "${SERVER_PIN[@]}" "$1" --listen 127.0.0.1:"$port" --shard-port-base 0 --shards "$SHARDS" --data-dir "$dir/data" > "$2" 2>&1 &
    pid=$!
}
for round in $(seq "$ROUNDS"); do
    for i in "${!builds[@]}"; do
        bin=${builds[$i]}
        dir=$(mktemp -d) port=$(free_port)
        start "$bin" "$dir/run.log"
        wait_port "$port" 100
        KEYS=(--target stockd://127.0.0.1:"$port" --keys 100000 --centers 4 "${LG_THREADS[@]}")
        "${LG_PIN[@]}" "$LG" "${KEYS[@]}" --quiet --duration 1s --workload query --preload > /dev/null
        "${LG_PIN[@]}" "$LG" "${KEYS[@]}" --workload order --connections "$CONNECTIONS" --duration "$DURATION" \
            --json "$dir/report.json" "$@" 2> "$dir/seconds.txt" > /dev/null
        sleep 1 # a snapshot just finished writes its manifest
        bytes=$( (cat "$dir"/data/snap-*.bin 2>/dev/null || true) | wc -c)
        kill -9 "$pid"; wait "$pid" 2>/dev/null || true
        start "$bin" "$dir/restart.log"
        for _ in $(seq 1200); do grep -q "recovered" "$dir/restart.log" && break; sleep 0.1; done
        kill "$pid"; wait "$pid" 2>/dev/null || true
        pid=""
        python3 - "$dir" "b$((i + 1))" "$round" "$bytes" <<'EOF'
import json, re, sys
d, who, rnd, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
r = json.load(open(f"{d}/report.json"))
secs = [int(x) for x in re.findall(r"\]\s+(\d+) ops/s", open(f"{d}/seconds.txt").read())]
run = re.sub(r"\x1b\[[0-9;]*m", "", open(f"{d}/run.log").read())
took = re.findall(r"snapshot lsn=\d+ deleted_segments=\d+ took_ms=(\d+)", run)
states = [int(x) for x in re.findall(r"snapshot begins.*state=(\d+)", run)]
rec = re.sub(r"\x1b\[[0-9;]*m", "", open(f"{d}/restart.log").read())
loaded = re.search(r"snapshot set loaded.*? ms=(\d+)", rec)
done = re.search(r"ids=(\d+) ms=(\d+)", rec)
whole = secs[1:-1] or secs
per = f"{size / states[-1]:.1f}" if states and size else "-"
print(f"{who} round {rnd}: {r['throughput_ops_s']:,.0f} orders/s, p99 {r['latency_us']['p99']} us, "
      f"slowest second {min(whole) if whole else '-':,}; snapshots {', '.join(took) or 'none'} ms; "
      f"last snapshot {size:,} bytes, {per} per entry; restart: snapshot loaded {loaded.group(1) if loaded else '-'} ms, "
      f"recovered {done.group(2) if done else '-'} ms ({done.group(1) if done else '?'} ids)")
EOF
        rm -rf "$dir"
        dir=""
    done
done
