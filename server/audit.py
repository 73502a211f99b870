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
=====================  =====================================================

What is never written: message bodies and tokens (terminal or admin).  The
callers pass only identities, addresses, kinds, ids and reasons, and
:meth:`AuditLog.write` drops any detail key that names a secret.

The file is rotated by size: when a line would take it past ``max_bytes``
it becomes ``<path>.1`` (``.1`` becomes ``.2`` ... up to ``backups``; the
oldest is removed).  Writes are synchronous and unbuffered past the line
(one ``write`` per event, on the event loop): audit events are rare next to
message traffic, and a line must not be lost when the process is killed.
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
    "kick", "drain", "revoke", "retire",
})

# Detail keys that could carry a secret or a message payload: never written.
_FORBIDDEN_KEYS = frozenset({"token", "authorization", "body", "payload", "secret", "password"})


class AuditLog:
    """Append-only JSON lines with size-based rotation."""

    def __init__(self, path: str, max_bytes: int = 10 * 2**20, backups: int = 5) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self._lock = threading.Lock()   # the log is written from the loop; the lock is for tools
        self._file = None
        self._size = 0
        self.lines = 0                  # lines written by this process
        self.failures = 0               # lines that could not be written (disk errors)

    def open(self) -> "AuditLog":
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        self._file = open(self.path, "ab", buffering=0)
        self._size = self._file.tell()
        return self

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

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
        with self._lock:
            try:
                if self._file is None:
                    self.open()
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
        self.open()
        log.debug("audit log rotated path=%s backups=%d", self.path, self.backups)


def open_audit_log(cfg) -> AuditLog:
    """The audit log the config names (``log.audit_path`` or <data_dir>/audit.log)."""
    from .config import audit_log_path

    return AuditLog(audit_log_path(cfg), cfg.log.audit_max_bytes, cfg.log.audit_backups).open()
