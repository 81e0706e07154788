#!/usr/bin/env bash
# stock-gateway under wrk (keep-alive), beside the ceiling of any axum service
# on this machine (a constant-JSON handler, gateway/examples/ceiling.rs).
#
#   scripts/gateway-bench.sh        # DURATION=10s CONNECTIONS=64 THREADS=2
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-64}
THREADS=${THREADS:-2}
OUT=$(mktemp -d /tmp/gateway-bench.XXXXXX)
command -v wrk >/dev/null || { echo "wrk is needed: apt-get install wrk" >&2; exit 1; }
cargo build --release -q -p stockd -p stock-gateway
cargo build --release -q -p stock-gateway --example ceiling
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
RUST_LOG=warn target/release/stockd --listen 127.0.0.1:7650 --shards 1 --data-dir "$OUT/data" > "$OUT/stockd.log" 2>&1 & pids+=($!)
RUST_LOG=warn target/release/stock-gateway --listen 127.0.0.1:8085 --stockd 127.0.0.1:7650 > "$OUT/gw.log" 2>&1 & pids+=($!)
target/release/examples/ceiling 127.0.0.1:8090 & pids+=($!)
sleep 1
curl -sf -X POST 127.0.0.1:8085/v1/inbounds -H 'content-type: application/json' \
    -d '{"receipt_id":1,"lines":[{"vendor_item_id":1001,"fulfillment_center_id":7,"qty":100000000}]}' > /dev/null
# POST /v1/orders with a fresh order id per request (1 unit each).
cat > "$OUT/order.lua" <<'LUA'
threads_made = 0
setup = function(thread)
  threads_made = threads_made + 1
  thread:set("id_base", threads_made * 10000000000)
end
request = function()
  n = (n or 0) + 1
  local body = string.format('{"order_id":%d,"lines":[{"vendor_item_id":1001,"fulfillment_center_id":7,"qty":1}]}', id_base + n)
  return wrk.format("POST", "/v1/orders", {["Content-Type"] = "application/json"}, body)
end
LUA
run() { # name url [script]
    local name=$1 url=$2 script=${3:-}
    local args=(-t "$THREADS" -c "$CONNECTIONS" -d "$DURATION" --latency)
    [ -n "$script" ] && args+=(-s "$script")
    wrk "${args[@]}" "$url" > "$OUT/$name.txt"
    local rps p99
    rps=$(awk '/Requests\/sec/ {print $2}' "$OUT/$name.txt")
    p99=$(awk '$1 == "99%" {print $2}' "$OUT/$name.txt")
    echo "$name $rps $p99"
}
echo "name requests/s p99"
run ceiling http://127.0.0.1:8090/v1/stock/1001/7
run gateway-get http://127.0.0.1:8085/v1/stock/1001/7
run ceiling-2 http://127.0.0.1:8090/v1/stock/1001/7
run gateway-get-2 http://127.0.0.1:8085/v1/stock/1001/7
run gateway-order http://127.0.0.1:8085/v1/orders "$OUT/order.lua"
grep -h "Non-2xx" "$OUT"/*.txt || true
echo "raw wrk output in $OUT"
