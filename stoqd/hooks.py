"""What the supervisor loop tells the outside world: systemd's notify protocol, metrics.

Each hook gets ``on_ready``, ``on_tick`` (at most every 10 ms and at least once a
second, with the loop's other periodic checks: keep it cheap), ``on_stopping`` and
``on_reload`` with the supervisor.
"""

from __future__ import annotations

import copy
import time
from typing import TYPE_CHECKING, Any, Dict, Optional

from . import notify

if TYPE_CHECKING:
    from .supervisor import Supervisor

STATUS_EVERY = 2.0
SNAPSHOT_EVERY = 1.0


def _status_line(sup: Supervisor) -> str:
    running = sum(1 for p in sup.providers.values() if p.state.value == "RUNNING")
    saved = sum(p.saved for p in sup.providers.values())
    failed = sum(p.failed for p in sup.providers.values())
    return (
        f"{running}/{len(sup.providers)} providers running, {len(sup.workers)} workers, "
        f"queue {len(sup.queue)}/{sup.max_queue}, saved {saved}, failed {failed}"
    )


class SystemdHook:
    """READY/STATUS/WATCHDOG/STOPPING/RELOADING for a Type=notify unit."""

    def __init__(self) -> None:
        self.ping_every = notify.watchdog_ping_interval()
        self.last_ping = 0.0
        self.last_status = 0.0
        self.reloading = False

    def on_ready(self, sup: Supervisor) -> None:
        notify.ready(_status_line(sup))

    def on_tick(self, sup: Supervisor) -> None:
        now = time.monotonic()
        if self.ping_every and now - self.last_ping >= self.ping_every:
            self.last_ping = now
            notify.watchdog()  # from the loop itself: a stuck loop stops the pings
        if self.reloading:
            self.reloading = False
            if sup.ready_sent:  # (before the first READY, that one says it)
                notify.ready(_status_line(sup))
        if sup.ready_sent and now - self.last_status >= STATUS_EVERY:
            self.last_status = now
            notify.status(_status_line(sup))

    def on_stopping(self, sup: Supervisor) -> None:
        notify.stopping("stopping: draining in-flight work")

    def on_reload(self, sup: Supervisor) -> None:
        self.reloading = True
        notify.reloading()


class MetricsHook:
    """Serves /metrics from a snapshot the loop refreshes, never from live state."""

    def __init__(self, address: str) -> None:
        from .metrics import start_metrics_server

        self.snapshot: Dict[str, Any] = {}
        self.taken = 0.0
        self.server = start_metrics_server(address, lambda: self.snapshot)

    def on_ready(self, sup: Supervisor) -> None:
        self._take(sup)

    def on_tick(self, sup: Supervisor) -> None:
        if time.monotonic() - self.taken >= SNAPSHOT_EVERY:
            self._take(sup)

    def _take(self, sup: Supervisor) -> None:
        # A fresh object each time: the HTTP thread only ever sees a finished one.
        self.snapshot = copy.deepcopy(sup.snapshot())
        self.taken = time.monotonic()

    def on_stopping(self, sup: Supervisor) -> None:
        self._take(sup)

    def on_reload(self, sup: Supervisor) -> None:
        pass

    def close(self) -> None:
        self.server.close()


def attach(sup: Supervisor) -> Optional[MetricsHook]:
    """Attach the hooks the environment and configuration ask for."""
    sup.hooks.append(SystemdHook())
    address = sup.daemon.get("metrics_address")
    if not address:
        return None
    hook = MetricsHook(address)
    sup.hooks.append(hook)
    return hook
