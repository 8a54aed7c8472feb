"""Provider supervision as an operator sees it: states and errors in ``stoqctl status``,
lifecycle events in the log, the daemon's exit code, and results still being saved."""

from __future__ import annotations

import os
import signal
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Dict, List

from .helpers import PLUGINS, Run, stoqctl, wait_until


def _provider(status: Dict[str, Any], name: str) -> Dict[str, Any]:
    return next(p for p in status["providers"] if p["name"] == name)


def _events(run: Run, event: str, **fields: Any) -> List[Dict[str, Any]]:
    return [
        e
        for e in run.daemon.events()
        if e["event"] == event and all(e.get(k) == v for k, v in fields.items())
    ]


def test_a_crashed_provider_backs_off_then_runs_again(make_run: Callable[..., Run]) -> None:
    run = make_run({
        "core": {"providers": "crash_after"},
        # A backoff long enough to be seen in the status; jitter keeps it within 1.5-3 s.
        "stoqd": {"backoff_initial": 3, "backoff_max": 3},
        "crash_after": {"count": 10, "crash_after": 3, "marker": "{dir}/crashed",
                        "hold_file": "{dir}/release", "outcomes": "{dir}/outcomes"},
    })  # fmt: skip
    daemon = run.start()
    backoff = daemon.wait_for(
        lambda s: _provider(s, "crash_after")["state"] == "BACKOFF", what="BACKOFF"
    )
    crashed = _provider(backoff, "crash_after")
    crashed_pid = _events(run, "spawned", provider="crash_after")[0]["child_pid"]
    assert crashed["last_error"] == "RuntimeError: crash_after: source lost after 3 items"
    assert crashed["restarts"] == 0
    assert crashed["pid"] is None
    assert 0 < crashed["next_retry_in"] <= 3

    running = daemon.wait_for(
        lambda s: (
            _provider(s, "crash_after")["state"] == "RUNNING"
            and _provider(s, "crash_after")["restarts"] == 1
        ),
        what="RUNNING after one restart",
    )
    assert _provider(running, "crash_after")["pid"] not in (None, crashed["pid"])
    wait_until(lambda: len(run.outcomes()) >= 7, what="the second run's outcomes")

    Path(run.path("release")).touch()
    assert daemon.wait_exit() == 0, daemon.log()
    # What the first run put before it crashed was still scanned and saved.
    assert run.saved_ids() == {f"crash-{i}": 1 for i in range(1, 11)}
    assert {o for o in run.outcomes() if o[0] not in ("crash-1", "crash-2", "crash-3")} == {
        (f"crash-{i}", "saved", "-") for i in range(4, 11)
    }
    backoffs = _events(run, "backoff", provider="crash_after")
    assert [e["error"] for e in backoffs] == [crashed["last_error"]]
    assert backoffs[0]["exit"] == "exit 1"
    assert len(_events(run, "spawned", provider="crash_after")) == 2
    # The provider's own log line says which process it came from.
    failed = [e for e in daemon.events() if e["event"] == "ingest_failed"]
    assert [(e["proc"], e["pid"], e["error"]) for e in failed] == [
        ("provider:crash_after", crashed_pid, crashed["last_error"])
    ]
    assert len(_events(run, "exhausted", provider="crash_after")) == 1


def test_a_crash_loop_is_fatal_after_startretries_and_the_daemon_exits_1(
    make_run: Callable[..., Run],
) -> None:
    run = make_run({
        "core": {"providers": "crash_loop, source"},
        "stoqd": {"startretries": 3},
        "source": {"count": 5, "outcomes": "{dir}/outcomes"},
    })  # fmt: skip
    daemon = run.start()
    assert daemon.wait_exit() == 1, daemon.log()
    error = "ConnectionRefusedError: crash_loop: cannot reach the source"
    assert len(_events(run, "spawned", provider="crash_loop")) == 4  # the first start + 3 retries
    assert len(_events(run, "backoff", provider="crash_loop", error=error)) == 3
    fatal = _events(run, "fatal", provider="crash_loop")
    assert [(e["failures"], e["error"]) for e in fatal] == [(4, error)]
    stopping = _events(run, "stopping")
    assert stopping[0]["reason"] == "every provider is finished; fatal: ['crash_loop']"
    # The other provider was not disturbed.
    assert run.saved_ids() == {f"item-{i}": 1 for i in range(1, 6)}
    assert {o[1] for o in run.outcomes()} == {"saved"}


def test_a_provider_that_stayed_up_past_startsecs_is_never_fatal(
    make_run: Callable[..., Run],
) -> None:
    """Each crash comes after more than startsecs of running, so each one resets the
    failure count: more crashes than startretries allows in a row, and still no FATAL."""
    run = make_run({
        "core": {"providers": "crash_loop"},
        "stoqd": {"startsecs": 0.5, "startretries": 1},
        "crash_loop": {"after": 0.8},
    })  # fmt: skip
    daemon = run.start()
    status = daemon.wait_for(
        lambda s: _provider(s, "crash_loop")["restarts"] >= 4, timeout=60, what="4 restarts"
    )
    assert _provider(status, "crash_loop")["state"] != "FATAL"
    assert _events(run, "fatal", provider="crash_loop") == []
    assert len(_events(run, "backoff", provider="crash_loop")) >= 4


def test_per_provider_startretries_override(make_run: Callable[..., Run]) -> None:
    run = make_run({
        "core": {"providers": "crash_loop"},
        "stoqd": {"startretries": 3},
        "stoqd:crash_loop": {"startretries": 1},
    })  # fmt: skip
    daemon = run.start()
    assert daemon.wait_exit() == 1, daemon.log()
    assert len(_events(run, "spawned", provider="crash_loop")) == 2


def test_stoqctl_status_exits_3_while_a_provider_is_fatal(make_run: Callable[..., Run]) -> None:
    run = make_run({"core": {"providers": "crash_loop, hang"}})
    daemon = run.start()
    # Both settled: crash_loop can be FATAL before hang has reported ready.
    status = daemon.wait_for(
        lambda s: (
            _provider(s, "crash_loop")["state"] == "FATAL"
            and _provider(s, "hang")["state"] == "RUNNING"
        ),
        what="crash_loop FATAL and hang RUNNING",
    )
    fatal = _provider(status, "crash_loop")
    assert (fatal["restarts"], fatal["pid"]) == (3, None)
    assert fatal["last_error"] == "ConnectionRefusedError: crash_loop: cannot reach the source"
    assert _provider(status, "hang")["state"] == "RUNNING"
    shown = stoqctl("-s", str(daemon.socket), "status")
    assert shown.returncode == 3, shown.stderr
    line = next(ln for ln in shown.stdout.splitlines() if ln.startswith("crash_loop "))
    assert line.split()[:3] == ["crash_loop", "FATAL", "-"]
    assert "error: ConnectionRefusedError: crash_loop: cannot reach the source" in line
    assert stoqctl("-s", str(daemon.socket), "status", "--json").returncode == 3


def test_a_provider_that_cannot_import_is_fatal_at_once(make_run: Callable[..., Run]) -> None:
    run = make_run({
        "core": {"providers": "broken_import, source"},
        "source": {"count": 30, "delay": 0.1, "hold_file": "{dir}/release",
                   "outcomes": "{dir}/outcomes"},
    })  # fmt: skip
    daemon = run.start()
    status = daemon.wait_for(
        lambda s: _provider(s, "broken_import")["state"] == "FATAL", what="FATAL"
    )
    broken = _provider(status, "broken_import")
    module = PLUGINS / "broken_import" / "broken_import.stoq"
    assert broken["last_error"] == (
        f"StoqPluginException: plugin broken_import: cannot import {module}: "
        "ModuleNotFoundError: No module named 'stoqd_tests_no_such_dependency'"
    )
    assert (broken["restarts"], broken["pid"]) == (0, None)
    _the_other_provider_and_the_workers_carry_on(run, status)


def test_a_provider_that_rejects_its_options_is_fatal_at_once(
    make_run: Callable[..., Run],
) -> None:
    run = make_run({
        "core": {"providers": "bad_options, source"},
        "source": {"count": 30, "delay": 0.1, "hold_file": "{dir}/release",
                   "outcomes": "{dir}/outcomes"},
    })  # fmt: skip
    daemon = run.start()
    status = daemon.wait_for(
        lambda s: _provider(s, "bad_options")["state"] == "FATAL", what="FATAL"
    )
    bad = _provider(status, "bad_options")
    assert bad["last_error"] == (
        "StoqPluginException: plugin bad_options: option direction 'sideways' must be up or down"
    )
    assert (bad["restarts"], bad["pid"]) == (0, None)
    _the_other_provider_and_the_workers_carry_on(run, status)


def _the_other_provider_and_the_workers_carry_on(run: Run, status: Dict[str, Any]) -> None:
    daemon = run.daemon
    workers = sorted(w["pid"] for w in status["workers"])
    later = daemon.wait_for(lambda s: _provider(s, "source")["saved"] == 30, what="30 saved")
    assert _provider(later, "source")["state"] == "RUNNING"
    assert sorted(w["pid"] for w in later["workers"]) == workers
    # Results kept coming after the other provider was declared FATAL.
    fatal_at = next(e["timestamp"] for e in daemon.events() if e["event"] == "fatal")
    last_result = max(datetime.fromisoformat(r["time"]) for r in run.results())
    assert last_result > datetime.fromisoformat(fatal_at)
    Path(run.path("release")).touch()
    # One provider FATAL because it could not start: a configuration problem, exit 78
    # (a crash loop is 1), so systemd's RestartPreventExitStatus=78 does not restart it.
    assert daemon.wait_exit() == 78, daemon.log()
    assert run.saved_ids() == {f"item-{i}": 1 for i in range(1, 31)}
    assert len(run.outcomes()) == 30
    assert len([e for e in daemon.events() if e["event"] == "spawned" and "worker" in e]) == 2
    assert not os.path.exists(daemon.socket)


def test_a_provider_killed_by_sigkill_is_restarted(make_run: Callable[..., Run]) -> None:
    run = make_run({
        "core": {"providers": "source"},
        "source": {"count": 5, "resume": "true", "hold_file": "{dir}/release",
                   "outcomes": "{dir}/outcomes"},
    })  # fmt: skip
    daemon = run.start()
    status = daemon.wait_for(lambda s: _provider(s, "source")["saved"] == 5, what="5 saved")
    wait_until(lambda: len(run.outcomes()) == 5, what="5 outcomes")
    first_pid = _provider(status, "source")["pid"]
    os.kill(first_pid, signal.SIGKILL)
    status = daemon.wait_for(
        lambda s: (
            _provider(s, "source")["state"] == "RUNNING" and _provider(s, "source")["restarts"] == 1
        ),
        what="RUNNING after a restart",
    )
    assert _provider(status, "source")["pid"] not in (None, first_pid)
    backoff = _events(run, "backoff", provider="source")
    assert [(e["exit"], e["error"]) for e in backoff] == [
        ("killed by SIGKILL", "killed by SIGKILL")
    ]
    Path(run.path("release")).touch()
    assert daemon.wait_exit() == 0, daemon.log()
    # The restarted run found every id acknowledged and put nothing again.
    assert run.saved_ids() == {f"item-{i}": 1 for i in range(1, 6)}


def test_a_provider_backing_off_at_shutdown_is_stopped(make_run: Callable[..., Run]) -> None:
    run = make_run({
        "core": {"providers": "crash_loop, hang"},
        "stoqd": {"backoff_initial": 30, "backoff_max": 30},
    })  # fmt: skip
    daemon = run.start()
    daemon.wait_for(lambda s: _provider(s, "crash_loop")["state"] == "BACKOFF", what="BACKOFF")
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit() == 0, daemon.log()
    assert len(_events(run, "spawned", provider="crash_loop")) == 1  # not restarted to stop it


def _redeliver(make_run: Callable[..., Run], sections: Dict[str, Dict[str, Any]],
               **options: Any) -> Run:  # fmt: skip
    """A run of the ``redeliver`` provider (puts, SIGKILLs itself, puts again)."""
    merged = {name: dict(values) for name, values in sections.items()}
    merged.setdefault("core", {})["providers"] = "redeliver"
    merged["redeliver"] = {"marker": "{dir}/marker", "outcomes": "{dir}/outcomes", **options}
    return make_run(merged)


def test_a_killed_providers_redeliveries_get_its_outcomes_and_are_not_scanned_twice(
    make_run: Callable[..., Run],
) -> None:
    # Items 1 and 2 are still being scanned when the restarted run puts them again (they
    # are answered when they finish); the others may be saved by then (answered at once).
    run = _redeliver(
        make_run,
        {"core": {"always_dispatch": "hash, sleepy"}, "sleepy": {"match": "SLOW", "seconds": 1.5}},
        count=6, special="1, 2", special_prefix="SLOW",
    )  # fmt: skip
    daemon = run.start()
    assert daemon.wait_exit() == 0, daemon.log()
    ids = [f"redeliver-{i}" for i in range(1, 7)]
    assert run.saved_ids() == {item_id: 1 for item_id in ids}
    assert sorted(run.outcomes()) == [(item_id, "saved", "-") for item_id in ids]
    assert sorted(e["key"] for e in _events(run, "adopted", provider="redeliver")) == ids
    assert [e["exit"] for e in _events(run, "backoff", provider="redeliver")] == [
        "killed by SIGKILL"
    ]


def test_a_redelivery_of_an_item_still_being_scanned_waits_for_its_outcome(
    make_run: Callable[..., Run],
) -> None:
    # redeliver-1 is held in a worker until the test releases it, so the restarted run's
    # put of it is adopted while that item is still queued or being scanned, and can only
    # be answered when its one scan ends: never at once, never twice.
    run = _redeliver(
        make_run,
        {"core": {"always_dispatch": "gate"}, "gate": {"gate_dir": "{dir}"}},
        count=3, special="1", special_prefix="HOLD",
    )  # fmt: skip
    daemon = run.start()
    wait_until(lambda: os.path.exists(run.path("holding")), what="redeliver-1 held",
               detail=daemon.log)  # fmt: skip
    wait_until(lambda: len(_events(run, "adopted", provider="redeliver")) == 3,
               what="3 adoptions", detail=daemon.log)  # fmt: skip
    time.sleep(0.5)  # room for a wrong answer to redeliver-1 to arrive, were there one
    assert "redeliver-1" not in [item_id for item_id, _, _ in run.outcomes()]
    Path(run.path("release")).touch()
    assert daemon.wait_exit() == 0, daemon.log()
    ids = [f"redeliver-{i}" for i in range(1, 4)]
    assert run.saved_ids() == {item_id: 1 for item_id in ids}
    assert sorted(run.outcomes()) == [(item_id, "saved", "-") for item_id in ids]


def test_a_reused_key_that_the_source_says_is_new_is_scanned_again(
    make_run: Callable[..., Run],
) -> None:
    run = _redeliver(make_run, {}, count=3, new_messages="true")
    daemon = run.start()
    assert daemon.wait_exit() == 0, daemon.log()
    ids = [f"redeliver-{i}" for i in range(1, 4)]
    assert run.saved_ids() == {item_id: 2 for item_id in ids}
    assert sorted(run.outcomes()) == [(item_id, "saved", "-") for item_id in ids]
    assert _events(run, "adopted") == []


def test_an_adopted_redelivery_leaves_no_spool_file_behind(
    make_run: Callable[..., Run], tmp_path: Path
) -> None:
    # Payloads over inline_max_bytes are spooled by the provider before they are put; a
    # put answered from an earlier run is never scanned, so its spool file goes at once.
    spool = tmp_path / "spool"
    run = _redeliver(make_run, {"stoqd": {"spool_dir": str(spool)}},
                     count=3, size=400_000, hold_file="{dir}/release")  # fmt: skip
    daemon = run.start()
    wait_until(lambda: len(run.outcomes()) == 3, what="3 outcomes")
    assert [p.name for p in spool.glob("stoqd-*/*")] == []
    assert len(_events(run, "adopted", provider="redeliver")) == 3
    Path(run.path("release")).touch()
    assert daemon.wait_exit() == 0, daemon.log()
    assert run.saved_ids() == {f"redeliver-{i}": 1 for i in range(1, 4)}
