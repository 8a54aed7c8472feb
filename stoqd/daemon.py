"""Running the daemon: checks that must pass before any child starts, then the loop."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, List, Optional

from . import logs
from .config import EX_CONFIG, ConfigError
from .control.server import SocketError, SocketInUse
from .framework.data import RequestMeta
from .preflight import preflight

if TYPE_CHECKING:
    from .framework.core import Stoq

EX_UNAVAILABLE = 69


def _error(message: str) -> None:
    # A JSON log line for the log collector, and the plain line for the person reading
    # the terminal or `docker logs`; on a terminal the plain line alone says it.
    if logs.renders_json():
        logs.get().error("config_error", error=message)
    print(message, file=sys.stderr)


def run_daemon(
    stoq: Stoq,
    request_meta: Optional[RequestMeta] = None,
    add_start_dispatch: Optional[List[str]] = None,
) -> int:
    """Supervise ``stoq``'s providers until all are exhausted or we are told to stop.

    Returns the process exit code: 0 when every provider was exhausted (or the daemon
    was stopped), 1 when one was FATAL, 78 for a configuration problem.
    """
    core = stoq.config.values["core"]
    logs.setup("supervisor", core["log_level"], core["log_syntax"])
    for line in stoq.config.ignored:
        logs.get().warning("config_ignored", detail=line)
    for line in stoq.registry.notes:
        logs.get().warning("plugin_replaced", detail=line)
    try:
        stoq.check()
    except ConfigError as exc:
        for problem in exc.problems:
            _error(problem)
        return EX_CONFIG
    problems, warnings = preflight(stoq, providers=False)
    for line in warnings:
        logs.get().warning("config_unread_option", detail=line)
    for problem in problems:
        _error(problem)
    if problems:
        return EX_CONFIG
    from .supervisor import Supervisor

    meta: Optional[dict[str, Any]] = None
    if request_meta is not None:
        meta = {
            "archive_payloads": request_meta.archive_payloads,
            "source": request_meta.source,
            "extra_data": request_meta.extra_data,
        }
    from .hooks import attach
    from .metrics import MetricsError

    supervisor = Supervisor(stoq, request_meta=meta, add_start_dispatch=add_start_dispatch)
    try:
        metrics = attach(supervisor)
    except MetricsError as exc:
        where = stoq.config.path or "the configuration"
        _error(f"{where}: [stoqd] metrics_address: {exc}")
        return EX_CONFIG
    try:
        return supervisor.run()
    except SocketInUse as exc:
        _error(str(exc))
        return EX_UNAVAILABLE
    except SocketError as exc:
        _error(f"{stoq.config.display_path}: [stoqd] control_socket: {exc}")
        return EX_CONFIG
    finally:
        if metrics is not None:
            metrics.close()
