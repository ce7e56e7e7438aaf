"""Run ``mmfl serve`` as a child process on 127.0.0.1 and wait until it answers.

Used by the service tests and the serving/load benchmarks, which must talk to a real server
over real HTTP rather than an in-process client.
"""
from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path


class ServerStartError(RuntimeError):
    """The server exited or never answered ``/healthz``; the message ends with its log."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(index: Path, log: Path, *extra: str, timeout: float = 180.0) -> tuple[subprocess.Popen, str]:
    """Start ``mmfl serve INDEX`` on a free port; return the process and its base URL once healthy."""
    import httpx

    port = free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mmfl.cli", "serve", str(index), "--host", "127.0.0.1", "--port", str(port), *extra],
            stdout=out, stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerStartError(f"mmfl serve exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                return proc, base
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise ServerStartError(f"mmfl serve did not answer /healthz within {timeout:.0f} s:\n{log.read_text()[-2000:]}")


def stop_server(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """SIGTERM, then SIGKILL if the server has not exited within ``timeout`` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
