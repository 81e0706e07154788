#!/usr/bin/env bash
# Instructions per operation of stockd's busiest thread under a workload,
# counted by callgrind: a figure that, unlike time on a shared 2-core
# machine, moves by a few percent from run to run, so that a change of a
# few hundred instructions per order can be seen at all.
#
#   scripts/callgrind.sh [STOCKD] -- LOADGEN_ARGS...
#   scripts/callgrind.sh -- --workload order --pipeline 16
#   SHARDS=2 DURATION=15s OUT=/tmp/cg scripts/callgrind.sh /tmp/old/stockd -- --workload order
#
# Starts STOCKD (default target/release/stockd, built with debug info as
# the release profile is) under valgrind's callgrind with instrumentation
# off, preloads the keys (100,000 items x 4 centers) and runs the workload
# for 3 s uninstrumented, then switches instrumentation on for DURATION
# (default 15s) of the workload with CONNECTIONS (default 16) connections,
# and dumps a profile per thread into OUT (default a new temporary
# directory). Prints the instructions of each thread per operation the
# load generator counted, then the busiest thread's functions with the
# most instructions of their own per operation (inlined code counted in
# the function it was inlined into). Under callgrind the server runs
# some 10-20x slower, so its group commits are larger than at full speed:
# compare builds with each other, not with a run at full speed.
# Needs valgrind (apt-get install valgrind) and this tree's stock-loadgen.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/stockd_args.sh
parse_stockd_args "$@"
SHARDS=${SHARDS:-1} DURATION=${DURATION:-15s} CONNECTIONS=${CONNECTIONS:-16} TOP=${TOP:-25}
OUT=${OUT:-$(mktemp -d)}
LG=${LG:-target/release/stock-loadgen}
command -v valgrind > /dev/null || { echo "valgrind is not installed" >&2; exit 1; }
mkdir -p "$OUT"
rm -f "$OUT"/callgrind.out*
dir=$(mktemp -d)
. scripts/ports.sh
port=$(free_port)
pid=""
cleanup() {
    if [ -n "$pid" ]; then kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null; fi
    rm -rf "$dir"
    true
}
trap cleanup EXIT
RUST_LOG=warn valgrind --tool=callgrind --separate-threads=yes --instr-atstart=no \
    --callgrind-out-file="$OUT/callgrind.out" \
    "$bin" --listen 127.0.0.1:"$port" --shard-port-base 0 --shards "$SHARDS" --data-dir "$dir" \
    > "$OUT/stockd.log" 2>&1 &
pid=$!
wait_port "$port" 300 # valgrind takes seconds to start the server
KEYS=(--target stockd://127.0.0.1:"$port" --keys 100000 --centers 4 --quiet)
"$LG" "${KEYS[@]}" --duration 1s --workload query --preload > /dev/null
"$LG" "${KEYS[@]}" --connections "$CONNECTIONS" --duration 3s "${loadgen_args[@]}" > /dev/null
callgrind_control -i on "$pid" > /dev/null 2>&1
"$LG" "${KEYS[@]}" --connections "$CONNECTIONS" --duration "$DURATION" --json "$OUT/report.json" "${loadgen_args[@]}" > /dev/null
callgrind_control -d "$pid" > /dev/null 2>&1
callgrind_control -i off "$pid" > /dev/null 2>&1
kill "$pid"
wait "$pid" 2>/dev/null || true
pid=""
python3 - "$OUT" "$TOP" <<'EOF'
import glob, json, re, subprocess, sys
out, top = sys.argv[1], int(sys.argv[2])
ops = json.load(open(f"{out}/report.json"))["ops"]
threads = []
for f in glob.glob(f"{out}/callgrind.out.*-*"):
    text = open(f).read()
    total = int(re.search(r"^summary: (\d+)", text, re.M).group(1))
    threads.append((total, f))
threads.sort(reverse=True)
print(f"{ops:,} operations counted; instructions per operation by thread:")
for total, f in threads:
    if total:
        print(f"  {total / ops:9,.0f}  {f}")
busiest = threads[0][1]
report = subprocess.run(["callgrind_annotate", "--threshold=100", "--auto=no", busiest],
                        capture_output=True, text=True, check=True).stdout
own = {}
listing = False
for line in report.splitlines():
    if "file:function" in line:
        listing = True
        continue
    m = re.match(r"^\s*([\d,]+) \([^)]*\)\s+(.*)$", line) if listing else None
    if m:
        name = re.sub(r" \[.*\]$", "", m.group(2)).split(":", 1)[-1]
        own[name] = own.get(name, 0) + int(m.group(1).replace(",", ""))
print(f"busiest thread, own instructions per operation (top {top}):")
for name, n in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
    print(f"  {n / ops:7,.0f}  {name[:120]}")
EOF
