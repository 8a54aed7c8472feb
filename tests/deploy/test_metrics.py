"""The Prometheus endpoint, scraped over real HTTP from a canned status snapshot."""

from __future__ import annotations

import logging
import socket
import urllib.request
from typing import Any, Dict, List

import pytest

from stoqd.metrics import MetricsError, ScanHistogram, parse_address, start_metrics_server


def _snapshot() -> Dict[str, Any]:
    hashes = ScanHistogram(buckets=(0.01, 0.1, 1.0))
    for seconds in (0.004, 0.01, 0.05, 2.0):
        hashes.observe(seconds)
    return {
        "daemon": {"pid": 100, "version": "0.1.0", "uptime": 12.5},
        "providers": [
            {"name": "dirmon", "state": "RUNNING", "pid": 101, "restarts": 2, "put": 10,
             "saved": 8, "failed": 1},
            {"name": "rabbitmq", "state": "BACKOFF", "pid": None, "restarts": 5, "put": 0,
             "saved": 0, "failed": 0},
        ],
        "workers": [
            {"id": 0, "pid": 200, "payloads": 6, "recycles": 1, "kills": 0},
            {"id": 1, "pid": 201, "payloads": 3, "recycles": 0, "kills": 1},
        ],
        "queue": {"depth": 4, "in_flight": 2},
        "scan_seconds": {"hash": hashes.to_dict()},
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
        "stoqd_queue_depth 4.0",
        "stoqd_queue_in_flight 2.0",
        "stoqd_workers 2.0",
        'stoqd_worker_payloads_total{worker="0"} 6.0',
        'stoqd_worker_recycles_total{worker="0"} 1.0',
        'stoqd_worker_kills_total{worker="1"} 1.0',
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


def test_malformed_parts_are_left_out() -> None:
    def snapshot() -> Dict[str, Any]:
        return {
            "providers": [{"name": "odd", "state": "WEIRD", "put": "many"}, "junk"],
            "queue": {"depth": None},
            "scan_seconds": {
                "short": {"buckets": [1.0], "counts": [], "sum": 0, "count": 0},
                "unsorted": {"buckets": [1.0, 0.5], "counts": [1, 1], "sum": 1, "count": 2},
            },
        }

    with start_metrics_server("127.0.0.1:0", snapshot) as server:
        lines = _scrape(server.address)
    assert 'stoqd_provider_state{provider="odd",state="WEIRD"} 1.0' in lines
    assert not [line for line in lines if line.startswith("stoqd_provider_items_put_total")]
    assert not [line for line in lines if line.startswith("stoqd_queue_depth")]
    assert not [line for line in lines if line.startswith("stoqd_scan_duration_seconds_")]
    assert "stoqd_snapshot_success 1.0" in lines


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
