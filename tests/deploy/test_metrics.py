"""The Prometheus endpoint, scraped over real HTTP from a canned status snapshot."""

from __future__ import annotations

import gc
import logging
import os
import resource
import socket
import time
import urllib.request
from pathlib import Path
from typing import Any, Dict, List

import pytest
from deploy_helpers import free_port, held_config

from stoqd.metrics import MetricsError, parse_address, start_metrics_server
from stoqd.testing import Daemon


def _snapshot() -> Dict[str, Any]:
    """The shape ``stoqctl status --json`` prints (stoqd.control.commands.status)."""
    return {
        "daemon": {"pid": 100, "version": "0.1.0", "state": "running", "uptime": 12.5},
        "providers": [
            {"name": "dirmon", "state": "RUNNING", "pid": 101, "restarts": 2, "put": 10,
             "saved": 8, "failed": 1, "adopted": 3, "queued": 1, "last_error": None},
            {"name": "rabbitmq", "state": "BACKOFF", "pid": None, "restarts": 5, "put": 0,
             "saved": 0, "failed": 0, "queued": 0, "last_error": "connection refused"},
        ],
        "workers": [
            {"id": 3, "pid": 200, "state": "busy", "current": None, "payloads": 6},
            {"id": 4, "pid": 201, "state": "idle", "current": None, "payloads": 3},
        ],
        "queue": {"depth": 4, "max": 100, "in_flight": 2},
        "counters": {"worker_recycles": 1, "worker_kills": 2, "worker_deaths": 0,
                     "timeouts": 2, "quarantined": 0},
        "scan_seconds": {
            # cumulative: 2 scans <= 0.01 s, 3 <= 0.1 s, 3 <= 1 s, 4 in all
            "hash": {"buckets": [0.01, 0.1, 1.0], "counts": [2, 3, 3], "sum": 2.064,
                     "count": 4},
        },
    }  # fmt: skip


def _scrape(address: tuple) -> List[str]:
    host, port = address
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        return response.read().decode().splitlines()


def test_scrape_shows_the_snapshot() -> None:
    with start_metrics_server("127.0.0.1:0", _snapshot) as server:
        lines = _scrape(server.address)
    for expected in [
        "stoqd_snapshot_success 1.0",
        'stoqd_info{version="0.1.0"} 1.0',
        "stoqd_uptime_seconds 12.5",
        'stoqd_provider_state{provider="dirmon",state="RUNNING"} 1.0',
        'stoqd_provider_state{provider="dirmon",state="BACKOFF"} 0.0',
        'stoqd_provider_state{provider="rabbitmq",state="BACKOFF"} 1.0',
        'stoqd_provider_state{provider="rabbitmq",state="RUNNING"} 0.0',
        "# TYPE stoqd_provider_restarts_total counter",
        'stoqd_provider_restarts_total{provider="dirmon"} 2.0',
        'stoqd_provider_restarts_total{provider="rabbitmq"} 5.0',
        'stoqd_provider_items_put_total{provider="dirmon"} 10.0',
        'stoqd_provider_items_saved_total{provider="dirmon"} 8.0',
        'stoqd_provider_items_failed_total{provider="dirmon"} 1.0',
        'stoqd_provider_items_adopted_total{provider="dirmon"} 3.0',
        "stoqd_queue_depth 4.0",
        "stoqd_queue_in_flight 2.0",
        "stoqd_queue_max 100.0",
        'stoqd_provider_items_queued{provider="dirmon"} 1.0',
        'stoqd_workers{state="busy"} 1.0',
        'stoqd_workers{state="idle"} 1.0',
        'stoqd_workers{state="starting"} 0.0',
        "# TYPE stoqd_worker_recycles_total counter",
        "stoqd_worker_recycles_total 1.0",
        "stoqd_worker_kills_total 2.0",
        "stoqd_worker_deaths_total 0.0",
        "stoqd_timeouts_total 2.0",
        "stoqd_quarantined_total 0.0",
        "# TYPE stoqd_scan_duration_seconds histogram",
        'stoqd_scan_duration_seconds_bucket{le="0.01",plugin="hash"} 2.0',
        'stoqd_scan_duration_seconds_bucket{le="0.1",plugin="hash"} 3.0',
        'stoqd_scan_duration_seconds_bucket{le="1.0",plugin="hash"} 3.0',
        'stoqd_scan_duration_seconds_bucket{le="+Inf",plugin="hash"} 4.0',
        'stoqd_scan_duration_seconds_count{plugin="hash"} 4.0',
        'stoqd_scan_duration_seconds_sum{plugin="hash"} 2.064',
    ]:
        assert expected in lines, expected
    # One-hot: exactly one state per provider is 1.
    ones = [
        line for line in lines if line.startswith("stoqd_provider_state{") and line[-3:] == "1.0"
    ]
    assert len(ones) == 2


def test_scrape_reflects_the_snapshot_at_scrape_time() -> None:
    depth = {"value": 1}

    def snapshot() -> Dict[str, Any]:
        return {"queue": {"depth": depth["value"], "in_flight": 0}}

    with start_metrics_server("127.0.0.1:0", snapshot) as server:
        assert "stoqd_queue_depth 1.0" in _scrape(server.address)
        depth["value"] = 7
        assert "stoqd_queue_depth 7.0" in _scrape(server.address)


def test_failing_snapshot_reports_zero_and_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> Dict[str, Any]:
        raise RuntimeError("supervisor is gone")

    with caplog.at_level(logging.WARNING, logger="stoqd.metrics"):
        with start_metrics_server("127.0.0.1:0", broken) as server:
            first = _scrape(server.address)
            _scrape(server.address)
    assert "stoqd_snapshot_success 0.0" in first
    assert not [line for line in first if line.startswith("stoqd_queue")]
    assert [r.getMessage() for r in caplog.records if r.name == "stoqd.metrics"] == [
        "metrics: cannot read the status snapshot: supervisor is gone"
    ]


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_a_connection_it_cannot_accept_waits_without_spinning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with start_metrics_server("127.0.0.1:0", _snapshot) as server:
        client = socket.socket()  # its descriptor before the limit; connecting needs none
        before = resource.getrlimit(resource.RLIMIT_NOFILE)
        gc.collect()  # nothing of this process is closed by the collector meanwhile
        gc.disable()
        listed = {int(fd) for fd in os.listdir("/proc/self/fd")}
        taken = {fd for fd in listed if _is_open(fd)}  # not the listing's own, closed now
        lowest_free = min(n for n in range(max(taken) + 2) if n not in taken)
        try:
            with caplog.at_level(logging.ERROR, logger="stoqd.metrics"):
                # No descriptor is left for this process, the endpoint's thread included.
                resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, before[1]))
                try:
                    client.connect(server.address)  # completed by the kernel, not accepted
                    time.sleep(1.2)
                finally:
                    resource.setrlimit(resource.RLIMIT_NOFILE, before)
                    gc.enable()
            failures = [r.getMessage() for r in caplog.records if r.name == "stoqd.metrics"]
            # Tried again after 0.5 s, then 1 s: not in a loop spinning on the socket.
            assert 1 <= len(failures) <= 3, failures
            assert (
                failures[:2]
                == [
                    "metrics endpoint cannot accept a connection: [Errno 24] Too many open "
                    f"files; retry in {pause}s"
                    for pause in (0.5, 1.0)
                ][: len(failures)]
            )
            client.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            client.settimeout(10)
            assert client.recv(12) == b"HTTP/1.0 200"
        finally:
            client.close()


def test_malformed_parts_are_left_out() -> None:
    def snapshot() -> Dict[str, Any]:
        return {
            "providers": [{"name": "odd", "state": "WEIRD", "put": "many"}, "junk"],
            "queue": {"depth": None},
            "scan_seconds": {
                "short": {"buckets": [1.0], "counts": [], "sum": 0, "count": 0},
                "unsorted": {"buckets": [1.0, 0.5], "counts": [1, 1], "sum": 1, "count": 2},
                "falling": {"buckets": [0.5, 1.0], "counts": [2, 1], "sum": 1, "count": 2},
            },
            "counters": {"Bad Name": 1, "new_counter": 3, "junk": "x"},
        }

    with start_metrics_server("127.0.0.1:0", snapshot) as server:
        lines = _scrape(server.address)
    assert 'stoqd_provider_state{provider="odd",state="WEIRD"} 1.0' in lines
    assert not [line for line in lines if line.startswith("stoqd_provider_items_put_total")]
    assert not [line for line in lines if line.startswith("stoqd_queue_depth")]
    assert not [line for line in lines if line.startswith("stoqd_scan_duration_seconds_")]
    assert "stoqd_snapshot_success 1.0" in lines
    assert "stoqd_new_counter_total 3.0" in lines  # a counter added later still shows
    assert not [line for line in lines if "Bad" in line or "junk" in line]


def test_close_frees_the_port() -> None:
    server = start_metrics_server("127.0.0.1:0", dict)
    host, port = server.address
    server.close()
    with socket.socket() as probe:
        probe.bind((host, port))  # raises if the endpoint still held it


def test_port_in_use_is_one_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(MetricsError) as error:
            start_metrics_server(f"127.0.0.1:{port}", dict)
    assert str(error.value).startswith(f"metrics_address '127.0.0.1:{port}': cannot listen: ")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9464", ("127.0.0.1", 9464)),
        (":9464", ("0.0.0.0", 9464)),
        ("[::1]:9464", ("::1", 9464)),
        ("localhost:0", ("localhost", 0)),
    ],
)
def test_parse_address(text: str, expected: tuple) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["9464", "host:", "host:port", "host:70000", ""])
def test_bad_address_is_named(text: str) -> None:
    with pytest.raises(MetricsError) as error:
        start_metrics_server(text, dict)
    assert str(error.value) == (
        f"metrics_address {text!r}: expected host:port, for example 127.0.0.1:9464"
    )


def test_live_daemon_is_scraped(short_dir: Path) -> None:
    port = free_port()
    config = held_config(short_dir, metrics_address=f"127.0.0.1:{port}")
    daemon = Daemon(config)
    try:
        daemon.wait_for(lambda s: s["providers"][0]["saved"] == 3, what="3 saved")
        expected = {
            'stoqd_provider_state{provider="heldprov",state="RUNNING"} 1.0',
            'stoqd_provider_items_put_total{provider="heldprov"} 3.0',
            'stoqd_provider_items_saved_total{provider="heldprov"} 3.0',
            'stoqd_provider_items_failed_total{provider="heldprov"} 0.0',
            'stoqd_scan_duration_seconds_count{plugin="hash"} 3.0',
            # Cumulative: the three quick scans are counted under every bound.
            'stoqd_scan_duration_seconds_bucket{le="5.0",plugin="hash"} 3.0',
            'stoqd_scan_duration_seconds_bucket{le="300.0",plugin="hash"} 3.0',
            'stoqd_workers{state="idle"} 1.0',
            "stoqd_queue_depth 0.0",
        }
        # The endpoint serves the snapshot the loop refreshes about once a second.
        deadline = time.monotonic() + 20
        lines: List[str] = []
        while time.monotonic() < deadline and not expected <= set(lines):
            lines = _scrape(("127.0.0.1", port))
            time.sleep(0.2)
        assert expected <= set(lines), "\n".join(sorted(expected - set(lines)))
    finally:
        daemon.close()
