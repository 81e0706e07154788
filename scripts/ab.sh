#!/usr/bin/env bash
# A/B one workload between two stockd builds: a fresh server and data dir
# per run, the builds alternating, ROUNDS rounds (default 3).
#
#   scripts/ab.sh BEFORE_STOCKD AFTER_STOCKD -- LOADGEN_ARGS...
#   scripts/ab.sh /tmp/base/target/release/stockd target/release/stockd -- --workload inbound --lines 1 --pipeline 16
#
# Prints "before|after round ops/s p99_us" per run. Uses this tree's
# stock-loadgen (build it first: cargo build --release -p stock-loadgen)
# and python3 to read its JSON report.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 3 ] && [ "$3" = "--" ] || { echo "usage: $0 BEFORE_STOCKD AFTER_STOCKD -- LOADGEN_ARGS..." >&2; exit 2; }
before=$1 after=$2; shift 3
ROUNDS=${ROUNDS:-3} SHARDS=${SHARDS:-1} DURATION=${DURATION:-5s}
LG=target/release/stock-loadgen
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
for round in $(seq "$ROUNDS"); do
    for who in before after; do
        bin=$before; [ $who = after ] && bin=$after
        dir=$(mktemp -d) port=$(free_port)
        RUST_LOG=warn "$bin" --listen 127.0.0.1:"$port" --shard-port-base 0 --shards "$SHARDS" --data-dir "$dir" \
            > "$dir/stockd.log" 2>&1 &
        pid=$!
        sleep 0.5
        "$LG" --target stockd://127.0.0.1:"$port" --keys 100000 --centers 4 --connections 16 --quiet \
            --duration "$DURATION" --json "$dir/report.json" "$@" > /dev/null
        python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[2], sys.argv[3], int(d['throughput_ops_s']), d['latency_us']['p99'])" \
            "$dir/report.json" "$who" "$round"
        kill "$pid"; wait "$pid" 2>/dev/null || true
        rm -rf "$dir"
    done
done
