#!/usr/bin/env bash
# glommio vs tokio current-thread echo: 16-byte messages, pipeline 16,
# 8 connections, server on core 0, client on core 1; 3 alternating rounds.
set -euo pipefail
cd "$(dirname "$0")"
cargo build --release -q
bin=target/release/runtime-echo
secs=${SECS:-5}
declare -A results
for round in 1 2 3; do
    for rt in tokio glommio; do
        port=$((17400 + RANDOM % 1000))
        $bin server "$rt" "$port" & pid=$!
        sleep 0.5
        r=$($bin client "$port" 8 16 "$secs")
        kill "$pid"; wait "$pid" 2>/dev/null || true
        echo "round $round $rt: $r msgs/s"
        results[$rt]+="$r "
    done
done
median() { tr ' ' '\n' | grep -v '^$' | sort -n | sed -n 2p; }
t=$(echo "${results[tokio]}" | median); g=$(echo "${results[glommio]}" | median)
echo "median tokio $t msgs/s, glommio $g msgs/s, glommio/tokio = $(echo "scale=2; $g/$t" | bc)"
