#!/usr/bin/env python3
"""The disk's write + fdatasync time by write size, the way the log writes.

    scripts/fsync_probe.py [--dir DIR] [--seconds S] [--sizes 4,8,16,32,64]

The log writes each group commit over zeros laid down ahead of use and
fdatasyncs it (persistence/src/prepare.rs), so no fdatasync waits for the
file's size to change. This does the same: a file of zeros is written and
synced first, then each size in turn is written at the next offset and
fdatasynced, for S seconds per size. Prints, per size, the count and the
p50 / p99 / p99.9 / max of write + fdatasync, and the bytes a second that
one writer gets: whether a group commit's time follows its bytes (a larger
commit waits longer) or is a fixed cost per fdatasync (then larger commits
are free). Appending to a growing file is printed too, for contrast.
"""
import argparse
import os
import tempfile
import time

MIB = 1 << 20


def measure(fd, size, seconds, offset, limit):
    """Writes `size` bytes at a time from `offset`, each fdatasynced; latencies in us."""
    buf, lat = b"\x01" * size, []
    end = time.monotonic() + seconds
    while time.monotonic() < end and offset + size <= limit:
        t = time.perf_counter()
        os.pwrite(fd, buf, offset)
        os.fdatasync(fd)
        lat.append((time.perf_counter() - t) * 1e6)
        offset += size
    return lat, offset


def report(label, size, lat):
    if not lat:
        print(f"{label:>12} {size // 1024:>4} KiB: no room left in the file")
        return
    lat.sort()
    q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))]
    mb_s = size * len(lat) / (sum(lat) / 1e6) / MIB
    print(f"{label:>12} {size // 1024:>4} KiB: {len(lat):>6} syncs, p50 {q(.5):6.0f} us, p99 {q(.99):6.0f} us, "
          f"p99.9 {q(.999):6.0f} us, max {lat[-1]:7.0f} us, {mb_s:6.1f} MiB/s")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=".", help="directory on the disk to probe (default: here)")
    ap.add_argument("--seconds", type=float, default=1.0, help="seconds per size (default 1)")
    ap.add_argument("--sizes", default="4,8,16,32,64", help="write sizes in KiB (default 4,8,16,32,64)")
    a = ap.parse_args()
    try:
        sizes = [int(s) * 1024 for s in a.sizes.split(",")]
    except ValueError:
        ap.error(f"--sizes: {a.sizes!r} is not a comma-separated list of KiB")
    if not sizes or min(sizes) <= 0 or a.seconds <= 0:
        ap.error("--sizes and --seconds must be positive")
    if not os.path.isdir(a.dir):
        ap.error(f"--dir: {a.dir} is not a directory")

    with tempfile.TemporaryDirectory(dir=a.dir, prefix="fsync-probe.") as d:
        print(f"{a.dir}: {a.seconds:g} s per size")
        for size in sizes:
            # Zeros for 20,000 syncs a second, at most 128 MiB: a size that
            # reaches their end stops early (the count says how many it did).
            room = int(min(128 * MIB, size * 20_000 * a.seconds)) // 4096 * 4096 + 4096
            path = os.path.join(d, f"zeros-{size}")
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            chunk = b"\0" * (8 * MIB)
            for off in range(0, room, len(chunk)):
                os.pwrite(fd, chunk[: min(len(chunk), room - off)], off)
            os.fsync(fd)
            lat, _ = measure(fd, size, a.seconds, 0, room)
            report("over zeros", size, lat)
            os.close(fd)
            os.unlink(path)

        fd = os.open(os.path.join(d, "append"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        for size in sorted({sizes[0], sizes[-1]}):
            lat, _ = measure(fd, size, a.seconds, 0, 1 << 62)
            report("appending", size, lat)
        os.close(fd)


if __name__ == "__main__":
    main()
