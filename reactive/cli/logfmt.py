"""serve's logs: logfmt lines (``ts=... level=... logger=... msg=... key=value``) on stderr."""

from __future__ import annotations

import logging
import re
import sys
from datetime import UTC, datetime

from reactive.cli.common import (
    quiet_tls_chatter,
)

__all__ = ["LogfmtFormatter", "configure_logging"]

_PAIR = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*=\S*$")
_BARE = re.compile(r'^[^\s"=\\]+$')


def _quote(value: str) -> str:
    if value and _BARE.match(value):
        return value
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


class LogfmtFormatter(logging.Formatter):
    """``ts=... level=... logger=... msg=... key=value ...``: one line per record.

    Trailing ``key=value`` words of a message (as the engine writes its
    transitions) become fields of their own.
    """

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, UTC)
        words = record.getMessage().split(" ")
        fields: list[str] = []
        while len(words) > 1 and _PAIR.match(words[-1]):
            fields.insert(0, words.pop())
        parts = [
            f"ts={ts:%Y-%m-%dT%H:%M:%S}.{ts.microsecond // 1000:03d}Z",
            f"level={record.levelname.lower()}",
            f"logger={record.name}",
            f"msg={_quote(' '.join(words))}",
            *fields,
        ]
        if record.exc_info:
            parts.append(f"exc={_quote(self.formatException(record.exc_info))}")
        return " ".join(parts)


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    if level.lower() != "debug":
        # asyncio's and nats-py's own chatter is for debugging.
        logging.getLogger("asyncio").setLevel(logging.WARNING)
        quiet_tls_chatter()
