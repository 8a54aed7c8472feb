"""The worker pool: a hard per-payload time limit, quarantine of payloads that kill their
workers, and recycling, each seen in results, outcomes, status and the log."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any, Callable, Dict

from stoqd.supervisor import PREFETCH, PREFETCH_MIN

from .helpers import Run, wait_until


def _source(status: Dict[str, Any]) -> Dict[str, Any]:
    return next(p for p in status["providers"] if p["name"] == "source")


def test_a_payload_over_scan_timeout_is_failed_and_its_worker_replaced(
    make_run: Callable[..., Run],
) -> None:
    run = make_run({
        "core": {"providers": "source", "always_dispatch": "hash, sleepy"},
        "stoqd": {"scan_timeout": 1},
        "sleepy": {"match": "SLEEP", "seconds": 3600},
        "source": {"count": 8, "special": "2", "special_prefix": "SLEEP", "delay": 0.2,
                   "hold_file": "{dir}/release", "outcomes": "{dir}/outcomes"},
    })  # fmt: skip
    daemon = run.start()
    status = daemon.wait_for(lambda s: _source(s)["saved"] + _source(s)["failed"] == 8)
    assert _source(status)["failed"] == 1
    assert status["counters"]["timeouts"] == 1
    assert status["counters"]["worker_kills"] == 1
    spawned = [e["child_pid"] for e in daemon.events() if e["event"] == "spawned" and "worker" in e]
    timeouts = [e for e in daemon.events() if e["event"] == "timeout"]
    assert [e["limit"] for e in timeouts] == [1.0]
    killed = timeouts[0]["child_pid"]
    # The killed worker was replaced by a third one; the pool is two workers again.
    assert len(spawned) == 3 and killed in spawned[:2]
    assert sorted(w["pid"] for w in status["workers"]) == sorted(set(spawned) - {killed})

    outcomes = {
        o[0]: (o[1], o[2]) for o in wait_until(lambda: len(run.outcomes()) == 8 and run.outcomes())
    }
    assert outcomes.pop("item-2") == ("failed", "payload timed out after 1s")
    assert outcomes == {f"item-{i}": ("saved", "-") for i in (1, 3, 4, 5, 6, 7, 8)}
    assert run.failure_records() == [["payload timed out after 1s"]]
    assert set(run.saved_ids()) == {f"item-{i}" for i in (1, 3, 4, 5, 6, 7, 8)}

    Path(run.path("release")).touch()
    assert daemon.wait_exit() == 0, daemon.log()


def test_items_waiting_behind_a_slow_scan_are_given_back_and_scanned_by_another_worker(
    make_run: Callable[..., Run],
) -> None:
    # The nine puts reach stoqd at once, so items are queued behind item-1 in its worker
    # before its scan has even started. item-1 is held until the test releases it; the
    # others must not wait for it.
    run = make_run({
        "core": {"providers": "source", "always_dispatch": "gate"},
        "gate": {"gate_dir": "{dir}"},
        "source": {"count": 9, "special": "1", "special_prefix": "HOLD", "batched": "true",
                   "hold_file": "{dir}/release", "outcomes": "{dir}/outcomes"},
    })  # fmt: skip
    daemon = run.start()
    wait_until(lambda: os.path.exists(run.path("holding")), what="item-1 held",
               detail=daemon.log)  # fmt: skip
    wait_until(lambda: len(run.outcomes()) == 8, what="the 8 items behind it", timeout=30,
               detail=lambda: f"{run.outcomes()}\n{daemon.log()}")  # fmt: skip
    assert sorted(run.outcomes()) == [(f"item-{i}", "saved", "-") for i in range(2, 10)]
    assert daemon.status()["counters"]["items_given_back"] >= 1
    Path(run.path("release")).touch()
    assert daemon.wait_exit() == 0, daemon.log()
    assert run.saved_ids() == {f"item-{i}": 1 for i in range(1, 10)}


def test_a_payload_that_kills_workers_is_quarantined(make_run: Callable[..., Run]) -> None:
    run = make_run({
        "core": {"providers": "source", "always_dispatch": "hash, killer"},
        "stoqd": {"max_attempts": 3},
        "source": {"count": 6, "special": "3", "special_prefix": "KILL",
                   "hold_file": "{dir}/release", "outcomes": "{dir}/outcomes"},
    })  # fmt: skip
    daemon = run.start()
    status = daemon.wait_for(lambda s: _source(s)["saved"] + _source(s)["failed"] == 6)
    assert (_source(status)["saved"], _source(status)["failed"]) == (5, 1)
    assert status["counters"]["quarantined"] == 1
    assert status["counters"]["worker_deaths"] >= 3
    assert len(status["workers"]) == 2  # the pool is whole again

    outcomes = {
        o[0]: (o[1], o[2]) for o in wait_until(lambda: len(run.outcomes()) == 6 and run.outcomes())
    }
    quarantined = "quarantined: killed 3 workers while being scanned"
    assert outcomes.pop("item-3") == ("failed", quarantined)
    assert outcomes == {f"item-{i}": ("saved", "-") for i in (1, 2, 4, 5, 6)}
    assert run.failure_records() == [[quarantined]]
    assert run.saved_ids() == {f"item-{i}": 1 for i in (1, 2, 4, 5, 6)}

    Path(run.path("release")).touch()
    assert daemon.wait_exit() == 0, daemon.log()
    events = daemon.events()
    assert [e["attempts"] for e in events if e["event"] == "quarantined"] == [3]
    killed = [e for e in events if e["event"] == "exited" and e.get("exit") == "killed by SIGKILL"]
    assert len(killed) == 3


def test_workers_are_recycled_after_max_payloads_and_nothing_is_lost(
    make_run: Callable[..., Run],
) -> None:
    run = make_run({
        "core": {"providers": "source"},
        "stoqd": {"workers": 2, "worker_max_payloads": 5},
        "source": {"count": 50, "hold_file": "{dir}/release", "outcomes": "{dir}/outcomes"},
    })  # fmt: skip
    daemon = run.start()
    status = daemon.wait_for(lambda s: _source(s)["saved"] == 50, what="50 saved")
    assert status["counters"]["worker_recycles"] > 0
    assert status["counters"]["worker_deaths"] == 0
    assert all(w["payloads"] <= 5 for w in status["workers"])
    Path(run.path("release")).touch()
    assert daemon.wait_exit() == 0, daemon.log()
    assert run.saved_ids() == {f"item-{i}": 1 for i in range(1, 51)}
    assert sorted(run.outcomes()) == sorted((f"item-{i}", "saved", "-") for i in range(1, 51))
    recycled = [e for e in daemon.events() if e["event"] == "recycling"]
    assert recycled and {e["reason"] for e in recycled} == {"payloads"}
    # Never past the budget, even for a worker whose turn to be recycled waited while
    # another one was being replaced.
    assert {e["payloads"] for e in recycled} == {5}


def test_a_recycled_worker_that_does_not_exit_is_killed_and_the_pool_goes_on(
    make_run: Callable[..., Run],
) -> None:
    # Recycling is one worker at a time and a worker never scans past its budget: one
    # that is told to exit and does not would hold up every later recycling, and then
    # every item. After graceful_timeout it is SIGKILLed.
    run = make_run({
        "core": {"providers": "source", "always_dispatch": "lingering"},
        "stoqd": {"workers": 1, "worker_max_payloads": 2, "graceful_timeout": 1},
        "source": {"count": 6, "hold_file": "{dir}/release", "outcomes": "{dir}/outcomes"},
    })  # fmt: skip
    daemon = run.start()
    wait_until(lambda: len(run.outcomes()) == 6, what="6 outcomes", detail=daemon.log)
    assert sorted(run.outcomes()) == sorted((f"item-{i}", "saved", "-") for i in range(1, 7))
    Path(run.path("release")).touch()
    assert daemon.wait_exit() == 0, daemon.log()
    killed = [e for e in daemon.events() if e["event"] == "exited" and e.get("worker")
              and e.get("exit") == "killed by SIGKILL"]  # fmt: skip
    assert len(killed) >= 2  # the two recycled ones; the last may be killed at shutdown


def test_workers_over_max_rss_are_recycled_one_at_a_time_and_nothing_is_lost(
    make_run: Callable[..., Run],
) -> None:
    # Every Python worker is over 1 MiB: each is replaced in turn, and scanning goes on.
    run = make_run({
        "core": {"providers": "source"},
        "stoqd": {"workers": 2, "worker_max_rss": "1M"},
        "source": {"count": 30, "delay": 0.05, "outcomes": "{dir}/outcomes"},
    })  # fmt: skip
    daemon = run.start()
    assert daemon.wait_exit() == 0, daemon.log()
    assert run.saved_ids() == {f"item-{i}": 1 for i in range(1, 31)}
    recycled = [e for e in daemon.events() if e["event"] == "recycling"]
    assert recycled and {e["reason"] for e in recycled} == {"memory"}
    assert all(e["rss"] > 1 << 20 for e in recycled)


def test_a_worker_killed_while_idle_is_replaced(make_run: Callable[..., Run]) -> None:
    run = make_run({
        "core": {"providers": "source"},
        "source": {"count": 2, "hold_file": "{dir}/release", "outcomes": "{dir}/outcomes"},
    })  # fmt: skip
    daemon = run.start()
    status = daemon.wait_for(lambda s: _source(s)["saved"] == 2 and len(s["workers"]) == 2)
    victim = status["workers"][0]["pid"]
    os.kill(victim, signal.SIGKILL)
    status = daemon.wait_for(
        lambda s: len(s["workers"]) == 2 and victim not in {w["pid"] for w in s["workers"]}
        and all(w["state"] == "idle" for w in s["workers"]),
        what="a replacement worker",
    )  # fmt: skip
    assert status["counters"]["worker_deaths"] == 1
    assert status["counters"]["quarantined"] == 0
    Path(run.path("release")).touch()
    assert daemon.wait_exit() == 0, daemon.log()
    exited = [e for e in daemon.events() if e["event"] == "exited" and e.get("child_pid") == victim]
    assert exited == [] or exited[0]["exit"] == "killed by SIGKILL"
    assert run.saved_ids() == {"item-1": 1, "item-2": 1}


def test_a_full_queue_blocks_the_provider(make_run: Callable[..., Run]) -> None:
    run = make_run({
        "core": {"providers": "source", "always_dispatch": "hash, sleepy", "max_queue": 4},
        "sleepy": {"match": "", "seconds": 0.1},
        "source": {"count": 60, "hold_file": "{dir}/release", "outcomes": "{dir}/outcomes"},
    })  # fmt: skip
    daemon = run.start()
    put_seen = []
    while True:
        status = daemon.wait_for(lambda s: True, what="a status")
        source = _source(status)
        unfinished = source["put"] - source["saved"] - source["failed"]
        # Waiting in the queue: at most max_queue; beyond that only what workers hold, no
        # more than max_queue each either (but at least PREFETCH_MIN).
        assert status["queue"]["depth"] <= 4, status
        assert unfinished <= 4 + 2 * min(PREFETCH, max(PREFETCH_MIN, 4)), status
        put_seen.append(source["put"])
        if source["saved"] == 60:
            break
    assert min(put_seen) < 60  # the provider was held back while the workers were busy
    Path(run.path("release")).touch()
    assert daemon.wait_exit() == 0, daemon.log()
    assert run.saved_ids() == {f"item-{i}": 1 for i in range(1, 61)}
