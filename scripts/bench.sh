#!/usr/bin/env bash
# Side-by-side benchmark: stockd vs Redis, same machine, same run.
#
#   scripts/bench.sh            # DURATION=10s by default
#
# Builds release binaries, starts stockd (fresh data dir) and redis-server on
# loopback ports, runs each workload against both (alternating), prints one
# table, writes it into docs/benchmarks.md (between the bench.sh markers) with
# the machine and date, and draws docs/latency-mixed.svg for the mixed workload.
#
# By default the servers and the load generator (a thread per CPU) share
# all of the machine's CPUs, as a user trying both on one box would run
# them. SERVER_CPUS and LOADGEN_CPUS pin them instead (taskset lists; the
# load generator gets a thread per CPU of its list): SERVER_CPUS=0
# LOADGEN_CPUS=1 gives each side a core of its own (docs/benchmarks.md,
# *Where the load generator runs*, has both placements measured).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/cpus.sh

DURATION=${DURATION:-10s}
STOCKD_PORT=${STOCKD_PORT:-7600}
REDIS_PORT=${REDIS_PORT:-6390}
# One shard by default: the load generator runs on the same 2 cores, and a
# second shard thread only fights it for CPU (measured: docs/benchmarks.md).
SHARDS=${SHARDS:-1}
SERVER_CPUS=${SERVER_CPUS:-0-$(( $(nproc) - 1 ))}
LOADGEN_CPUS=${LOADGEN_CPUS:-0-$(( $(nproc) - 1 ))}
LG_THREADS=$(count_cpus "$LOADGEN_CPUS")
OUT=$(mktemp -d /tmp/stockd-bench.XXXXXX)
echo "servers on CPUs $SERVER_CPUS, load generator on CPUs $LOADGEN_CPUS ($LG_THREADS threads); results in $OUT"

cargo build --release -q -p stockd -p stock-loadgen
LG=target/release/stock-loadgen

cleanup() {
    [ -n "${STOCKD_PID:-}" ] && kill "$STOCKD_PID" 2>/dev/null && wait "$STOCKD_PID" 2>/dev/null
    [ -n "${REDIS_PID:-}" ] && kill "$REDIS_PID" 2>/dev/null && wait "$REDIS_PID" 2>/dev/null
    true
}
trap cleanup EXIT

RUST_LOG=warn taskset -c "$SERVER_CPUS" target/release/stockd --listen 127.0.0.1:$STOCKD_PORT --shards "$SHARDS" \
    --data-dir "$OUT/stockd-data" > "$OUT/stockd.log" 2>&1 &
STOCKD_PID=$!
taskset -c "$SERVER_CPUS" redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no > "$OUT/redis.log" 2>&1 &
REDIS_PID=$!
sleep 1

STOCKD=stockd://127.0.0.1:$STOCKD_PORT
REDIS=redis://127.0.0.1:$REDIS_PORT
COMMON="--keys 100000 --centers 4 --connections 16 --quiet"

# name | loadgen arguments
WORKLOADS=(
    "query p16|--workload query --pipeline 16"
    "query-batch 64 keys|--workload query-batch --batch 64 --pipeline 4"
    "order 1 line|--workload order --lines 1 --pipeline 16"
    "order 3 lines|--workload order --lines 3 --pipeline 16"
    "inbound 1 line|--workload inbound --lines 1 --pipeline 16"
    "mixed 90/9/1 zipf 0.99|--workload mixed:90,9,1 --zipf 0.99 --pipeline 16"
)

run() { # target tag duration args...
    local target=$1 tag=$2 duration=$3; shift 3
    echo "  $tag" >&2
    taskset -c "$LOADGEN_CPUS" $LG --target "$target" $COMMON --threads "$LG_THREADS" --duration "$duration" --json "$OUT/$tag.json" --hgrm "$OUT/$tag.hgrm" "$@" \
        > "$OUT/$tag.txt" || { echo "run $tag reported errors:" >&2; cat "$OUT/$tag.txt" >&2; }
}

echo "preloading both targets (1,000,000 units on each of 400,000 keys)"
run "$STOCKD" preload-stockd 1s --workload query --preload
run "$REDIS" preload-redis 1s --workload query --preload

i=0
for w in "${WORKLOADS[@]}"; do
    name=${w%%|*}; args=${w#*|}
    echo "$name"
    run "$STOCKD" "w$i-stockd" "$DURATION" $args
    run "$REDIS" "w$i-redis" "$DURATION" $args
    i=$((i + 1))
done

# Open loop at 50% of each target's own closed-loop maximum for the mixed workload.
last=$((i - 1))
for t in stockd redis; do
    max=$(python3 -c "import json;print(json.load(open('$OUT/w$last-$t.json'))['throughput_ops_s'])")
    rate=$(python3 -c "print(int($max * 0.5))")
    target=$STOCKD; [ "$t" = redis ] && target=$REDIS
    echo "mixed open loop at $rate ops/s ($t)"
    run "$target" "open-$t" "$DURATION" --workload mixed:90,9,1 --zipf 0.99 --pipeline 16 --rate "$rate"
done

$LG plot "stockd open loop 50%=$OUT/open-stockd.hgrm" "Redis open loop 50%=$OUT/open-redis.hgrm" \
    "stockd closed loop=$OUT/w$last-stockd.hgrm" "Redis closed loop=$OUT/w$last-redis.hgrm" \
    --title "mixed 90/9/1, zipf 0.99" -o docs/latency-mixed.svg

python3 - "$OUT" "$DURATION" "$SHARDS" "$SERVER_CPUS" "$LOADGEN_CPUS" "$LG_THREADS" <<'PY'
import json, os, platform, subprocess, sys, datetime, re
out, duration, shards, server_cpus, loadgen_cpus, lg_threads = sys.argv[1:7]
names = ["query p16", "query-batch 64 keys", "order 1 line", "order 3 lines", "inbound 1 line", "mixed 90/9/1 zipf 0.99"]
def load(tag): return json.load(open(f"{out}/{tag}.json"))
rows = []
head = "| workload | stockd ops/s | Redis ops/s | ratio | stockd p50/p99/p99.9 us | Redis p50/p99/p99.9 us |"
rows.append(head)
rows.append("|---|---|---|---|---|---|")
def lat(r): l = r["latency_us"]; return f'{l["p50"]}/{l["p99"]}/{l["p999"]}'
for i, n in enumerate(names):
    s, r = load(f"w{i}-stockd"), load(f"w{i}-redis")
    if "batch" in n:
        sv, rv, unit = s["keys_per_s"], r["keys_per_s"], " keys/s"
    else:
        sv, rv, unit = s["throughput_ops_s"], r["throughput_ops_s"], ""
    err = ""
    if s["errors"] or r["errors"]: err = f' (errors: stockd {s["errors"]}, Redis {r["errors"]})'
    rows.append(f"| {n} | {sv:,.0f}{unit} | {rv:,.0f}{unit} | {sv / max(rv, 1):.2f} | {lat(s)} | {lat(r)} |{err}")
for t, label in [("stockd", "stockd"), ("redis", "Redis")]:
    o = load(f"open-{t}")
    late = o["send_late_us"]["p99"]  # the load generator's own delay in sending (part of the latency)
    rows.append(f"| mixed open loop at 50% of {label} max | {o['throughput_ops_s']:,.0f} offered+done, load generator delay p99 {late} us | | | {lat(o) if t=='stockd' else ''} | {lat(o) if t=='redis' else ''} |")
# The mixed rows by kind of request: an order's answer waits for the disk, a query's does not.
kinds = ["query", "order", "inbound"]
rows.append("")
rows.append("| mixed 90/9/1, p50/p99/p99.9 us | " + " | ".join(f"stockd {k}" for k in kinds) + " | " + " | ".join(f"Redis {k}" for k in kinds) + " |")
rows.append("|---" * 7 + "|")
def by_kind(r):
    k = r.get("latency_by_kind_us") or {}
    return [f'{k[n]["p50"]}/{k[n]["p99"]}/{k[n]["p999"]}' if n in k else "" for n in kinds]
for tag, label in [("w5", "closed loop"), ("open", "open loop at 50% of each one's max")]:
    rows.append(f"| {label} | " + " | ".join(by_kind(load(f"{tag}-stockd")) + by_kind(load(f"{tag}-redis"))) + " |")
cpu = "unknown"
try:
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"): cpu = line.split(":", 1)[1].strip(); break
except OSError: pass
machine = f"{os.cpu_count()} cores ({cpu}), Linux {platform.release()}, {datetime.date.today().isoformat()}; stockd --shards {shards}; both servers on CPUs {server_cpus}, the load generator on CPUs {loadgen_cpus} ({lg_threads} threads); {duration} per run, 16 clients (those of a load generator thread share its connections: one per shard for stockd, one for Redis)"
table = "\n".join(rows)
print(machine); print(table)
md = open("docs/benchmarks.md").read()
block = f"<!-- bench.sh:begin -->\n{machine}\n\n{table}\n\n![latency by percentile, mixed workload](latency-mixed.svg)\n<!-- bench.sh:end -->"
if "<!-- bench.sh:begin -->" in md:
    md = re.sub(r"<!-- bench.sh:begin -->.*?<!-- bench.sh:end -->", lambda m: block, md, flags=re.S)
else:
    md += "\n## stockd vs Redis (scripts/bench.sh)\n\n" + block + "\n"
open("docs/benchmarks.md", "w").write(md)
PY
echo "wrote docs/benchmarks.md and docs/latency-mixed.svg"
