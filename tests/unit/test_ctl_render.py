"""stoqctl's table: the shipped providers' headline figures, not their every statistic."""

from __future__ import annotations

from typing import Any, Dict

from stoqd.ctl import render


def _status(stats: Dict[str, Any]) -> Dict[str, Any]:
    provider = {
        "name": "p",
        "state": "RUNNING",
        "pid": 7,
        "uptime": 61.0,
        "restarts": 0,
        "put": 5,
        "saved": 4,
        "failed": 0,
        "stats": stats,
    }
    return {
        "daemon": {"state": "running", "pid": 1, "uptime": 62.0},
        "providers": [provider],
        "workers": [],
        "queue": {"depth": 0, "max": 100, "in_flight": 1},
    }


def _info(stats: Dict[str, Any]) -> str:
    lines = render(_status(stats)).splitlines()
    return lines[3][lines[2].index("INFO") :]


def test_a_directory_provider_shows_its_backlog_and_oldest_file() -> None:
    stats = {"claimed": 5, "backlog": 4, "oldest_age": 12.46, "in_flight": 1, "events": 99}
    assert _info(stats) == "backlog=4, oldest_age=12.5, in_flight=1"


def test_zeromq_says_it_has_no_acknowledgement() -> None:
    stats = {"connection": "bound", "acknowledgement": "none: ZeroMQ has no acks", "sub": 1}
    assert _info(stats) == "connection=bound, acknowledgement=none"


def test_a_provider_of_ones_own_shows_everything_it_reports() -> None:
    assert _info({"files": 3, "mood": "fine"}) == "files=3, mood=fine"
