"""SIGKILL at any moment: children killed in a loop while payloads flow lose nothing and
deadlock nothing. The kills land wherever they land (mid-put, mid-get, mid-save)."""

from __future__ import annotations

import os
import random
import signal
import time
from typing import Any, Callable, Dict, List, Tuple

from stoqd.ctl import DaemonDown, request

from .helpers import Run

COUNT = 3000
KILLS = 15


def _victims(status: Dict[str, Any]) -> List[Tuple[str, int]]:
    """Live children: every worker, and the provider while it is RUNNING."""
    victims = [(f"worker {w['id']}", w["pid"]) for w in status["workers"] if w["pid"]]
    for provider in status["providers"]:
        if provider["state"] == "RUNNING" and provider["pid"]:
            victims.append((f"provider {provider['name']}", provider["pid"]))
    return victims


def test_sigkilling_children_while_payloads_flow_loses_nothing(
    make_run: Callable[..., Run],
) -> None:
    run = make_run({
        "core": {"providers": "source", "max_queue": 100},
        # Killed children must never make the provider FATAL or quarantine a payload:
        # the point is that everything gets through.
        "stoqd": {"startretries": 1000, "max_attempts": 1000, "startsecs": 0.5},
        "source": {"count": COUNT, "delay": 0.001, "resume": "true",
                   "outcomes": "{dir}/outcomes"},
    })  # fmt: skip
    daemon = run.start()
    daemon.wait_for(lambda s: s["providers"][0]["saved"] > 0, what="payloads flowing")
    rng = random.Random(1234)
    killed: List[str] = []
    while len(killed) < KILLS and daemon.process.poll() is None:
        try:
            status = request(str(daemon.socket), {"cmd": "status"})["status"]
        except (DaemonDown, OSError, ValueError):
            break  # it finished and is exiting
        victims = _victims(status)
        if victims:
            what, pid = rng.choice(victims)
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(f"{what} (pid {pid})")
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    assert daemon.wait_exit(timeout=120) == 0, daemon.log()
    assert len(killed) >= 10, f"the source finished before the kills: {killed}"

    saved = run.saved_ids()
    missing = [f"item-{i}" for i in range(1, COUNT + 1) if saved[f"item-{i}"] == 0]
    assert missing == [], f"lost after killing {killed}"
    assert set(saved) == {f"item-{i}" for i in range(1, COUNT + 1)}
    # Outcomes that reached the provider are never failures; "saved" ones are true.
    statuses = {o[1] for o in run.outcomes()}
    assert statuses <= {"saved"}
    recorded = {o[0] for o in run.outcomes()}
    assert recorded <= set(saved)
    assert any(e["event"] == "exited" and e.get("exit") == "killed by SIGKILL"
               for e in daemon.events()), killed  # fmt: skip
