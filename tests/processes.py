"""Servers the tests start for real (Prefect, MLflow): free ports on 127.0.0.1 and clean stops."""

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def stop_group(process: subprocess.Popen) -> None:
    """SIGTERM the process group we started (make + server, or a worker and its flow runs); SIGKILL if it lingers."""
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)


def wait_until_healthy(url: str, healthy, process: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    """Poll `url` until `healthy(response)`; fail with the server's log if it exits or never answers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if healthy(httpx.get(url, timeout=2)):
                return
        except (httpx.HTTPError, ValueError):  # not listening yet, or an answer that is not JSON yet
            pass
        assert process.poll() is None, log.read_text()[-3000:]
        time.sleep(1)
    raise AssertionError(f"{url} did not answer healthy in {timeout:.0f} s:\n" + log.read_text()[-3000:])
