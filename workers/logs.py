"""Logs: one JSON object a line in production, readable lines in development.

Tenure's own lines (structlog) and the standard library's records (the Temporal SDK's, its
core's, uvicorn's) go through the same processors, so all of them carry the process's name,
the time in UTC, the trace when there is one and, within an API request, the request's
context (its id, its caller, the command's entity and id: `api/request_context.py`). A bearer
token never reaches the output: values under secret-sounding keys and anything shaped like a
bearer token or a JWT are replaced before rendering.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any, TextIO

import structlog
from opentelemetry import trace
from structlog.types import EventDict, Processor
from temporalio import activity, workflow

from workers.settings import Settings

FORMATS = ("json", "text")
LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
REDACTED = "[redacted]"
_SECRET_KEYS = frozenset(
    {"authorization", "token", "access_token", "id_token", "secret", "password", "cookie"}
)
_BEARER = re.compile(r"\b[Bb]earer\s+[A-Za-z0-9._~+/=-]+")
_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
# What the Temporal SDK puts on its records about the workflow or activity logging.
_SDK_EXTRAS = ("temporal_workflow", "temporal_activity")
_OURS = "_tenure_handler"


def log_format(settings: Settings) -> str:
    """`json` or `text`: as configured, else text in development and JSON otherwise."""
    chosen = settings.log_format or ("text" if settings.environment == "development" else "json")
    if chosen not in FORMATS:
        raise ValueError(f"TENURE_LOG_FORMAT is json or text, not {chosen!r}")
    return chosen


def configure_logging(
    settings: Settings,
    process_name: str,
    *,
    stream: TextIO | None = None,
    level: int | None = None,
) -> None:
    """Send every log record of this process to `stream` (stderr) in the settings' format,
    at the settings' level (or `level`), each line naming `process_name`."""
    json = log_format(settings) == "json"
    if level is None:
        if settings.log_level.lower() not in LEVELS:
            raise ValueError(f"TENURE_LOG_LEVEL is one of {', '.join(LEVELS)}")
        level = LEVELS[settings.log_level.lower()]
    stream = stream or sys.stderr
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.ExtraAdder(_SDK_EXTRAS),
        _naming(process_name),
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _add_trace,
    ]
    renderer: Processor = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(
            colors=stream.isatty(), exception_formatter=structlog.dev.plain_traceback
        )
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            redact,
            renderer,
        ],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    setattr(handler, _OURS, True)
    root = logging.getLogger()
    for earlier in [h for h in root.handlers if getattr(h, _OURS, False)]:
        root.removeHandler(earlier)
    root.addHandler(handler)
    root.setLevel(level)
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    # In JSON the SDK's workflow and activity details are fields of their own (from the
    # records' extras), not a dict's repr appended to each message.
    workflow.logger.workflow_info_on_message = not json
    activity.logger.activity_info_on_message = not json


def _naming(process_name: str) -> Callable[[Any, str, EventDict], EventDict]:
    def name_process(logger: Any, method: str, event_dict: EventDict) -> EventDict:
        event_dict.setdefault("process", process_name)
        return event_dict

    return name_process


def _add_trace(logger: Any, method: str, event_dict: EventDict) -> EventDict:
    """The trace and span the line was written in, to find one from the other."""
    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        event_dict["trace_id"] = format(context.trace_id, "032x")
        event_dict["span_id"] = format(context.span_id, "016x")
    return event_dict


def redact(logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> Mapping[str, Any]:
    """Replace secrets: values under secret-sounding keys, and bearer tokens and JWTs
    inside any text (a message, an exception's)."""
    for key, value in event_dict.items():
        if key.lower() in _SECRET_KEYS:
            event_dict[key] = REDACTED
        elif isinstance(value, str) and ("ey" in value or "earer" in value):
            event_dict[key] = _JWT.sub(REDACTED, _BEARER.sub(f"Bearer {REDACTED}", value))
    return event_dict


class RepeatedLogFilter(logging.Filter):
    """Lets each distinct message through once per `window` seconds, with a count of the
    repeats it held back. A stuck workflow makes the SDK log the same failure on every
    retry (every 10 s, forever); the watchdog's one line says what to do about it. A
    publish to a Redis that is down fails the same way for every entity at once."""

    def __init__(self, window: float = 600.0, capacity: int = 1024) -> None:
        super().__init__()
        self._window = window
        self._capacity = capacity
        self._seen: dict[str, tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = f"{record.name}:{record.getMessage()}"
        now = time.monotonic()
        seen = self._seen.get(key)
        if seen is not None and now - seen[0] < self._window:
            self._seen[key] = (seen[0], seen[1] + 1)
            return False
        if seen is not None and seen[1]:
            record.msg = f"{record.msg} (and {seen[1]} times more in the last {self._window:.0f} s)"
        if len(self._seen) >= self._capacity:
            self._seen.pop(next(iter(self._seen)))
        self._seen[key] = (now, 0)
        return True
