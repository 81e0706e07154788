#!/usr/bin/env python3
"""How long this machine keeps a thread from running, with nothing else to do.

    taskset -c 0 scripts/hiccups.py 10      # 10 s on CPU 0

Sleeps 200 us at a time and records how much longer each sleep took: the
scheduler's, the kernel's and the hypervisor's stalls, the floor under any
server's tail latency here (docs/benchmarks.md, *The machine's own tail*).
Python adds ~50-70 us to every sleep; the stalls that matter are
milliseconds.
"""
import sys
import time

SLEEP = 0.0002


def main():
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 10.0
    end = time.monotonic() + seconds
    over = []
    while time.monotonic() < end:
        t = time.monotonic()
        time.sleep(SLEEP)
        over.append(time.monotonic() - t - SLEEP)
    over.sort()
    n = len(over)

    def ms(q):
        return over[min(n - 1, int(q * n))] * 1e3

    print(
        f"{n} sleeps of 0.2 ms in {seconds:g} s, overshoot in ms: p50 {ms(0.5):.3f}  p99 {ms(0.99):.3f}  "
        f"p99.9 {ms(0.999):.3f}  p99.99 {ms(0.9999):.3f}  max {over[-1] * 1e3:.3f}; "
        f"over 2 ms: {sum(x > 0.002 for x in over)}, over 5 ms: {sum(x > 0.005 for x in over)}"
    )


if __name__ == "__main__":
    main()
