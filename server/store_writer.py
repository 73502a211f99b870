"""The SQLite store's writer in a process of its own (``store.writer = "process"``).

Why a process: the writer's Python work (building rows, its caches) and the
event loop share one GIL when the writer is a thread.  Under load each
handover of the GIL waits for the other thread's switch interval, or for
the OS to schedule a thread preempted while holding it; a payment result's
group commit then waits tens of milliseconds behind a promotion flood the
loop is fanning out.  In its own process the writer runs the same
:class:`~tillwire.server.store_sqlite_writer.Writer` (same transactions, same
group commit, same caches) on its own interpreter, in parallel with the loop.

Wire between the two (a ``socketpair``; each message is a 4-byte big-endian
length and a pickle; both ends are this module, so pickle is a private
format here, never read from anywhere else):

* parent -> child: a list of requests ``(name, args, request_id, weight)``;
  ``name`` is a ``Writer`` method, ``None`` stops the writer,
  ``"configure_streams"`` is applied at once (not queued); ``request_id`` 0
  means nobody waits for the result (stream appends).  Requests are written
  as they come, except stream appends, which gather until the end of the
  loop iteration (a flood brings thousands a second).
* child -> parent: ``(results, counters)`` per committed batch: ``results``
  a list of ``(request_id, result, exception)``, ``counters`` the writer's
  stats counters after that commit.  Request 0 of the child's life is the
  open: its result is the store's info (the epoch).

Lifetime: the parent starts the child when the store opens and stops it with
a stop request (the child commits what is queued, checkpoints and exits).
If the parent dies, the child is killed with it (``PR_SET_PDEATHSIG``) and,
should that not apply, ends at the end of its socket: a server killed with
SIGKILL leaves no writer behind to hold the database.  If the child dies,
every waiting request fails and so does every later one (the node answers
STORE_UNAVAILABLE), and the store tells the node (``on_write_failure``),
which drains and exits with status 1 for its supervisor to restart it: the
node's view of the inboxes would not survive a writer restarted in place.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
from typing import Callable

import orjson

from . import logs
from .store import Accepted
from .store_sqlite_requests import STOP, settle
from .store_sqlite_writer import COMMIT_BUCKETS, Writer, message_rows

_HEADER = 4
STOP_TIMEOUT = 30.0       # a stop commits what is queued; past this the child is killed


class WriterGone(RuntimeError):
    """The writer process is not running (it exited or could not start)."""


def _frame(obj) -> bytes:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return len(data).to_bytes(_HEADER, "big") + data


def _results_frame(results: list, counters: dict) -> bytes:
    try:
        return _frame((results, counters))
    except Exception:
        # An exception (or result) that does not pickle: send its text instead.
        safe = []
        for rid, result, exc in results:
            try:
                pickle.dumps((result, exc), protocol=pickle.HIGHEST_PROTOCOL)
                safe.append((rid, result, exc))
            except Exception as err:
                what = exc if exc is not None else err
                safe.append((rid, None, RuntimeError(f"{type(what).__name__}: {what}")))
        return _frame((safe, counters))


class _Frames:
    """Splits a byte stream into the payloads of length-prefixed messages."""

    __slots__ = ("buf",)

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        buf = self.buf
        buf += data
        out = []
        pos = 0
        end = len(buf)
        while end - pos >= _HEADER:
            n = int.from_bytes(buf[pos:pos + _HEADER], "big")
            if end - pos - _HEADER < n:
                break
            out.append(bytes(buf[pos + _HEADER:pos + _HEADER + n]))
            pos += _HEADER + n
        if pos:
            del buf[:pos]
        return out


# --------------------------------------------------------------------------
# The parent's side


class _Link(asyncio.Protocol):
    def __init__(self, owner: "WriterProcess") -> None:
        self.owner = owner
        self.frames = _Frames()

    def data_received(self, data: bytes) -> None:
        for payload in self.frames.feed(data):
            self.owner._on_results(*pickle.loads(payload))

    def connection_lost(self, exc) -> None:
        self.owner._on_gone(exc)


class WriterProcess:
    """The event loop's handle on a writer process (the interface of ``Writer``
    that the store facade uses: submit, configure_streams, counters)."""

    def __init__(self, path: str, synchronous: str, group_commit_ms: float,
                 dedup_window: float, stage_rows: int) -> None:
        self.path = path
        self.synchronous = synchronous
        self.history_max = 1000
        self.history_age = 3600.0
        self._params = {"path": path, "synchronous": synchronous,
                        "group_commit_ms": group_commit_ms, "dedup_window": dedup_window,
                        "stage_rows": stage_rows}
        self._counters = {"writer": "process", "epoch": 0, "synchronous": synchronous, "commits": 0,
                          "write_requests": 0, "accepted": 0, "failed_commits": 0,
                          "checkpoints": 0, "commit_seconds": 0.0, "writer_gc_frozen_objects": 0,
                          "commit_counts": [0] * (len(COMMIT_BUCKETS) + 1)}
        self._pending: dict[int, object] = {}     # request id -> future or Completion
        self._accepts: set[int] = set()           # ids of accept_many requests (packed results)
        self._next_id = 1
        self._out: list[tuple] = []               # requests not written yet
        self._flush_handle = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._transport = None
        self._proc: subprocess.Popen | None = None
        self._gone: BaseException | None = None
        self._stopping = False                    # a stop was asked: its end is expected
        self.on_gone: Callable[[str], None] | None = None   # called on an unexpected end

    async def start(self, loop: asyncio.AbstractEventLoop) -> dict:
        """Start the child and wait until it has opened (and migrated) the database."""
        self._loop = loop
        ours, theirs = socket.socketpair()
        fmt, level = logs.current()
        params = {**self._params, "history_max": self.history_max,
                  "history_age": self.history_age, "parent": os.getpid(),
                  "log_format": fmt, "log_level": level}
        try:
            try:
                self._proc = subprocess.Popen(
                    [sys.executable, "-c", "from tillwire.server.store_writer import main; main()",
                     str(theirs.fileno()), orjson.dumps(params).decode()],
                    pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, close_fds=True)
            finally:
                theirs.close()
            ready = loop.create_future()
            self._pending[0] = ready
            self._transport, _ = await loop.connect_accepted_socket(lambda: _Link(self), ours)
            early, self._out = self._out, []
            for name, args, fut, weight in early:     # requests made before the start
                self.submit(name, args, fut, weight)
            return await ready
        except BaseException:
            # Failed or cancelled: leave no child and no socket behind.
            self._stopping = True
            self.kill()
            if self._transport is not None:
                self._transport.close()
            else:
                ours.close()
            if self._proc is not None:
                await self.wait_exit()
            raise

    def submit(self, name: str | None, args: tuple, fut, weight: int) -> None:
        if self._gone is not None:
            if fut is not None:
                fut.set_exception(WriterGone(f"store writer process: {self._gone}"))
            return
        if self._transport is None:          # not started yet: sent once it is
            self._out.append((name, args, fut, weight))
            return
        if name is None:
            self._stopping = True
        rid = 0
        if fut is not None:
            rid = self._next_id
            self._next_id += 1
            self._pending[rid] = fut
        if name == "accept_many":
            name = "accept_rows"
            args = (message_rows(args[0]),)
            if rid:
                self._accepts.add(rid)
        self._out.append((name, args, rid, weight))
        if name == "stream_append":
            if self._flush_handle is None:
                self._flush_handle = self._loop.call_soon(self._flush)
        else:
            self._flush()

    def configure_streams(self, history_max: int, history_age: float) -> None:
        self.history_max = max(0, int(history_max))
        self.history_age = float(history_age)
        if self._transport is not None:
            self._out.append(("configure_streams", (self.history_max, self.history_age), 0, 0))
            self._flush()

    def counters(self) -> dict:
        return self._counters

    def backlog(self) -> int:
        """Write requests sent to the child (or about to be) and not answered yet."""
        return len(self._pending) + len(self._out)

    @property
    def gone(self) -> BaseException | None:
        """Why the writer process ended (None while it runs)."""
        return self._gone

    def _flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        out, self._out = self._out, []
        if out and self._transport is not None and not self._transport.is_closing():
            self._transport.write(_frame(out))

    def _on_results(self, results: list, counters: dict) -> None:
        self._counters = counters
        pending = self._pending
        accepts = self._accepts
        done = []
        for rid, result, exc in results:
            if rid in accepts:
                accepts.discard(rid)
                if result is not None:
                    result = [Accepted(*a) for a in result]
            done.append((pending.pop(rid, None), result, exc))
        settle(done)

    def _on_gone(self, exc) -> None:
        code = self._proc.poll() if self._proc is not None else None
        self._gone = exc or WriterGone(
            "the writer process ended" + (f" (exit status {code})" if code is not None else ""))
        self._transport = None
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(WriterGone(f"store writer process: {self._gone}"))
        if not self._stopping and self.on_gone is not None:
            self.on_gone(str(self._gone))

    def kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()

    async def wait_exit(self) -> None:
        """Wait for the child to end (after a stop); kill it past the timeout."""
        proc = self._proc
        if proc is None:
            return
        deadline = self._loop.time() + STOP_TIMEOUT
        while proc.poll() is None and self._loop.time() < deadline:
            await asyncio.sleep(0.01)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if self._transport is not None:
            self._transport.close()


# --------------------------------------------------------------------------
# The child's side


def _die_with_parent(parent: int) -> None:
    """Ask the kernel to SIGKILL us when the parent dies (Linux; best effort)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)          # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:                 # it died before the prctl
        os._exit(1)


def main() -> None:
    """Entry point of the writer process: ``main() FD PARAMS-JSON``."""
    fd, params = int(sys.argv[1]), orjson.loads(sys.argv[2])
    _die_with_parent(params["parent"])
    # Its own log records (rare: a failed write, a failed checkpoint) go to the
    # stderr it shares with the server, in the server's format and level.
    logs.configure(params["log_format"], params["log_level"], process="store-writer")
    # The parent decides when we stop (a Ctrl-C or a service manager's SIGTERM
    # to the whole group must not cut its writes off while it drains).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sock = socket.socket(fileno=fd)
    writer = Writer(params["path"], params["synchronous"], params["group_commit_ms"],
                     params["dedup_window"], params["stage_rows"])
    writer.configure_streams(params["history_max"], params["history_age"])
    writer.mode = "process"
    send_lock = threading.Lock()

    def post(done: list) -> None:
        # (future, result, exception) -> (request id, ...); None: nobody waits.
        results = [(0 if fut is _READY else fut, result, exc)
                   for fut, result, exc in done if fut is not None]
        if not results:
            return
        data = _results_frame(results, writer.counters())
        with send_lock:
            try:
                sock.sendall(data)
            except OSError:
                pass                # the parent is gone; the reader thread stops us

    def requests() -> None:
        frames = _Frames()
        submit = writer.queue.put
        while True:
            try:
                data = sock.recv(1 << 20)
            except OSError:
                data = b""
            if not data:
                submit((STOP, (), None, 0))
                return
            for payload in frames.feed(data):
                for name, args, rid, weight in pickle.loads(payload):
                    if name == "configure_streams":
                        writer.configure_streams(*args)
                        continue
                    op = STOP if name is None else getattr(writer, name)
                    submit((op, args, rid or None, weight))

    writer.post = post
    threading.Thread(target=requests, name="tillwire-store-requests", daemon=True).start()
    writer.run(_READY)         # the open's result goes to request 0 (the parent's ready)
    sock.close()


_READY = object()
