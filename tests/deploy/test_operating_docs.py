"""docs/operating.md against the code it describes: a table that drifts fails here."""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path
from typing import Dict, List, Set

from deploy_helpers import REPO

from stoqd import childproc, config, ctl, daemon
from stoqd.metrics import start_metrics_server
from stoqd.states import State

OPERATING = REPO / "docs" / "operating.md"


def table_after(heading: str, path: Path = OPERATING) -> List[List[str]]:
    """Rows (cells stripped) of the first Markdown table after ``heading``."""
    text = path.read_text().split(heading, 1)[1]
    rows, started = [], False
    for line in text.splitlines():
        if line.startswith("|"):
            started = True
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            if not set("".join(cells)) <= set("-: "):
                rows.append(cells)
        elif started:
            break
    return rows[1:]  # without the header row


def first_code(cell: str) -> str:
    match = re.search(r"`([^`]+)`", cell)
    return match.group(1) if match else cell


def _full_snapshot() -> Dict:
    """Every part of the status snapshot filled in, so every metric family appears."""
    return {
        "daemon": {"version": "0.1.0", "uptime": 1.0},
        "providers": [{"name": "p", "state": "RUNNING", "restarts": 0, "put": 1,
                       "saved": 1, "failed": 0, "queued": 0}],
        "workers": [{"id": 1, "state": "idle"}],
        "queue": {"depth": 0, "max": 100, "in_flight": 0},
        "counters": {"worker_recycles": 0, "worker_kills": 0, "worker_deaths": 0,
                     "timeouts": 0, "quarantined": 0, "items_given_back": 0,
                     "worker_spawn_failures": 0},
        "scan_seconds": {"hash": {"buckets": [1.0], "counts": [1], "sum": 0.1, "count": 1}},
    }  # fmt: skip


def _exported_families() -> Dict[str, str]:
    with start_metrics_server("127.0.0.1:0", _full_snapshot) as server:
        host, port = server.address
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as response:
            text = response.read().decode()
    return dict(re.findall(r"^# TYPE (stoqd_\w+) (\w+)$", text, re.M))


def test_metrics_table_is_what_the_endpoint_exports() -> None:
    documented = {first_code(row[0]): row[1] for row in table_after("## Metrics")}
    assert documented == _exported_families()


def test_daemon_exit_codes_table() -> None:
    documented = {int(row[0]) for row in table_after("## Exit codes")}
    assert documented == {0, 1, childproc.EXIT_BOOT, daemon.EX_UNAVAILABLE, config.EX_CONFIG}


def test_stoqctl_exit_codes_table() -> None:
    documented = {int(row[0]) for row in table_after("Exit codes, in supervisorctl's LSB style")}
    codes = {ctl.EXIT_OK, ctl.EXIT_REFUSED, ctl.EXIT_USAGE, ctl.EXIT_FATAL, ctl.EXIT_DOWN}
    assert documented == codes


def test_provider_states_table() -> None:
    assert {first_code(row[0]) for row in table_after("## States")} == {s.value for s in State}


def _logged_events(*modules: str) -> Set[str]:
    events: Set[str] = set()
    for module in modules:
        source = (REPO / "stoqd" / module).read_text()
        events |= set(re.findall(r'\.(?:info|warning|error)\(\s*"(\w+)"', source))
    return events


def test_every_supervisor_event_is_documented() -> None:
    documented: Set[str] = set()
    for row in table_after("The supervisor's lifecycle events"):
        documented |= set(re.findall(r"`(\w+)`", row[0]))
    assert _logged_events("supervisor.py", "daemon.py") <= documented


def test_every_file_the_docs_name_exists() -> None:
    for doc in (OPERATING, REPO / "docs" / "architecture.md"):
        text = doc.read_text()
        # `stoqd/x.py`-style names are relative to the repository; links to the doc itself.
        named = [REPO / p for p in re.findall(r"`((?:stoqd|providers|deploy)/[\w./-]*)`", text)]
        named += [
            doc.parent / link.split("#")[0]
            for link in re.findall(r"\]\(([^)]+)\)", text)
            if not link.startswith(("http:", "https:", "#"))
        ]
        assert len(named) > 5, doc
        for path in named:
            assert path.exists(), f"{doc.name} names {path}, which does not exist"
