"""TLS on the terminal listener: the server's context, and failed handshakes logged.

A handshake that fails (a plaintext client on the TLS port, a terminal
without the required certificate, a protocol mismatch) never reaches the
node: asyncio and uvloop call the protocol's ``connection_made`` only after
the handshake, and they report a failure only in debug mode.  The context's
``sslobject_class`` is the public hook both loops use to make the TLS
object, so :class:`_LoggedObject` sees every handshake's outcome.

Logging is bounded so a flood cannot fill the log: the first failure of a
window is one warning line at once; the rest of the window are counted by
reason and written as one line when the window closes.
"""

from __future__ import annotations

import logging
import ssl
import time

from .config import Config

__all__ = ["HandshakeLog", "WINDOW", "make_ssl_context"]

log = logging.getLogger("tillwire.server")

WINDOW = 10.0
"""Seconds of handshake failures summed into one log line after the first."""

_HINTS = {
    "WRONG_VERSION_NUMBER": " (not TLS: a plaintext client on the TLS port?)",
    "PACKET_LENGTH_TOO_LONG": " (not TLS: a plaintext client on the TLS port?)",
    "HTTP_REQUEST": " (an HTTP request on the TLS port)",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": " (tls.require_client_cert: the terminal sent no certificate)",
    "CERTIFICATE_VERIFY_FAILED": " (the terminal's certificate is not signed by tls.client_ca)",
}


class HandshakeLog:
    """Counts failed TLS handshakes and writes them to the log, bounded:
    one line for the first failure of each ``WINDOW`` seconds, one line with
    the counts by reason for the rest of it."""

    def __init__(self, loop=None, window: float = WINDOW) -> None:
        self.loop = loop                     # runs the summary at the window's end (optional)
        self.window = window
        self.total = 0                       # every failure since start
        self._window_end = float("-inf")
        self._pending: dict[str, int] = {}   # failures of this window not logged yet
        self._handle = None

    def _now(self) -> float:
        return self.loop.time() if self.loop is not None else time.monotonic()

    def failed(self, reason: str) -> None:
        """One handshake failed with the OpenSSL ``reason`` (e.g. WRONG_VERSION_NUMBER).
        Called on the event loop (the TLS objects live there)."""
        self.total += 1
        now = self._now()
        if now >= self._window_end:
            self.flush()
            self._window_end = now + self.window
            log.warning("tls: handshake failed reason=%s%s", reason, _HINTS.get(reason, ""))
            return
        self._pending[reason] = self._pending.get(reason, 0) + 1
        if self._handle is None and self.loop is not None:
            self._handle = self.loop.call_at(self._window_end, self.flush)

    def flush(self) -> None:
        """Write what the window summed (nothing if nothing failed since)."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if not self._pending:
            return
        count = sum(self._pending.values())
        reasons = ",".join(f"{reason}:{n}" for reason, n in sorted(self._pending.items()))
        log.warning("tls: %d more handshakes failed within %g s reasons=%s", count,
                    self.window, reasons)
        self._pending.clear()


def _logged_object_class(failures: HandshakeLog) -> type:
    class _LoggedObject(ssl.SSLObject):
        """The server side's TLS object: a failed handshake is counted and logged."""

        def do_handshake(self) -> None:
            try:
                super().do_handshake()
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                raise                        # not a failure: the handshake needs more bytes
            except ssl.SSLError as exc:
                failures.failed(exc.reason or type(exc).__name__)
                raise

    return _LoggedObject


def make_ssl_context(cfg: Config, failures: HandshakeLog | None = None) -> ssl.SSLContext | None:
    """The terminal listener's TLS context from ``[tls]`` (None while TLS is off).

    ``client_ca`` turns on client certificate verification: optional
    (a terminal without a certificate still connects; one with a bad
    certificate is refused) unless ``require_client_cert`` makes it required.
    ``failures`` counts and logs the handshakes that fail.  Raises OSError or
    ssl.SSLError when a file cannot be read or is not what it should be.
    """
    tls = cfg.tls
    if not tls.cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(tls.cert, tls.key)
    if tls.client_ca:
        ctx.load_verify_locations(cafile=tls.client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    else:
        ctx.verify_mode = ssl.CERT_NONE
    if failures is not None:
        ctx.sslobject_class = _logged_object_class(failures)
    return ctx
