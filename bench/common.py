"""Shared machinery of the load benchmarks: a server subprocess, worker
subprocesses, RSS readings and percentiles.

The server always runs in its own process (``python -m tillwire serve``);
load comes from worker processes (``python -m bench.worker ...``) that talk
to the orchestrator through JSON lines on stdin/stdout.  Everything is
bounded in count and time and stops by itself.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import select
import shutil
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


def descendants(pid: int) -> list[int]:
    """The pids of process ``pid``'s children, their children, and so on."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                found = [int(c) for c in f.read().split()]
        except (OSError, ValueError):
            continue
        out.extend(found)
        todo.extend(found)
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` and its descendants now
    alive (a node's workers, a store writer); 0.0 for a process gone."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for p in (pid, *descendants(pid)):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick     # utime, stime
        except (OSError, ValueError, IndexError):
            continue
    return total


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
        if not os.environ.get("TILLWIRE_BENCH_KEEP"):
            # (gone when this process ends; stop() and start() again keep the data)
            atexit.register(shutil.rmtree, self.dir, True)
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
        return self.log_text()[-2000:]

    def log_text(self) -> str:
        with open(os.path.join(self.dir, "server.log"), "rb") as f:
            return f.read().decode("utf-8", "replace")

    def wait_workers(self, count: int, timeout: float = 30.0) -> None:
        """Wait until each of a ``--workers`` node's ``count`` workers logged
        that it listens (the port answering means one of them does)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            log = self.log_text()
            if all(re.search(rf"listening .*worker={w}\b", log) for w in range(count)):
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.tail()}")
            time.sleep(0.05)
        raise TimeoutError(f"workers of the node not listening: {self.tail()}")

    def worker_pids(self) -> dict[int, int]:
        """Worker index -> pid of its newest process, from the supervisor's
        ``worker N started pid=P`` lines (log level info)."""
        return {int(i): int(p) for i, p in
                re.findall(r"worker (\d+) started pid=(\d+)", self.log_text())}

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
                family = descendants(self.proc.pid)     # (a node's workers, a store writer)
                self.proc.kill()
                self.proc.wait(5)
                for pid in family:                      # (orphans now: ours to end)
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
        if getattr(self, "log", None):
            self.log.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class RedisServer:
    """Debian's ``redis-server`` in a subprocess on a free loopback port, in
    a temporary directory of its own, with its AOF on (``appendfsync``
    always, everysec or no) and no RDB snapshots."""

    def __init__(self, appendfsync: str = "always") -> None:
        self.port = free_port()
        self.appendfsync = appendfsync
        self.dir = tempfile.mkdtemp(prefix="tillwire-bench-redis-")
        self.proc = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def start(self, timeout: float = 20.0) -> "RedisServer":
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (make redis-deps)")
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes", "--appendfsync", self.appendfsync, "--dir", self.dir,
             "--protected-mode", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited ({self.proc.returncode})")
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", self.port), 0.2):
                return self
            time.sleep(0.05)
        self.stop()
        raise TimeoutError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)

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


class Lines:
    """Lines read from a pipe's descriptor, each within a timeout.

    ``select`` on a buffered file's descriptor says nothing of the lines its
    buffer already holds: a ``readline`` that read two lines returns one and
    the next ``select`` waits for data that never comes (a worker's last
    progress report and its result in one read stalled the reliability
    runs that way).  So the bytes are read here, by ``os.read``, and split
    here."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = b""

    def read(self, timeout: float) -> bytes | None:
        """The next line (with its newline); None at the end of the pipe;
        TimeoutError when no whole line came within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no line within {timeout} s")
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                data = os.read(self.fd, 1 << 16)
                if not data:
                    return None
                self.buf += data
        line, _, self.buf = self.buf.partition(b"\n")
        return line + b"\n"


class Worker:
    """A ``python -m bench.worker`` subprocess spoken to in JSON lines."""

    _lines: Lines | None = None     # its stdout's lines (made at the first recv:
                                    # subclasses start processes of their own)

    def __init__(self, role: str, **params) -> None:
        cmd = [sys.executable, "-m", "bench.worker", role, orjson.dumps(params).decode()]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env={**os.environ, "TILLWIRE_SECRET": SECRET})
        self.role = role

    def send(self, **msg) -> None:
        self.proc.stdin.write(orjson.dumps(msg) + b"\n")
        self.proc.stdin.flush()

    def recv(self, timeout: float = 60.0) -> dict:
        if self._lines is None:
            self._lines = Lines(self.proc.stdout.fileno())
        try:
            line = self._lines.read(timeout)
        except TimeoutError:
            raise TimeoutError(f"worker {self.role} did not answer in {timeout} s") from None
        if line is None:
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
