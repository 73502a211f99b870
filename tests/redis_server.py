"""A real ``redis-server`` for the tests: one per test session, on loopback.

:func:`redis_url` starts it on first use (a free port, a temporary
directory, no persistence) and stops it when the session ends.  A machine
without ``redis-server`` fails the tests that need it with a line saying
how to install it (``make test`` installs Debian's package itself): Redis
backends are never skipped.
"""

from __future__ import annotations

import atexit
import itertools
import shutil
import subprocess
import tempfile

import pytest

from support import free_port, wait_port

_server: dict = {}
_prefixes = itertools.count(1)


def redis_url() -> str:
    """The URL of this session's redis-server (started on first use)."""
    if "url" not in _server:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed: run `make redis-deps` "
                        "(Debian's redis-server) or `make test`")
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
