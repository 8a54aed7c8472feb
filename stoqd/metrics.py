"""An optional Prometheus endpoint, built from the daemon's status snapshot at scrape time.

Off by default; ``[stoqd] metrics_address = 127.0.0.1:9464`` turns it on. The supervisor
calls :func:`start_metrics_server` with a function returning its status snapshot (the
same dict ``stoqctl status --json`` prints); a collector turns that dict into metric
families on each scrape, so nothing is counted twice and no process but the supervisor
is involved. The HTTP server runs in a daemon thread on a private registry, so the
``snapshot`` callable must be safe to call from another thread (return a copy).

The parts of the snapshot read here (anything missing or malformed is left out)::

    {"daemon": {"version": str, "uptime": float},
     "providers": [{"name", "state", "restarts", "put", "saved", "failed", "adopted",
                    "queued"}],
     "workers": [{"id", "state"}],
     "queue": {"depth": int, "max": int, "in_flight": int},
     "counters": {"worker_recycles": int, "worker_kills": int, ...},
     "scan_seconds": {PLUGIN: {"buckets": [upper bounds], "counts": [cumulative],
                               "sum": float, "count": int}}}

``counts[i]`` is how many scans took at most ``buckets[i]`` seconds (cumulative, as
Prometheus counts); ``count`` includes the ones above the last bound.
"""

from __future__ import annotations

import errno
import logging
import math
import re
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple

from prometheus_client import start_http_server
from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from . import backoff
from .states import State

log = logging.getLogger("stoqd.metrics")
# How long the endpoint's thread waits after it could not accept a connection (out of
# descriptors or memory), doubling while it keeps failing.
ACCEPT_PAUSE = 0.5
ACCEPT_PAUSE_MAX = 8.0
_SHORT_OF = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)

Snapshot = Mapping[str, Any]

_PROVIDER_COUNTERS = (
    ("restarts", "stoqd_provider_restarts", "Times the provider process was restarted."),
    ("put", "stoqd_provider_items_put", "Items the provider put on the work queue."),
    ("saved", "stoqd_provider_items_saved", "Items of the provider whose results were saved."),
    ("failed", "stoqd_provider_items_failed", "Items of the provider that failed."),
    (
        "adopted",
        "stoqd_provider_items_adopted",
        "Redeliveries answered with an earlier run's outcome instead of a second scan.",
    ),
)
_PROVIDER_GAUGES = (
    ("queued", "stoqd_provider_items_queued", "Items of the provider waiting on the queue."),
)
# The daemon's "counters", by key. A key not listed still shows, as stoqd_KEY_total.
_DAEMON_COUNTERS = {
    "worker_recycles": (
        "Workers retired: recycled (worker_max_payloads, worker_max_rss, reload), or "
        "surplus after a reload lowered workers."
    ),
    "worker_kills": "Workers killed by the supervisor (scan_timeout, shutdown).",
    "worker_deaths": "Workers that died on their own in the middle of a scan.",
    "timeouts": "Payloads whose scan passed scan_timeout.",
    "quarantined": "Payloads given up on after killing max_attempts workers.",
    "items_given_back": "Items a worker gave back unscanned, waiting behind a slow scan.",
    "worker_spawn_failures": "Worker processes that could not be started (retried).",
}
_WORKER_STATES = ("starting", "idle", "busy", "retiring")
_METRIC_NAME = re.compile(r"[a-z][a-z0-9_]*")


def _number(value: Any) -> Optional[float]:
    """A finite number from the snapshot, or None (bools and junk are not numbers)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _records(snapshot: Snapshot, key: str) -> List[Mapping[str, Any]]:
    value = snapshot.get(key)
    if not isinstance(value, list):
        return []
    return [item for item in value if isinstance(item, Mapping)]


class SnapshotCollector(Collector):
    """Turns the status snapshot into metric families each time Prometheus scrapes."""

    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self._snapshot = snapshot
        self._warned = False

    def collect(self) -> Iterator[Metric]:
        ok = GaugeMetricFamily(
            "stoqd_snapshot_success", "1 if the daemon's status snapshot could be read."
        )
        try:
            snapshot = self._snapshot()
        except Exception as exc:  # a scrape must never take the daemon down
            if not self._warned:
                self._warned = True
                log.warning("metrics: cannot read the status snapshot: %s", exc)
            ok.add_metric([], 0)
            yield ok
            return
        ok.add_metric([], 1)
        yield ok
        yield from self._daemon(snapshot)
        yield from self._providers(_records(snapshot, "providers"))
        yield from self._queue(snapshot.get("queue"))
        yield from self._workers(_records(snapshot, "workers"))
        yield from self._counters(snapshot.get("counters"))
        yield from self._scans(snapshot.get("scan_seconds"))

    def _daemon(self, snapshot: Snapshot) -> Iterator[Metric]:
        daemon = snapshot.get("daemon")
        if not isinstance(daemon, Mapping):
            return
        if isinstance(daemon.get("version"), str):
            info = GaugeMetricFamily("stoqd_info", "stoqd's version.", labels=["version"])
            info.add_metric([daemon["version"]], 1)
            yield info
        uptime = _number(daemon.get("uptime"))
        if uptime is not None:
            yield GaugeMetricFamily(
                "stoqd_uptime_seconds", "Seconds since the daemon started.", value=uptime
            )

    def _providers(self, providers: List[Mapping[str, Any]]) -> Iterator[Metric]:
        named = [p for p in providers if isinstance(p.get("name"), str)]
        state = GaugeMetricFamily(
            "stoqd_provider_state",
            "1 for the provider's current lifecycle state, 0 for the others.",
            labels=["provider", "state"],
        )
        known = [s.value for s in State]
        for provider in named:
            current = str(provider.get("state", ""))
            # A state this module does not know yet still shows, rather than vanishing.
            names = known if current in known or not current else [*known, current]
            for name in names:
                state.add_metric([provider["name"], name], 1 if name == current else 0)
        yield state
        for key, metric, doc in _PROVIDER_COUNTERS:
            family = CounterMetricFamily(metric, doc, labels=["provider"])
            for provider in named:
                value = _number(provider.get(key))
                if value is not None:
                    family.add_metric([provider["name"]], value)
            yield family
        for key, metric, doc in _PROVIDER_GAUGES:
            gauge = GaugeMetricFamily(metric, doc, labels=["provider"])
            for provider in named:
                value = _number(provider.get(key))
                if value is not None:
                    gauge.add_metric([provider["name"]], value)
            yield gauge

    def _queue(self, queue: Any) -> Iterator[Metric]:
        if not isinstance(queue, Mapping):
            return
        for key, metric, doc in (
            ("depth", "stoqd_queue_depth", "Items waiting on the work queue."),
            ("in_flight", "stoqd_queue_in_flight", "Items a worker is scanning now."),
            ("max", "stoqd_queue_max", "Items the queue holds before providers block."),
        ):
            value = _number(queue.get(key))
            if value is not None:
                yield GaugeMetricFamily(metric, doc, value=value)

    def _workers(self, workers: List[Mapping[str, Any]]) -> Iterator[Metric]:
        by_state: Dict[str, int] = {}
        for worker in workers:
            state = str(worker.get("state", "unknown"))
            by_state[state] = by_state.get(state, 0) + 1
        family = GaugeMetricFamily(
            "stoqd_workers", "Scanning worker processes by state.", labels=["state"]
        )
        for state in sorted(set(_WORKER_STATES) | set(by_state)):
            family.add_metric([state], by_state.get(state, 0))
        yield family

    def _counters(self, counters: Any) -> Iterator[Metric]:
        if not isinstance(counters, Mapping):
            return
        for key, raw in sorted(counters.items()):
            value = _number(raw)
            if value is None or not _METRIC_NAME.fullmatch(str(key)):
                continue
            doc = _DAEMON_COUNTERS.get(key, f"The daemon's {key} counter.")
            yield CounterMetricFamily(f"stoqd_{key}", doc, value=value)

    def _scans(self, scans: Any) -> Iterator[Metric]:
        family = HistogramMetricFamily(
            "stoqd_scan_duration_seconds",
            "Seconds one worker plugin took to scan one payload.",
            labels=["plugin"],
        )
        if isinstance(scans, Mapping):
            for plugin, histogram in sorted(scans.items()):
                buckets = _cumulative(histogram)
                if buckets is not None:
                    family.add_metric([str(plugin)], buckets, float(histogram["sum"]))
        yield family


def _cumulative(histogram: Any) -> Optional[List[Tuple[str, float]]]:
    """Prometheus' ``le`` buckets from the snapshot's histogram, or None if malformed."""
    if not isinstance(histogram, Mapping):
        return None
    bounds, counts = histogram.get("buckets"), histogram.get("counts")
    total, total_sum = _number(histogram.get("count")), _number(histogram.get("sum"))
    if not isinstance(bounds, list) or not isinstance(counts, list) or len(bounds) != len(counts):
        return None
    if total is None or total_sum is None:
        return None
    pairs: List[Tuple[str, float]] = []
    for bound, count in zip(bounds, counts, strict=True):
        upper, number = _number(bound), _number(count)
        if upper is None or number is None:
            return None
        if pairs and (upper <= float(pairs[-1][0]) or number < pairs[-1][1]):
            return None  # Prometheus rejects unsorted bounds or falling counts
        pairs.append((_le(upper), number))
    if pairs and total < pairs[-1][1]:
        return None
    pairs.append(("+Inf", total))
    return pairs


def _le(bound: float) -> str:
    # The same spelling prometheus_client's own histograms use: le="1.0", le="0.005".
    return floatToGoString(bound)


def parse_address(address: str) -> Tuple[str, int]:
    """``host:port`` (``[v6]:port``; ``:port`` for every interface) to ``(host, port)``."""
    host, sep, port_text = address.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(
            f"metrics_address {address!r}: expected host:port, for example 127.0.0.1:9464"
        )
    return host or "0.0.0.0", int(port_text)


class MetricsServer:
    """The running endpoint; :meth:`close` stops it and frees the port."""

    def __init__(self, server: Any, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread

    @property
    def address(self) -> Tuple[str, int]:
        """The bound ``(host, port)`` (useful when the port was 0)."""
        host, port = self._server.server_address[:2]
        return host, port

    def close(self) -> None:
        """Stop serving and wait for the server thread."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class MetricsError(Exception):
    """The endpoint could not be started (bad address, port in use)."""


def start_metrics_server(address: str, snapshot: Callable[[], Snapshot]) -> MetricsServer:
    """Serve ``/metrics`` on ``address`` from a daemon thread of this process."""
    try:
        host, port = parse_address(address)
    except ValueError as exc:
        raise MetricsError(str(exc)) from None
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(snapshot))
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise MetricsError(f"metrics_address {address!r}: cannot listen: {exc}") from None
    _pause_after_failed_accepts(server)
    running = MetricsServer(server, thread)
    host, port = running.address
    log.info("metrics endpoint listening on http://%s/metrics", _join(host, port))
    return running


def _pause_after_failed_accepts(server: Any) -> None:
    """socketserver drops a failed ``accept`` and selects again at once; out of
    descriptors (EMFILE) the connection stays pending, and its thread would spin a core
    until one is free. It waits instead (it is the endpoint's own thread): ACCEPT_PAUSE,
    doubling up to ACCEPT_PAUSE_MAX while accepting keeps failing."""
    accept = server.get_request
    failures = [0]  # in a row; only the endpoint's thread uses it

    def get_request() -> Any:
        try:
            request = accept()
        except OSError as exc:
            if exc.errno not in _SHORT_OF:
                raise
            failures[0] += 1
            pause = backoff.doubled(failures[0], ACCEPT_PAUSE, ACCEPT_PAUSE_MAX)
            log.error("metrics endpoint cannot accept a connection: %s; retry in %ss",
                      exc, pause)  # fmt: skip
            time.sleep(pause)
            raise
        failures[0] = 0
        return request

    server.get_request = get_request


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
