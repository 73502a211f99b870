"""Shared machinery of the load benchmarks: a server subprocess, worker
subprocesses, RSS readings and percentiles.

The server always runs in its own process (``python -m tillwire serve``);
load comes from worker processes (``python -m bench.worker ...``) that talk
to the orchestrator through JSON lines on stdin/stdout.  Everything is
bounded in count and time and stops by itself.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time

import orjson

SECRET = "bench-secret-not-for-production"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def percentile(values, p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))
    return s[k]


class Server:
    """``tillwire serve`` in a subprocess with its own data dir."""

    def __init__(self, env: dict | None = None, args=()) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="tillwire-bench-")
        self.env = {**os.environ, "TILLWIRE_SECRET": SECRET, **(env or {})}
        self.args = list(args)
        self.proc = None

    def start(self, timeout: float = 20.0) -> "Server":
        cmd = [sys.executable, "-m", "tillwire", "serve", "--host", "127.0.0.1",
               "--port", str(self.port), "--data-dir", self.dir, "--admin-port", "0",
               *self.args]
        self.log = open(os.path.join(self.dir, "server.log"), "ab")
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.tail()}")
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", self.port), 0.2):
                return self
            time.sleep(0.05)
        raise TimeoutError("server did not start")

    def tail(self) -> str:
        with open(os.path.join(self.dir, "server.log"), "rb") as f:
            return f.read()[-2000:].decode("utf-8", "replace")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if getattr(self, "log", None):
            self.log.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class BareServer:
    """``python -m bench.bare``: a bare uvloop baseline (``mode`` fanout or
    relay), in a subprocess."""

    def __init__(self, mode: str = "fanout") -> None:
        self.port = free_port()
        self.mode = mode
        self.proc = None

    def start(self, timeout: float = 20.0) -> "BareServer":
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.bare", str(self.port),
                                      self.mode],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready or self.proc.stdout.readline().strip() != b"ready":
            self.stop()
            raise RuntimeError("the bare baseline server did not start")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()       # it stops when its stdin closes
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


class Worker:
    """A ``python -m bench.worker`` subprocess spoken to in JSON lines."""

    def __init__(self, role: str, **params) -> None:
        cmd = [sys.executable, "-m", "bench.worker", role, orjson.dumps(params).decode()]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env={**os.environ, "TILLWIRE_SECRET": SECRET})
        self.role = role

    def send(self, **msg) -> None:
        self.proc.stdin.write(orjson.dumps(msg) + b"\n")
        self.proc.stdin.flush()

    def recv(self, timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"worker {self.role} did not answer in {timeout} s")
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if ready:
                line = self.proc.stdout.readline()
                if not line:
                    raise RuntimeError(f"worker {self.role} exited ({self.proc.wait()})")
                return orjson.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(BrokenPipeError, OSError):
                self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
