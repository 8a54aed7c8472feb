"""What the control socket can be asked, and the status snapshot it answers with."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional

from .. import __version__
from ..states import State
from .protocol import ControlError

if TYPE_CHECKING:
    from ..children import ProviderHandle
    from ..supervisor import Supervisor


def _age(since: Optional[float], now: float) -> Optional[float]:
    return None if since is None else round(now - since, 3)


def status(sup: Supervisor) -> Dict[str, Any]:
    """Everything `stoqctl status` shows; also what the metrics endpoint exports."""
    now = time.monotonic()
    providers = []
    for handle in sup.providers.values():
        providers.append(
            {
                "name": handle.name,
                "state": handle.state.value,
                "pid": handle.pid if handle.alive() else None,
                "uptime": _age(handle.ready_at, now) if handle.alive() else None,
                "restarts": handle.restarts,
                "failures": handle.failures,
                "put": handle.put,
                "saved": handle.saved,
                "failed": handle.failed,
                "adopted": handle.adopted,
                "queued": handle.queued,
                "last_error": handle.last_error,
                "next_retry_in": _age(now, handle.next_retry) if handle.next_retry else None,
                "stats": handle.stats,
            }
        )
    workers = []
    for worker in sup.workers.values():
        current = None
        if worker.assigned:
            item = sup.items.get(worker.assigned[0])
            current = {
                "provider": item.provider if item else None,
                "seq": worker.assigned[0],
                "age": round(now - worker.current_since, 3),
            }
        state = (
            "starting"
            if not worker.ready
            else "retiring"
            if worker.retiring
            else ("busy" if worker.assigned else "idle")
        )
        workers.append(
            {
                "id": worker.wid,
                "pid": worker.pid,
                "state": state,
                "current": current,
                "payloads": worker.payloads,
                "rss": worker.rss,
            }
        )
    return {
        "daemon": {
            "pid": os.getpid(),
            "version": __version__,
            "state": "stopping" if sup.stopping_since is not None else "running",
            "uptime": round(now - sup.started, 3),
            "config": str(sup.config.path) if sup.config.path else None,
            "workers": sup.n_workers,  # the pool's size; the list below is what runs
            # Why the pool is short (a worker process could not be started), until one is.
            "worker_error": sup.worker_spawn_error,
            "worker_retry_in": (
                _age(now, sup.next_worker_spawn) if sup.worker_spawn_error is not None else None
            ),
        },
        "providers": providers,
        "workers": workers,
        "queue": {
            "depth": len(sup.queue),
            "max": sup.max_queue,
            "in_flight": len(sup.items) - len(sup.queue),
        },
        "counters": dict(sup.counters),
        "scan_seconds": sup.scan_histograms(),
    }


def _named(request: Dict[str, Any]) -> str:
    name = request.get("name")
    if not isinstance(name, str) or not name:
        raise ControlError(f"{request['cmd']} needs a provider name")
    return name


def _start(sup: Supervisor, request: Dict[str, Any]) -> Dict[str, Any]:
    handle = sup.provider(_named(request))
    sup.start_provider(handle)
    _check_started(handle)
    return {"message": f"{handle.name}: started"}


def _check_started(handle: ProviderHandle) -> None:
    """A start that could not even create the process says so (it is retried as a crash)."""
    if handle.state is State.BACKOFF or handle.state is State.FATAL:
        raise ControlError(
            f"provider {handle.name} did not start: {handle.last_error} ({handle.state.value})"
        )


def _stop(sup: Supervisor, request: Dict[str, Any]) -> Dict[str, Any]:
    handle = sup.provider(_named(request))
    if not handle.alive() and handle.state.value != "BACKOFF":
        raise ControlError(f"provider {handle.name} is not running ({handle.state.value})")
    sup.stop_provider(handle)
    return {"message": f"{handle.name}: stopping"}


def _restart(sup: Supervisor, request: Dict[str, Any]) -> Dict[str, Any]:
    handle = sup.provider(_named(request))
    sup.restart_provider(handle)
    _check_started(handle)  # (one not running is started at once)
    return {"message": f"{handle.name}: restarting"}


def _shutdown(sup: Supervisor, request: Dict[str, Any]) -> Dict[str, Any]:
    sup.begin_shutdown("stoqctl shutdown")
    return {"message": "shutting down"}


def _reload(sup: Supervisor, request: Dict[str, Any]) -> Dict[str, Any]:
    sup.reload()
    return {"message": "reload requested; see the log for the outcome"}


COMMANDS: Dict[str, Callable[[Supervisor, Dict[str, Any]], Dict[str, Any]]] = {
    "status": lambda sup, _: {"status": status(sup)},
    "start": _start,
    "stop": _stop,
    "restart": _restart,
    "shutdown": _shutdown,
    "reload": _reload,
}


def dispatch(sup: Supervisor, request: Dict[str, Any]) -> Dict[str, Any]:
    command = COMMANDS.get(request["cmd"])
    if command is None:
        raise ControlError(f"unknown command {request['cmd']} (commands: {', '.join(COMMANDS)})")
    return command(sup, request)
