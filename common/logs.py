"""Structured logs (JSON lines on stderr) that never carry a credential.

Secrets are kept out by construction (no code logs a token or header value); the redaction
processor below is the second line of defence for any key that looks like one.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, cast

import structlog
from structlog.typing import EventDict, Processor

_SECRET_KEY = re.compile(r"(authorization|token|cookie|credential|secret|password)", re.IGNORECASE)
_BEARER = re.compile(r"(?i)bearer\s+[A-Za-z0-9._~+/=-]+")


def _redact(_logger: object, _name: str, event: MutableMapping[str, Any]) -> EventDict:
    for key, value in list(event.items()):
        if _SECRET_KEY.search(key) and key != "event":
            event[key] = "[redacted]"
        elif isinstance(value, str) and _BEARER.search(value):
            event[key] = _BEARER.sub("Bearer [redacted]", value)
    return event


def configure_logging(service: str, level: str = "info") -> None:
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    # Our own events go through structlog at the chosen level; libraries (asyncio, grpc) only
    # speak up for warnings, so the log stays JSON lines even at debug level.
    # Those warnings are rendered by the same processors, so every line of a service's log is JSON
    # (a library's traceback becomes the "exception" field of one line, not a dozen loose lines).
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _redact,
    ]
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name, structlog.stdlib.ExtraAdder()],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info, structlog.processors.JSONRenderer()],
    ))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(service=service)


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    # make_filtering_bound_logger's class has BoundLogger's methods; structlog types the factory loosely.
    return cast(structlog.stdlib.BoundLogger, structlog.get_logger(name))
