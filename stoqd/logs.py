"""Logging for every stoqd process: structlog, one line per event, naming its process.

JSON when stderr is not a terminal (journald, Docker, files), key=value on a terminal.
Plugins log through the standard library (``self.log``); those records go through the
same renderer, so every line carries ``proc`` (supervisor, provider:NAME, worker:N) and
``pid``.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import structlog

_proc = "stoqd"


def _add_process(_: Any, __: str, event: dict) -> dict:
    event.setdefault("proc", _proc)
    event.setdefault("pid", os.getpid())
    return event


_as_json = False


def renders_json() -> bool:
    """True when this process logs JSON lines (for machines) rather than text."""
    return _as_json


def setup(proc: str, level: str = "INFO", syntax: str = "auto") -> None:
    """Configure logging for this process; call once at process start."""
    global _proc, _as_json
    _proc = proc
    as_json = _as_json = syntax == "json" or (syntax == "auto" and not sys.stderr.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(colors=False, pad_event=0)
    )
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _add_process,
    ]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Client libraries are chatty at INFO; their warnings still show.
    for noisy in ("pika", "google", "grpc", "watchdog", "urllib3"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


def get(name: str = "stoqd") -> Any:
    return structlog.get_logger(name)
