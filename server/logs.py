"""Structured logs: ``key=value`` lines or JSON lines, chosen in the config."""

from __future__ import annotations

import logging
import sys
import time

import orjson


class KeyValueFormatter(logging.Formatter):
    """``ts=... level=info logger=tillwire.node msg="..."`` (and ``process=...``
    in a helper process of the server, such as the store writer)."""

    def __init__(self, process: str = "") -> None:
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        msg = record.getMessage().replace('"', "'")
        line = f'ts={ts}.{int(record.msecs):03d}Z level={record.levelname.lower()} ' \
               f'logger={record.name} msg="{msg}"'
        if self.process:
            line += f" process={self.process}"
        if record.exc_info:
            line += ' exc="' + self.formatException(record.exc_info).replace("\n", " | ") + '"'
        return line


class JsonFormatter(logging.Formatter):
    def __init__(self, process: str = "") -> None:
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": round(record.created, 3), "level": record.levelname.lower(),
            "logger": record.name, "msg": record.getMessage(),
        }
        if self.process:
            doc["process"] = self.process
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(doc).decode()


def setup_logging(log_cfg) -> None:
    """Logs of the ``tillwire`` loggers to stderr as ``[log]`` says."""
    configure(log_cfg.format, log_cfg.level)


def configure(fmt: str, level: str, process: str = "") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(process) if fmt == "json" else KeyValueFormatter(process))
    root = logging.getLogger("tillwire")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


def current() -> tuple[str, str]:
    """(format, level) of the ``tillwire`` loggers now, for a helper process to
    log alike; ("kv", "warning") when logging was never set up (an embedding)."""
    root = logging.getLogger("tillwire")
    fmt = "json" if any(isinstance(h.formatter, JsonFormatter) for h in root.handlers) else "kv"
    level = logging.getLevelName(root.level) if root.level else "WARNING"
    return fmt, level.lower()
