"""Logging: the operations and access loggers, as JSON lines or as text, and the access line.

Two loggers, named by audience: `skill_engine_proxy` for operators (lifecycle, tokens,
failures) and `skill_engine_proxy.access` with one line per request. JSON comes from
python-json-logger, one object per line, for log collectors; text is for a person at a
terminal. Nothing secret is ever handed to either: tokens and client secrets are
`SecretStr`s, and no request header value is logged but the request id.
"""

from __future__ import annotations

import logging
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any, TextIO

from pythonjsonlogger.json import JsonFormatter

from proxy.config import LogSettings

logger = logging.getLogger("skill_engine_proxy")
access_logger = logging.getLogger("skill_engine_proxy.access")

REQUEST_ID_HEADER = "X-Request-ID"
# What of a client's request id the log shows: ids are short, and a line must stay one.
_LOGGED_REQUEST_ID = 200

# The fields of an access line, in the order the text format shows them.
ACCESS_FIELDS = (
    "method",
    "path",
    "status",
    "duration_ms",
    "upstream_ms",
    "bytes_in",
    "bytes_out",
    "tenant",
    "request_id",
)
_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(worker_tag)s: %(message)s"


@dataclass(slots=True)
class AccessRecord:
    """What the access line says about one request, filled in as the request goes."""

    request_id: str
    """The client's X-Request-ID, or one the proxy made up."""
    generated: bool
    """The proxy made the id up: it sends it upstream and back to the client."""
    started: float
    bytes_in: int = 0
    """Request body bytes read from the client."""
    bytes_out: int = 0
    """Response body bytes sent to the client."""
    upstream_started: float | None = None
    upstream_ended: float | None = None

    @classmethod
    def begin(cls, client_request_id: str | None) -> AccessRecord:
        if client_request_id:
            return cls(client_request_id, False, time.perf_counter())
        return cls(str(uuid.uuid4()), True, time.perf_counter())

    def upstream_ms(self) -> float | None:
        """Milliseconds from sending the request upstream to the end of its answer."""
        if self.upstream_started is None:
            return None
        ended = time.perf_counter() if self.upstream_ended is None else self.upstream_ended
        return round((ended - self.upstream_started) * 1000, 3)


def log_access(record: AccessRecord, *, method: str, path: str, status: int, tenant: str) -> None:
    """Write the access line of one request (the caller checks that the logger is on)."""
    duration_ms = round((time.perf_counter() - record.started) * 1000, 3)
    access_logger.info(
        "%s %s %d",
        method,
        path,
        status,
        extra={
            "method": method,
            "path": path,
            "status": status,
            "duration_ms": duration_ms,
            "upstream_ms": record.upstream_ms(),
            "bytes_in": record.bytes_in,
            "bytes_out": record.bytes_out,
            "tenant": tenant,
            "request_id": record.request_id[:_LOGGED_REQUEST_ID],
        },
    )


class TextFormatter(logging.Formatter):
    """A line for a person: the message, and an access line's fields as `key=value`."""

    def __init__(self, worker: int | None) -> None:
        super().__init__(_TEXT_FORMAT)
        self._worker_tag = "" if worker is None else f" [worker {worker}]"

    def format(self, record: logging.LogRecord) -> str:
        record.worker_tag = self._worker_tag
        line = super().format(record)
        if record.name != access_logger.name:
            return line
        fields = " ".join(
            f"{name}={_shown(getattr(record, name, None))}"
            for name in ACCESS_FIELDS[3:]  # method, path and status are the message
        )
        return f"{line} {fields}"


def _shown(value: Any) -> str:
    if value is None:
        return "-"
    text = str(value)
    # A request id is the client's text: keep it one token of one line.
    return text if text.isprintable() and " " not in text else repr(text)


def _json_formatter(worker: int | None) -> logging.Formatter:
    return JsonFormatter(
        ["levelname", "name", "message"],
        rename_fields={"levelname": "level", "name": "logger"},
        timestamp="time",
        static_fields={} if worker is None else {"worker": worker},
    )


def configure_logging(
    settings: LogSettings, *, worker: int | None = None, stream: TextIO | None = None
) -> logging.Handler:
    """Send every log record at `settings.level` or above to `stream` (stderr), in
    `settings.format`; switch the access log on or off. Called again on reload, when it
    replaces the handler it installed before (and no other)."""
    global _handler
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(
        _json_formatter(worker) if settings.format == "json" else TextFormatter(worker)
    )
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
    root.addHandler(handler)
    _handler = handler
    root.setLevel(settings.level.upper())
    # The access lines are their own audience: log.level does not silence them.
    access_logger.setLevel(logging.INFO if settings.access else _OFF)
    return handler


_handler: logging.Handler | None = None
_OFF = logging.CRITICAL + 1
