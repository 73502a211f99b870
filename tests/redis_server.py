"""A real ``redis-server`` for the tests: one per test session, on loopback.

:func:`redis_url` starts it on first use (a free port, a temporary
directory, no persistence) and stops it when the session ends.  A machine
without ``redis-server`` fails the tests that need it with a line saying
how to install it (``make test`` installs Debian's package itself): Redis
backends are never skipped.

:class:`PrivateRedis` is a server of one test's own, for what the shared one
must not see: FLUSHALL, a kill and a restart (on the same port and
directory, so an AOF brings the data back), a configuration of its own.
"""

from __future__ import annotations

import atexit
import itertools
import shutil
import signal
import subprocess
import tempfile

import pytest

from support import free_port, wait_port

_server: dict = {}
_prefixes = itertools.count(1)


def _binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed: run `make redis-deps` "
                    "(Debian's redis-server) or `make test`")
    return binary


def redis_url() -> str:
    """The URL of this session's redis-server (started on first use)."""
    if "url" not in _server:
        binary = _binary()
        port = free_port()
        workdir = tempfile.mkdtemp(prefix="tillwire-redis-")
        proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", workdir, "--protected-mode", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port("127.0.0.1", port, proc=proc)
        atexit.register(_stop, proc, workdir)
        _server["url"] = f"redis://127.0.0.1:{port}/0"
    return _server["url"]


def fresh_prefix() -> str:
    """A key prefix no other test of the session uses (backends share the server)."""
    return f"t{next(_prefixes)}"


def _stop(proc, workdir: str) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
    shutil.rmtree(workdir, ignore_errors=True)


class PrivateRedis:
    """A ``redis-server`` of one test's own: ``with PrivateRedis(*args) as r``
    starts it with the extra command-line ``args`` (e.g. ``"--appendonly",
    "yes"``); :meth:`kill` (SIGKILL, as a crash) and :meth:`start` again keep
    its port and directory; :meth:`pause` and :meth:`resume` hang it and let
    it go on; leaving the ``with`` stops it and deletes both."""

    def __init__(self, *args: str) -> None:
        self.args = list(args)
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.workdir = tempfile.mkdtemp(prefix="tillwire-redis-private-")
        self.proc: subprocess.Popen | None = None

    def start(self) -> "PrivateRedis":
        self.proc = subprocess.Popen(
            [_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--dir", self.workdir, "--protected-mode", "no", *self.args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port("127.0.0.1", self.port, proc=self.proc)
        return self

    def pause(self) -> None:
        """SIGSTOP: Redis hangs (connections stay open, nothing answers)."""
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def __enter__(self) -> "PrivateRedis":
        return self.start()

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            _stop(self.proc, self.workdir)
        shutil.rmtree(self.workdir, ignore_errors=True)
