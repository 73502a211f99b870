"""Structured logs: ``key=value`` lines or JSON lines, chosen in the config."""

from __future__ import annotations

import logging
import sys
import time

import orjson


class KeyValueFormatter(logging.Formatter):
    """``ts=... level=info logger=tillwire.node msg="..."``."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        msg = record.getMessage().replace('"', "'")
        line = f'ts={ts}.{int(record.msecs):03d}Z level={record.levelname.lower()} ' \
               f'logger={record.name} msg="{msg}"'
        if record.exc_info:
            line += ' exc="' + self.formatException(record.exc_info).replace("\n", " | ") + '"'
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": round(record.created, 3), "level": record.levelname.lower(),
            "logger": record.name, "msg": record.getMessage(),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(doc).decode()


def setup_logging(log_cfg) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_cfg.format == "json" else KeyValueFormatter())
    root = logging.getLogger("tillwire")
    root.handlers[:] = [handler]
    root.setLevel(log_cfg.level.upper())
    root.propagate = False
