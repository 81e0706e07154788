"""What the benchmark scripts share: free ports, waiting for a listener, RSS.

The scripts in this folder import it (`python3 scripts/NAME.py` puts this
folder on the module path).
"""
import socket
import time


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, what, proc=None, limit=20):
    """Waits until something accepts on 127.0.0.1:port; exits if `proc` ends first or `limit` s pass."""
    t = time.time()
    while time.time() - t < limit:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode} before listening on {port}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"{what} did not listen on {port}")


def rss_bytes(pid):
    """Resident set size of a process, from /proc."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise SystemExit(f"no VmRSS for pid {pid}")
