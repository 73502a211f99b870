"""The audit log: who did what, when, from where, as append-only JSON lines.

One line per event (orjson), with the fields ``ts`` (unix seconds), ``event``,
``who`` (a terminal address, ``admin:<token name>``, ``node`` or ``""`` when
unknown), ``tenant``, ``terminal``, ``from`` (the peer IP address) and
``detail`` (an object, or null).  Events:

=====================  =====================================================
``auth.ok``            a terminal logged in (roles, store, TLS cert CN)
``auth.fail``          a login was refused (code, reason)
``takeover``           a terminal's older session was replaced
``acl.deny``           a SEND or SUBSCRIBE was FORBIDDEN by the roles
``admin.call``         an admin API call (method, path, target, status)
``admin.unauthorized`` an admin API call without a valid bearer token
``kick``               an operator closed a terminal's session
``drain``              a graceful drain started (SIGTERM or the admin API)
``revoke``             a terminal's tokens were revoked
``retire``             a terminal was retired
``redrive``            dead letters were put back in a terminal's inbox
                       (message ids, lanes, old and new seqs)
=====================  =====================================================

What is never written: message bodies and tokens (terminal or admin).  The
callers pass only identities, addresses, kinds, ids and reasons, and
:meth:`AuditLog.write` drops any detail key that names a secret.

The file is rotated by size: when a line would take it past ``max_bytes``
it becomes ``<path>.1`` (``.1`` becomes ``.2`` ... up to ``backups``; the
oldest is removed).

Lines are written off the event loop: ``write`` formats the line and adds
it to a byte buffer, and a writer thread takes the buffer at least every
``WRITE_INTERVAL`` seconds (at once past ``WRITE_CHUNK`` bytes) and writes
it, line by line as the rotation needs, so a slow disk never stalls
terminals.  A kill -9 can take back the lines of the last interval; a
graceful stop writes them (:meth:`AuditLog.close`), and
:meth:`AuditLog.flush` writes what was added so far before it returns.
(One buffer, not one object per line in a queue: under a burst of logins
the lines waiting would interleave with the connections' long-lived
objects in the allocator's pools and keep memory after they went.)

Floods are summarised, not written line by line: repeated failures from one
source address (``auth.fail``, ``admin.unauthorized``) are written once per
``AGGREGATE_WINDOW`` seconds, and when the window ends one line with
``detail.aggregated`` (how many more), ``detail.seconds`` and the reasons'
counts says what else came (``"412 auth failures from 127.0.0.9 in the
last 10 s"``).  A flood of bad logins therefore writes about two lines per
source per window and cannot rotate the trail away.
"""

from __future__ import annotations

import logging
import os
import threading
import time

import orjson

log = logging.getLogger("tillwire.audit")

EVENTS = frozenset({
    "auth.ok", "auth.fail", "takeover", "acl.deny", "admin.call", "admin.unauthorized",
    "kick", "drain", "revoke", "retire", "redrive",
})

# Detail keys that could carry a secret or a message payload: never written.
_FORBIDDEN_KEYS = frozenset({"token", "authorization", "body", "payload", "secret", "password"})

AGGREGATE_WINDOW = 10.0        # seconds a source's repeated failures are summed over
MAX_AGGREGATES = 65536         # sources summed at once (beyond: summed as one "*")
WRITE_INTERVAL = 0.05         # seconds at most a line waits for the writer thread
WRITE_CHUNK = 65536            # bytes waiting that wake the writer at once
MAX_WAITING = 64 * 2**20       # bytes waiting at most (beyond: lines dropped, counted)


class AuditLog:
    """Append-only JSON lines with size-based rotation, written by a thread."""

    def __init__(self, path: str, max_bytes: int = 10 * 2**20, backups: int = 5) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self._file = None
        self._size = 0
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()       # the file: writes, rotation, open and close
        self._buf = bytearray()             # lines added and not written yet
        self._buf_lock = threading.Lock()   # the buffer (held for an append or a swap)
        self._wake = threading.Event()
        self._stopping = False
        # (event, source) -> [first ts, extra count, {reason: count}, who, tenant, terminal]
        self._aggregates: dict[tuple[str, str], list] = {}
        self.lines = 0                  # lines written by this process
        self.failures = 0               # lines that could not be written (disk errors)
        self.dropped = 0                # lines dropped because the writer fell behind
        self.aggregated = 0             # lines summed into summaries instead of written

    def open(self) -> "AuditLog":
        with self._lock:
            self._open_file()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="tillwire-audit",
                                                 daemon=True)
                self._thread.start()
        return self

    def _open_file(self) -> None:
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        self._file = open(self.path, "ab", buffering=0)
        self._size = self._file.tell()

    def close(self) -> None:
        """Write the summaries still open and every line added, then close."""
        self.flush_aggregates(force=True)
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stopping = True
            self._wake.set()
            thread.join()
        self.flush()
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def flush(self) -> None:
        """Write every line added so far before returning (tests, tools, close)."""
        with self._lock:
            self._write_waiting()

    def write(self, event: str, who: str, *, tenant: str = "", terminal: str = "",
              peer: str = "", detail: dict | None = None) -> None:
        """Append one event.  Never raises: a failing disk is logged and counted."""
        if event not in EVENTS:
            raise ValueError(f"audit: unknown event {event!r}")
        if detail:
            detail = {k: v for k, v in detail.items() if k.lower() not in _FORBIDDEN_KEYS}
        line = orjson.dumps({
            "ts": round(time.time(), 6), "event": event, "who": who, "tenant": tenant,
            "terminal": terminal, "from": peer, "detail": detail or None,
        }, option=orjson.OPT_APPEND_NEWLINE)
        if self._thread is None:
            with self._lock:
                self._write_line(line)      # (not opened: write in place, e.g. a tool)
            return
        with self._buf_lock:
            waiting = len(self._buf)
            if waiting < MAX_WAITING:
                self._buf += line
        if waiting >= MAX_WAITING:
            self.dropped += 1
            if self.dropped == 1 or not self.dropped % 10000:
                log.error("audit log writer behind: %d lines dropped path=%s", self.dropped,
                          self.path)
        elif waiting + len(line) >= WRITE_CHUNK:
            self._wake.set()

    def write_repeated(self, event: str, source: str, reason: str, who: str = "", *,
                       tenant: str = "", terminal: str = "", detail: dict | None = None) -> bool:
        """Write a failure that may repeat from ``source`` (an IP address):
        the first of a window is written as is, the rest are counted into
        the window's summary.  Returns True when this one was written."""
        key = (event, source)
        agg = self._aggregates.get(key)
        now = time.time()
        if agg is not None and now - agg[0] > AGGREGATE_WINDOW:
            self._summarise(key, agg)
            agg = None
        if agg is None:
            if len(self._aggregates) >= MAX_AGGREGATES:
                self.flush_aggregates()
                if len(self._aggregates) >= MAX_AGGREGATES:
                    key = (event, "*")          # every other source, summed as one
                    agg = self._aggregates.get(key)
            if agg is None:
                self._aggregates[key] = [now, 0, {}, who, tenant, terminal]
                self.write(event, who, tenant=tenant, terminal=terminal, peer=source,
                           detail=detail)
                return True
        agg[1] += 1
        agg[2][reason] = agg[2].get(reason, 0) + 1
        self.aggregated += 1
        return False

    def flush_aggregates(self, force: bool = False) -> int:
        """Write the summaries of the windows that ended (all with ``force``);
        returns how many lines were written.  The node calls it every few
        seconds, so a summary is never more than a window late."""
        now = time.time()
        written = 0
        for key, agg in list(self._aggregates.items()):
            if force or now - agg[0] > AGGREGATE_WINDOW:
                written += self._summarise(key, agg)
        return written

    def _summarise(self, key: tuple[str, str], agg: list) -> int:
        self._aggregates.pop(key, None)
        event, source = key
        first, count, reasons, who, tenant, terminal = agg
        if not count:
            return 0
        seconds = round(time.time() - first, 3)
        self.write(event, who, tenant=tenant, terminal=terminal, peer=source,
                   detail={"aggregated": count, "seconds": seconds, "reasons": reasons})
        log.warning("%d more %s from %s in the last %.0f s (summarised in the audit log)",
                    count, event, source or "unknown", seconds)
        return 1

    # -- the writer thread ------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping:
            self._wake.wait(WRITE_INTERVAL)
            self._wake.clear()
            with self._lock:
                self._write_waiting()

    def _write_waiting(self) -> None:
        """Take the buffer and write its lines (the caller holds the file lock)."""
        with self._buf_lock:
            if not self._buf:
                return
            data, self._buf = bytes(self._buf), bytearray()
        start = 0
        while start < len(data):
            end = data.index(b"\n", start) + 1
            self._write_line(data[start:end])
            start = end

    def _write_line(self, line: bytes) -> None:
        try:
            if self._file is None:
                self._open_file()
            if self._size and self._size + len(line) > self.max_bytes:
                self._rotate()
            self._file.write(line)
            self._size += len(line)
            self.lines += 1
        except OSError as exc:
            self.failures += 1
            log.error("audit log write failed path=%s error=%s", self.path, exc)

    def _rotate(self) -> None:
        self._file.close()
        self._file = None
        if self.backups <= 0:
            os.remove(self.path)
        else:
            for i in range(self.backups - 1, 0, -1):
                older = f"{self.path}.{i}"
                if os.path.exists(older):
                    os.replace(older, f"{self.path}.{i + 1}")
            os.replace(self.path, f"{self.path}.1")
        self._open_file()
        log.debug("audit log rotated path=%s backups=%d", self.path, self.backups)


def open_audit_log(cfg) -> AuditLog:
    """The audit log the config names (``log.audit_path`` or <data_dir>/audit.log)."""
    from .config import audit_log_path

    return AuditLog(audit_log_path(cfg), cfg.log.audit_max_bytes, cfg.log.audit_backups).open()
