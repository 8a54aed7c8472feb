"""Helpers for the daemon tests: a configured stoqd run and what it wrote, polling, stoqctl."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Tuple

from stoqd.testing import Daemon, complete_lines, read_jsonl, wait_until, write_config

PLUGINS = Path(__file__).resolve().parents[1] / "fixtures" / "daemon_plugins"

# Small and quick: two workers, restarts within a tenth of a second.
BASE_CONFIG: Dict[str, Dict[str, Any]] = {
    "core": {
        "plugin_dir_list": str(PLUGINS),
        "connectors": "jsonl",
        "always_dispatch": "hash",
        "max_queue": 100,
    },
    "stoqd": {
        "workers": 2,
        "backoff_initial": 0.05,
        "backoff_max": 0.2,
        "startsecs": 1,
        "startretries": 3,
        "graceful_timeout": 10,
        "scan_timeout": 60,
    },
}

Outcome = Tuple[str, str, str]  # id, status, error ("-" for none)


class Run:
    """One daemon under test: its directory, its process, and what it wrote."""

    def __init__(self, directory: Path, sections: Dict[str, Dict[str, Any]]) -> None:
        self.dir = directory
        self.results_path = directory / "results.jsonl"
        self.daemons: List[Daemon] = []
        self.configure(sections)

    def configure(self, sections: Dict[str, Dict[str, Any]]) -> Path:
        """(Re)write ``stoq.cfg``: the base settings overridden by ``sections``, where
        ``{dir}`` in a value stands for the run's directory."""
        merged = {name: dict(values) for name, values in BASE_CONFIG.items()}
        for name, values in sections.items():
            merged.setdefault(name, {}).update(values)
        for values in merged.values():  # "{dir}" stands for this run's directory
            for key, value in values.items():
                if isinstance(value, str):
                    values[key] = value.replace("{dir}", str(self.dir))
        merged.setdefault("jsonl", {}).setdefault("output_file", str(self.results_path))
        self.config = write_config(self.dir, merged)
        return self.config

    def path(self, name: str) -> str:
        return str(self.dir / name)

    def start(self) -> Daemon:
        daemon = Daemon(self.config)
        self.daemons.append(daemon)
        return daemon

    @property
    def daemon(self) -> Daemon:
        return self.daemons[-1]

    def results(self) -> List[Dict[str, Any]]:
        """Every result line the ``jsonl`` connector wrote."""
        return read_jsonl(self.results_path)

    def saved_ids(self) -> Counter[str]:
        """How many results were saved for each payload id (``extra_data["id"]``)."""
        ids: Counter[str] = Counter()
        for result in self.results():
            for payload in result["results"]:
                item_id = payload["payload_meta"]["extra_data"].get("id")
                if item_id is not None and payload["extracted_from"] is None:
                    ids[item_id] += 1
        return ids

    def failure_records(self) -> List[List[str]]:
        """The ``errors["stoqd"]`` of results saved for items that could not be scanned."""
        return [r["errors"]["stoqd"] for r in self.results() if r["errors"].get("stoqd")]

    def outcomes(self, name: str = "outcomes") -> List[Outcome]:
        """What a fixture provider recorded through ``done=``: (id, status, error)."""
        out = []
        for line in complete_lines(self.dir / name):
            item_id, status, error = line.split(" ", 2)
            out.append((item_id, status, error))
        return out

    def close(self) -> None:
        for daemon in self.daemons:
            daemon.close()


def stoqctl(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """The ``stoqctl`` command as an operator runs it."""
    return subprocess.run(
        [sys.executable, "-m", "stoqd.ctl", *args], capture_output=True, text=True, timeout=timeout
    )


def wait_stubborn_asleep(daemon: Daemon) -> None:
    """Wait until the ``stubborn`` provider is inside the ``try`` that swallows SIGTERM."""
    wait_until(
        lambda: any(e.get("event") == "stubborn: sleeping" for e in daemon.events()),
        what="the stubborn provider to sleep",
    )
