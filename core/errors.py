"""Every exception Tillwire raises lives here."""

from __future__ import annotations

from .codes import Code


class TillwireError(Exception):
    """Base class of Tillwire's exceptions."""


class ProtocolError(TillwireError):
    """A peer broke PROTOCOL.md; ``code`` is the protocol error code.

    ``frames`` holds the well-formed frames a decoder produced from the same
    ``feed`` call before it met the bad bytes, so the caller can still act on
    them (an ACK in front of garbage is a real ACK).
    """

    def __init__(self, code: int, message: str, frames: list | None = None) -> None:
        super().__init__(message)
        self.code = Code(code)
        self.message = message
        self.frames = frames if frames is not None else []

    def __reduce__(self):
        return (type(self), (int(self.code), self.message, self.frames))

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


class ConfigError(TillwireError):
    """A configuration value is missing or invalid; ``key`` names it."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


class AuthError(TillwireError):
    """A token was rejected; ``code`` is the close code to send."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = Code(code)


class SessionClosed(TillwireError):
    """The session ended; ``code`` and ``reason`` are what the peer (or we) said."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(f"{Code(code).name}: {reason}" if reason else Code(code).name)
        self.code = Code(code)
        self.reason = reason


class UnknownTerminal(TillwireError):
    """A P0/P1 message to a terminal the registry does not know (it never
    logged in and was not provisioned) under the tenant's ``refuse`` policy
    (``delivery.unknown_terminals``); ``address`` names it.  Nothing was
    stored."""

    code = Code.UNKNOWN_TERMINAL

    def __init__(self, address: str) -> None:
        super().__init__(f"to: {address} is not a known terminal (it never logged in and was "
                         "not provisioned: POST /v1/terminals); nothing was stored")
        self.address = address


class StartupError(TillwireError):
    """``tillwire serve`` cannot start: a port is taken, the data directory or
    a TLS file is unusable.  ``key`` names the config key (and through it the
    flag or variable) to change; the message is one line for the operator."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
