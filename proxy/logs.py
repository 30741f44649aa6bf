"""Logging: the operations log and the access log, as JSON lines or as text.

Two audiences, two streams of lines on stderr:

- `skill_engine_proxy` is the operations logger (lifecycle, tokens, failures), an ordinary
  `logging` logger whose JSON lines come from python-json-logger.
- The access log has one line per request. It does not go through `logging`: a LogRecord
  and python-json-logger's formatter cost about 200,000 instructions a line, a third of what
  a bare aiohttp proxy spends forwarding a small request (see bench/ and the README's
  "Performance"). `AccessLog` builds the same fields with orjson where the speed extra
  installed it, else with the json module, and writes the lines of one event-loop turn in
  one write.

Both formats give a line the same shape whichever log it comes from, so collectors need one
parser. Nothing secret is ever handed to either: tokens and client secrets are `SecretStr`s,
and no request header value is logged but the request id.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import secrets
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TextIO

from pythonjsonlogger.json import JsonFormatter

from proxy.config import LogSettings

try:
    import orjson
except ImportError:  # the speed extra is not installed: the json module does the same
    orjson = None  # type: ignore[assignment]

logger = logging.getLogger("skill_engine_proxy")
ACCESS_LOGGER_NAME = "skill_engine_proxy.access"

REQUEST_ID_HEADER = "X-Request-ID"
# What of a client's request id the log shows: ids are short, and a line must stay one.
_LOGGED_REQUEST_ID = 200

# Access lines leave in writes of at most this many bytes (a line longer than that alone):
# POSIX makes a pipe write up to PIPE_BUF (4096 on Linux) atomic, so the lines of workers
# sharing one stderr pipe never tear.
_WRITE_LIMIT = 4096
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
            if not client_request_id.isascii():
                # Bytes that are not UTF-8 arrive as lone surrogates (aiohttp decodes them
                # so), which no JSON encoder or header writer takes: show them escaped.
                client_request_id = client_request_id.encode("utf-8", "surrogateescape").decode(
                    "utf-8", "backslashreplace"
                )
            return cls(client_request_id, False, time.perf_counter())
        # 128 random bits as 32 hex digits, as nginx's $request_id: a fifth of uuid4's cost.
        return cls(secrets.token_hex(16), True, time.perf_counter())

    def upstream_ms(self) -> float | None:
        """Milliseconds from sending the request upstream to the end of its answer."""
        if self.upstream_started is None:
            return None
        ended = time.perf_counter() if self.upstream_ended is None else self.upstream_ended
        return round((ended - self.upstream_started) * 1000, 3)


class AccessLog:
    """The access lines, switched on or off and formatted as `configure_logging` says.

    Lines wait in memory until the end of the event-loop turn that wrote them, then go out
    together: under load, one system call carries many lines. A line is never held longer
    than that turn; `flush` writes what waits at once, and runs at exit. Like a logging
    handler, the access log never fails a request: a line it cannot write is dropped.
    """

    def __init__(self) -> None:
        self.enabled = False
        self._stream: TextIO = sys.stderr
        self._text = False
        self._worker: int | None = None
        self._pending: list[str] = []
        self._flush_scheduled = False
        self._second = -1
        self._second_shown = ""
        atexit.register(self.flush)

    def configure(self, settings: LogSettings, stream: TextIO, worker: int | None) -> None:
        self.flush()
        self.enabled = settings.access
        self._stream = stream
        self._text = settings.format == "text"
        self._worker = worker

    def write(
        self, record: AccessRecord, *, method: str, path: str, status: int, tenant: str
    ) -> None:
        """Queue the line of one request (the caller checks `enabled` first)."""
        now = time.time()
        # The keys and names of the operations log's JSON lines; `time` comes last.
        fields: dict[str, Any] = {
            "level": "INFO",
            "logger": ACCESS_LOGGER_NAME,
            "message": f"{method} {path} {status}",
            "method": method,
            "path": path,
            "status": status,
            "duration_ms": round((time.perf_counter() - record.started) * 1000, 3),
            "upstream_ms": record.upstream_ms(),
            "bytes_in": record.bytes_in,
            "bytes_out": record.bytes_out,
            "tenant": tenant,
            "request_id": record.request_id[:_LOGGED_REQUEST_ID],
        }
        if self._text:
            line = self._text_line(now, fields)
        else:
            fields["time"] = self._utc_time(now)
            if self._worker is not None:
                fields["worker"] = self._worker
            line = (
                orjson.dumps(fields, option=orjson.OPT_APPEND_NEWLINE).decode()
                if orjson is not None
                else json.dumps(fields) + "\n"
            )
        self._pending.append(line)
        if not self._flush_scheduled:
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:
                self.flush()
                return
            self._flush_scheduled = True

    def flush(self) -> None:
        self._flush_scheduled = False
        if not self._pending:
            return
        lines, self._pending = self._pending, []
        batch: list[str] = []
        size = 0
        for line in lines:
            length = len(line) if line.isascii() else len(line.encode())
            if batch and size + length > _WRITE_LIMIT:
                self._write("".join(batch))
                batch, size = [], 0
            batch.append(line)
            size += length
        self._write("".join(batch))

    def _write(self, text: str) -> None:
        try:
            self._stream.write(text)
            self._stream.flush()
        except (OSError, ValueError):
            pass  # stderr closed or gone: nobody is left to tell

    def _utc_time(self, now: float) -> str:
        """`now` in ISO 8601 with microseconds, as the operations log writes it; the date
        and the second are formatted once a second."""
        second = int(now)
        if second != self._second:
            self._second = second
            self._second_shown = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        return f"{self._second_shown}.{int((now - second) * 1e6):06d}+00:00"

    def _text_line(self, now: float, fields: dict[str, Any]) -> str:
        worker = "" if self._worker is None else f" [worker {self._worker}]"
        moment = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
        shown = " ".join(f"{name}={_shown(fields[name])}" for name in _TEXT_FIELDS)
        milliseconds = int(now % 1 * 1000)
        return (
            f"{moment},{milliseconds:03d} INFO {ACCESS_LOGGER_NAME}{worker}: "
            f"{fields['message']} {shown}\n"
        )


# What a text access line shows after its message, in this order.
_TEXT_FIELDS = ("duration_ms", "upstream_ms", "bytes_in", "bytes_out", "tenant", "request_id")


access_log = AccessLog()
"""The process's access log; `configure_logging` sets it up."""


class TextFormatter(logging.Formatter):
    """A line for a person at a terminal."""

    def __init__(self, worker: int | None) -> None:
        super().__init__(_TEXT_FORMAT)
        self._worker_tag = "" if worker is None else f" [worker {worker}]"

    def format(self, record: logging.LogRecord) -> str:
        record.worker_tag = self._worker_tag
        return super().format(record)


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
    """Send every operations log record at `settings.level` or above to `stream` (stderr),
    in `settings.format`, and the access lines there too when `settings.access` says so.
    Called again on reload, when it replaces the handler it installed before (and no
    other)."""
    global _handler
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
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
    access_log.configure(settings, stream, worker)
    return handler


_handler: logging.Handler | None = None
