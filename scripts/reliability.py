#!/usr/bin/env python3
"""Hostile-client figures for docs/reliability.md, against a real stockd.

    cargo build --release -p stockd
    python3 scripts/reliability.py [--stockd target/release/stockd] [--idle 10000]

Starts stockd on a free 127.0.0.1 port with a fresh data dir, then measures
its RSS (from /proc) idle, with N idle connections, and under a flood of
pipelined QUERY frames from 64 connections that never read their answers;
checks that a fresh client is still served; and shows what a wrong auth
token gets. Everything it starts it stops. Needs `ulimit -n` above N + 200.
"""
import argparse, os, signal, socket, struct, subprocess, tempfile, time

from procs import free_port, rss_bytes


def rss_mb(pid):
    return rss_bytes(pid) / 2**20


def frame(opcode, rid, body=b""):
    # u32 length (12 + body), u8 version, u8 opcode, u16 flags, u64 request id
    return struct.pack("<IBBHQ", 12 + len(body), 1, opcode, 0, rid) + body


HELLO, PING, QUERY = 0x01, 0x02, 0x10


def call(port, payload, timeout=5.0):
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.sendall(payload)
    head = s.recv(256)
    s.close()
    return head


def status_of(answer):
    # The status byte follows the 16-byte header.
    return answer[16] if len(answer) > 16 else None


def start(stockd, port, extra):
    d = tempfile.mkdtemp(prefix="stockd-rel-")
    p = subprocess.Popen([stockd, "--listen", f"127.0.0.1:{port}", "--shard-port-base", "0",
                          "--data-dir", d] + extra, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            call(port, frame(PING, 1))
            return p, d
        except OSError:
            time.sleep(0.05)
    raise SystemExit("stockd did not come up")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--stockd", default="target/release/stockd")
    ap.add_argument("--idle", type=int, default=10_000)
    ap.add_argument("--flood-mb", type=int, default=16, help="MB of QUERY frames each flooding connection tries to send")
    a = ap.parse_args()
    port = free_port()
    p, d = start(a.stockd, port, ["--shards", "2", "--max-connections", str(a.idle + 100)])
    try:
        print(f"RSS idle: {rss_mb(p.pid):.1f} MB")
        idle = []
        for _ in range(a.idle):
            idle.append(socket.create_connection(("127.0.0.1", port)))
        time.sleep(1.0)
        print(f"RSS with {a.idle} idle connections: {rss_mb(p.pid):.1f} MB")
        for s in idle:
            s.close()
        time.sleep(1.0)
        print(f"RSS after they closed: {rss_mb(p.pid):.1f} MB")

        query = frame(QUERY, 7, struct.pack("<QI", 1, 1))
        chunk = query * (65536 // len(query))
        flood, sent = [], 0
        for _ in range(64):
            s = socket.create_connection(("127.0.0.1", port))
            s.setblocking(False)
            flood.append(s)
        deadline = time.time() + 10
        budget = a.flood_mb << 20
        per = {id(s): 0 for s in flood}
        # Where each connection is inside `chunk`: a partial send goes on
        # from there, so frames stay whole.
        at = {id(s): 0 for s in flood}
        while time.time() < deadline:
            progress = False
            for s in flood:
                if per[id(s)] >= budget:
                    continue
                try:
                    n = s.send(chunk[at[id(s)]:])
                    at[id(s)] = (at[id(s)] + n) % len(chunk)
                    per[id(s)] += n
                    sent += n
                    progress = True
                except BlockingIOError:
                    pass
            if not progress:
                break
        time.sleep(1.0)
        print(f"flood: 64 connections sent {sent / 2**20:.0f} MB of QUERY frames, reading nothing; "
              f"the server stopped reading them; RSS {rss_mb(p.pid):.1f} MB")
        head = call(port, frame(PING, 2))
        print(f"a fresh client meanwhile: PING answered status {status_of(head)} (0 = OK)")
        for s in flood:
            s.close()
        time.sleep(1.0)
        print(f"RSS after the flood closed: {rss_mb(p.pid):.1f} MB")
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=20)

    port = free_port()
    p, d = start(a.stockd, port, ["--shards", "1", "--auth-token", "right"])
    try:
        tok = b"wrong"
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(frame(HELLO, 1, struct.pack("<H", len(tok)) + tok))
        status = status_of(s.recv(256))
        s.sendall(frame(QUERY, 2, struct.pack("<QI", 1, 1)))
        status2 = status_of(s.recv(256))
        print(f"wrong token: HELLO answered status {status} (7 = UNAUTHORIZED); a QUERY after it answered "
              f"status {status2}; the connection stays open")
        s.close()
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=20)


if __name__ == "__main__":
    main()
