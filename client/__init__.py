"""Tillwire's terminal SDK.

``await tillwire.client.connect(host, port, token=...)`` returns a ``Client``
that stays connected, resumes without gaps and processes each message once;
see ``client/sdk.py``.  ``Connection`` is one raw session (no reconnects).

A session taken away (TAKEOVER, KICKED) raises ``Kicked`` and a token
refused for good ``Refused`` (both ``ClientClosed``) from ``async for``,
``receive()`` and ``send()``; ``connect(first_timeout=...)`` raises
``ConnectFailed`` when no session opened in time.
"""

from .connection import Connection, SendError
from .sdk import Client, ClientClosed, ConnectFailed, Kicked, Message, Refused, connect

__all__ = ["connect", "Client", "ClientClosed", "Kicked", "Refused", "ConnectFailed", "Message",
           "Connection", "SendError"]
