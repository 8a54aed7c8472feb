"""Signals from an operator or a service manager: SIGTERM/SIGINT stop gracefully and say
what was not done, SIGHUP reloads the configuration or says why it cannot."""

from __future__ import annotations

import signal
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Dict

from .helpers import Run, stoqctl, wait_stubborn_asleep, wait_until


def _provider(status: Dict[str, Any], name: str) -> Dict[str, Any]:
    return next(p for p in status["providers"] if p["name"] == name)


def test_sigterm_finishes_in_flight_items_and_returns_queued_ones(
    make_run: Callable[..., Run],
) -> None:
    run = make_run({
        "core": {"providers": "source", "always_dispatch": "hash, sleepy", "max_queue": 10},
        "sleepy": {"match": "", "seconds": 0.3},
        "source": {"count": 200, "outcomes": "{dir}/outcomes"},
    })  # fmt: skip
    daemon = run.start()
    daemon.wait_for(
        lambda s: s["queue"]["depth"] > 0 and _provider(s, "source")["saved"] >= 2,
        what="a full queue and slow scans",
    )
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit() == 0, daemon.log()

    stopping = next(e for e in daemon.events() if e["event"] == "stopping")
    assert stopping["reason"] == "signal SIGTERM"
    assert stopping["queued"] > 0 and stopping["in_flight"] > 0
    outcomes = run.outcomes()
    assert len({o[0] for o in outcomes}) == len(outcomes)  # one outcome per item
    statuses = Counter(o[1] for o in outcomes)
    assert statuses["failed"] == 0
    assert statuses["not_done"] == stopping["queued"]
    assert {o[2] for o in outcomes if o[1] == "not_done"} == {
        "daemon stopped before it was scanned"
    }
    # Everything reported saved has its result, and everything saved was reported.
    saved = {o[0] for o in outcomes if o[1] == "saved"}
    assert saved == set(run.saved_ids())
    assert all(count == 1 for count in run.saved_ids().values())
    assert len(saved) >= stopping["in_flight"]  # what was in flight at SIGTERM finished


def test_sigterm_with_a_hanging_scan_exits_after_graceful_timeout(
    make_run: Callable[..., Run],
) -> None:
    run = make_run({
        "core": {"providers": "source", "always_dispatch": "hash, sleepy"},
        "stoqd": {"graceful_timeout": 1, "scan_timeout": 3600},
        "sleepy": {"match": "", "seconds": 3600},
        "source": {"count": 20, "outcomes": "{dir}/outcomes"},
    })  # fmt: skip
    daemon = run.start()
    daemon.wait_for(
        lambda s: sum(1 for w in s["workers"] if w["state"] == "busy") == 2,
        what="both workers stuck in a scan",
    )
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit(timeout=20) == 0, daemon.log()
    assert run.results() == []  # nothing finished, so nothing was saved
    assert "saved" not in {o[1] for o in run.outcomes()}  # and nothing was said to be
    killed = [e for e in daemon.events() if e["event"] == "exited" and "worker" in e]
    assert {e["exit"] for e in killed} == {"killed by SIGKILL"}


def test_sigint_stops_like_sigterm(make_run: Callable[..., Run]) -> None:
    run = make_run({"core": {"providers": "hang"}})
    daemon = run.start()
    daemon.wait_for(lambda s: _provider(s, "hang")["state"] == "RUNNING", what="RUNNING")
    daemon.signal(signal.SIGINT)
    assert daemon.wait_exit() == 0, daemon.log()
    stopping = [e["reason"] for e in daemon.events() if e["event"] == "stopping"]
    assert stopping == ["signal SIGINT"]


def test_a_provider_stopped_at_shutdown_is_logged(make_run: Callable[..., Run]) -> None:
    run = make_run({"core": {"providers": "hang"}})
    daemon = run.start()
    daemon.wait_for(lambda s: _provider(s, "hang")["state"] == "RUNNING", what="RUNNING")
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit() == 0, daemon.log()
    stopped = [e for e in daemon.events() if e["event"] == "stopped"]
    assert [(e["provider"], e["exit"]) for e in stopped] == [("hang", "exit 0")]


def test_sighup_adds_a_provider_from_the_edited_file(make_run: Callable[..., Run]) -> None:
    run = make_run({"core": {"providers": "hang"}})
    daemon = run.start()
    daemon.wait_for(lambda s: _provider(s, "hang")["state"] == "RUNNING", what="RUNNING")
    hang_pid = daemon.provider("hang")["pid"]
    run.configure({
        "core": {"providers": "hang, source"},
        "source": {"count": 5, "outcomes": "{dir}/outcomes"},
    })  # fmt: skip
    daemon.signal(signal.SIGHUP)
    status = daemon.wait_for(
        lambda s: any(
            p["name"] == "source" and p["state"] == "EXHAUSTED" and p["saved"] == 5
            for p in s["providers"]
        ),
        what="the added provider to run to exhaustion",
    )
    assert _provider(status, "source")["saved"] == 5
    assert _provider(status, "hang")["pid"] == hang_pid  # untouched
    assert run.saved_ids() == {f"item-{i}": 1 for i in range(1, 6)}
    wait_until(lambda: len(run.outcomes()) == 5, what="5 outcomes")
    reloaded = [e for e in daemon.events() if e["event"] == "reloaded"]
    assert [e["providers"] for e in reloaded] == [["hang", "source"]]
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit() == 0, daemon.log()


def test_sighup_with_an_invalid_file_keeps_running_and_says_why(
    make_run: Callable[..., Run],
) -> None:
    run = make_run({"core": {"providers": "hang"}})
    daemon = run.start()
    before = daemon.wait_for(lambda s: _provider(s, "hang")["state"] == "RUNNING", what="RUNNING")
    run.configure({"core": {"providers": "hang"}, "stoqd": {"workerz": 3}})
    daemon.signal(signal.SIGHUP)
    failed = wait_until(
        lambda: [e for e in daemon.events() if e["event"] == "reload_failed"],
        what="a reload_failed event",
    )
    assert [e["error"] for e in failed] == [
        f"{run.config}: [stoqd] workerz: unknown key (did you mean workers?)"
    ]
    assert failed[0]["kept"] == "previous configuration"
    after = daemon.status()
    assert _provider(after, "hang")["pid"] == _provider(before, "hang")["pid"]
    assert sorted(w["pid"] for w in after["workers"]) == sorted(w["pid"] for w in before["workers"])
    assert after["daemon"]["state"] == "running"


def test_sighup_to_a_file_without_providers_keeps_them_running(
    make_run: Callable[..., Run],
) -> None:
    run = make_run({"core": {"providers": "hang"}})
    daemon = run.start()
    before = daemon.wait_for(lambda s: _provider(s, "hang")["state"] == "RUNNING", what="RUNNING")
    run.configure({"core": {"providers": ""}})
    daemon.signal(signal.SIGHUP)
    failed = wait_until(
        lambda: [e for e in daemon.events() if e["event"] == "reload_failed"],
        what="a reload_failed event",
    )
    assert [e["error"] for e in failed] == [
        f"{run.config}: [core] providers: no provider configured"
    ]
    assert _provider(daemon.status(), "hang")["pid"] == _provider(before, "hang")["pid"]


def test_sighup_with_a_worker_rejecting_its_options_keeps_the_pool(
    make_run: Callable[..., Run],
) -> None:
    run = make_run({"core": {"providers": "hang"}})
    daemon = run.start()
    before = daemon.wait_for(lambda s: _provider(s, "hang")["state"] == "RUNNING", what="RUNNING")
    run.configure({"core": {"providers": "hang"}, "hash": {"algorithms": "md5, bogus"}})
    daemon.signal(signal.SIGHUP)
    failed = wait_until(
        lambda: [e for e in daemon.events() if e["event"] == "reload_failed"],
        what="a reload_failed event",
    )
    assert failed[0]["error"].startswith(
        f"{run.config}: [hash] option algorithms: unknown algorithm 'bogus'"
    )
    after = daemon.status()
    assert sorted(w["pid"] for w in after["workers"]) == sorted(w["pid"] for w in before["workers"])
    assert after["daemon"]["state"] == "running"
    assert not [e for e in daemon.events() if e["event"] == "recycling"]


def test_sighup_keeps_settings_bound_at_start_and_says_so(make_run: Callable[..., Run]) -> None:
    run = make_run({"core": {"providers": "hang"}})
    daemon = run.start()
    daemon.wait_for(lambda s: _provider(s, "hang")["state"] == "RUNNING", what="RUNNING")
    run.configure({"core": {"providers": "hang"}, "stoqd": {"control_socket": "{dir}/moved.sock"}})
    daemon.signal(signal.SIGHUP)
    partial = wait_until(
        lambda: [e for e in daemon.events() if e["event"] == "reload_partial"],
        what="a reload_partial event",
    )
    assert partial[0]["keys"] == ["control_socket"]
    # Still answering where it was; stoqctl reading the edited file would not find it.
    assert stoqctl("-s", str(daemon.socket), "status").returncode == 0


def _remove_hang_by_sighup(run: Run) -> None:
    daemon = run.start()
    daemon.wait_for(
        lambda s: all(p["state"] == "RUNNING" for p in s["providers"]), what="both RUNNING"
    )
    run.configure({"core": {"providers": "source"},
                   "source": {"count": 1, "hold_file": "{dir}/release"}})  # fmt: skip
    daemon.signal(signal.SIGHUP)
    status = daemon.wait_for(
        lambda s: [p["name"] for p in s["providers"]] == ["source"], what="hang removed"
    )
    assert _provider(status, "source")["state"] == "RUNNING"
    wait_until(
        lambda: [e for e in daemon.events() if e.get("provider") == "hang" and e["event"] in
                 ("stopped", "exited", "exhausted")],
        what="hang's exit in the log",
    )  # fmt: skip
    (run.dir / "release").touch()
    assert daemon.wait_exit() == 0, daemon.log()


def test_sighup_removes_a_provider_dropped_from_the_file(make_run: Callable[..., Run]) -> None:
    run = make_run({
        "core": {"providers": "hang, source"},
        "source": {"count": 1, "hold_file": "{dir}/release"},
    })  # fmt: skip
    _remove_hang_by_sighup(run)
    assert run.saved_ids() == {"item-1": 1}


def test_a_provider_removed_by_sighup_is_logged_as_stopped(make_run: Callable[..., Run]) -> None:
    run = make_run({
        "core": {"providers": "hang, source"},
        "source": {"count": 1, "hold_file": "{dir}/release"},
    })  # fmt: skip
    _remove_hang_by_sighup(run)
    hang_events = [e for e in run.daemon.events() if e.get("provider") == "hang"]
    assert [e["event"] for e in hang_events] == ["spawned", "running", "stopped"]
    assert hang_events[-1]["exit"] == "exit 0"  # stopped by its SIGTERM, not SIGKILLed


def test_stoqctl_reload_restarts_a_provider_whose_options_changed(
    make_run: Callable[..., Run],
) -> None:
    sections = {
        "core": {"providers": "source"},
        "source": {"count": 2, "prefix": "old", "hold_file": "{dir}/release",
                   "outcomes": "{dir}/outcomes"},
    }  # fmt: skip
    run = make_run(sections)
    daemon = run.start()
    first = daemon.wait_for(lambda s: _provider(s, "source")["saved"] == 2, what="2 saved")
    sections["source"]["prefix"] = "new"
    run.configure(sections)
    reload = stoqctl("-s", str(daemon.socket), "reload")  # the same as SIGHUP
    assert (reload.returncode, reload.stdout) == (
        0,
        "reload requested; see the log for the outcome\n",
    )
    status = daemon.wait_for(
        lambda s: (
            _provider(s, "source")["restarts"] == 1
            and _provider(s, "source")["state"] == "RUNNING"
            and _provider(s, "source")["saved"] == 4
        ),
        what="restarted with its new options",
    )
    assert _provider(status, "source")["pid"] != _provider(first, "source")["pid"]
    (run.dir / "release").touch()
    assert daemon.wait_exit() == 0, daemon.log()
    assert run.saved_ids() == {"old-1": 1, "old-2": 1, "new-1": 1, "new-2": 1}


def test_a_provider_ignoring_sigterm_is_killed_after_graceful_timeout(
    make_run: Callable[..., Run],
) -> None:
    run = make_run({"core": {"providers": "stubborn"}, "stoqd": {"graceful_timeout": 1}})
    daemon = run.start()
    daemon.wait_for(lambda s: _provider(s, "stubborn")["state"] == "RUNNING", what="RUNNING")
    wait_stubborn_asleep(daemon)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit(timeout=20) == 0, daemon.log()
    stopped = [e for e in daemon.events() if e.get("provider") == "stubborn" and
               e["event"] in ("stopped", "exited")]  # fmt: skip
    assert [e["exit"] for e in stopped] in ([], ["killed by SIGKILL"])


def test_a_provider_ignoring_stoqctl_stop_is_killed_when_graceful_timeout_ends(
    make_run: Callable[..., Run],
) -> None:
    """Not up to a second late: the SIGKILL is a deadline the loop wakes for. Nothing
    else wakes an idle daemon meanwhile (the test does not poll it), so a kill that
    waited for the loop's next idle turn would come about a second after the stop."""
    grace = 0.2
    run = make_run({"core": {"providers": "stubborn"}, "stoqd": {"graceful_timeout": grace}})
    daemon = run.start()
    daemon.wait_for(lambda s: _provider(s, "stubborn")["state"] == "RUNNING", what="RUNNING")
    wait_stubborn_asleep(daemon)
    asked = time.time()
    stop = stoqctl("-s", str(daemon.socket), "stop", "stubborn")
    # The stop was carried out between these two: stoqctl's own start-up (hundreds of
    # milliseconds on a loaded machine) is before it, so the upper bound counts from here.
    returned = time.time()
    assert stop.returncode == 0, stop.stderr
    stopped = wait_until(
        lambda: [e for e in daemon.events() if e["event"] == "stopped"], what="stopped"
    )
    assert [(e["provider"], e["exit"]) for e in stopped] == [("stubborn", "killed by SIGKILL")]
    killed = datetime.fromisoformat(stopped[0]["timestamp"]).timestamp()
    assert grace <= killed - asked, killed - asked
    assert killed - returned < grace + 0.8, killed - returned


def test_a_providers_clean_up_after_sigterm_is_not_cut_short(
    make_run: Callable[..., Run],
) -> None:
    # One SIGTERM per provider: its clean-up (1 s here) runs to its end, within
    # graceful_timeout, while the supervisor loop keeps turning.
    marker = "{dir}/cleaned-up"
    run = make_run({
        "core": {"providers": "hang"},
        "hang": {"cleanup_marker": marker, "cleanup_seconds": 1},
        "stoqd": {"graceful_timeout": 20},
    })  # fmt: skip
    daemon = run.start()
    daemon.wait_for(lambda s: _provider(s, "hang")["state"] == "RUNNING", what="RUNNING")
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit(timeout=30) == 0, daemon.log()
    assert Path(run.path("cleaned-up")).exists()
    stopped = [e for e in daemon.events() if e.get("provider") == "hang" and
               e["event"] in ("stopped", "exited")]  # fmt: skip
    assert [e["exit"] for e in stopped] == ["exit 0"]


def test_a_provider_removed_by_sighup_that_ignores_sigterm_is_killed(
    make_run: Callable[..., Run],
) -> None:
    run = make_run({"core": {"providers": "stubborn, hang"}, "stoqd": {"graceful_timeout": 1}})
    daemon = run.start()
    daemon.wait_for(lambda s: _provider(s, "stubborn")["state"] == "RUNNING", what="RUNNING")
    wait_stubborn_asleep(daemon)
    run.configure({"core": {"providers": "hang"}, "stoqd": {"graceful_timeout": 1}})
    daemon.signal(signal.SIGHUP)
    stopped = wait_until(
        lambda: [e for e in daemon.events() if e["event"] == "stopped"],
        what="the removed provider stopped",
    )
    assert [(e["provider"], e["exit"]) for e in stopped] == [("stubborn", "killed by SIGKILL")]


def test_sighup_moves_the_workers_onto_new_plugin_options(make_run: Callable[..., Run]) -> None:
    sections: Dict[str, Dict[str, Any]] = {
        "core": {"providers": "hang"},
        "hash": {"algorithms": "md5, sha256"},
    }
    run = make_run(sections)
    daemon = run.start()
    before = daemon.wait_for(
        lambda s: (
            _provider(s, "hang")["state"] == "RUNNING"
            and [w["state"] for w in s["workers"]] == ["idle", "idle"]
        ),
        what="two idle workers",
    )
    run.configure({
        "core": {"providers": "hang, source"},
        "hash": {"algorithms": "sha1"},
        "source": {"count": 30, "delay": 0.1, "outcomes": "{dir}/outcomes"},
    })  # fmt: skip
    daemon.signal(signal.SIGHUP)
    old = {w["pid"] for w in before["workers"]}
    after = daemon.wait_for(
        lambda s: _provider(s, "source")["state"] == "EXHAUSTED"
        and _provider(s, "source")["saved"] == 30
        and len(s["workers"]) == 2 and not old & {w["pid"] for w in s["workers"]},
        what="both workers replaced and the new provider done",
    )  # fmt: skip
    assert after["counters"]["worker_recycles"] == 2
    recycled = [e["reason"] for e in daemon.events() if e["event"] == "recycling"]
    assert recycled == ["reload", "reload"]
    digests = [r["results"][0]["workers"][0]["hash"] for r in run.results()]
    assert len(digests) == 30
    # Recycling is gradual, so early payloads may meet an old worker; the last ones do not.
    assert set(digests[-1]) == {"sha1"}
    assert {frozenset(d) for d in digests} <= {frozenset({"md5", "sha256"}), frozenset({"sha1"})}


def test_sighup_grows_and_shrinks_the_pool_to_the_new_worker_count(
    make_run: Callable[..., Run],
) -> None:
    run = make_run({"core": {"providers": "hang"}})
    daemon = run.start()
    first = daemon.wait_for(
        lambda s: [w["state"] for w in s["workers"]] == ["idle", "idle"], what="two idle workers"
    )
    run.configure({"core": {"providers": "hang"}, "stoqd": {"workers": 3}})
    daemon.signal(signal.SIGHUP)
    grown = daemon.wait_for(
        lambda s: (
            [w["state"] for w in s["workers"]] == ["idle"] * 3
            and not {w["pid"] for w in first["workers"]} & {w["pid"] for w in s["workers"]}
        ),
        what="three idle workers, none of the old ones",
    )
    assert grown["daemon"]["workers"] == 3

    run.configure({"core": {"providers": "hang"}, "stoqd": {"workers": 1}})
    daemon.signal(signal.SIGHUP)
    shrunk = daemon.wait_for(
        lambda s: (
            [w["state"] for w in s["workers"]] == ["idle"]
            and not {w["pid"] for w in grown["workers"]} & {w["pid"] for w in s["workers"]}
        ),
        what="one idle worker, a new one",
    )
    assert shrunk["daemon"]["workers"] == 1
    reloaded = [e["workers"] for e in daemon.events() if e["event"] == "reloaded"]
    assert reloaded == [3, 1]
    # Shrinking retires the surplus without replacing it: 2 + 1 replacements in all.
    spawned = [e for e in daemon.events() if e["event"] == "spawned" and "worker" in e]
    assert len(spawned) == 2 + 3 + 1
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit() == 0, daemon.log()
