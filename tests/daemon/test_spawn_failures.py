"""Children the system fails. One that cannot be started (the supervisor out of
descriptors: its own limit is lowered below what a child needs) is backed off from and
retried, never the end of the daemon; nor is a control connection it cannot accept. When
multiprocessing's forkserver is killed, every child dies with it (PR_SET_PDEATHSIG) and
is replaced: none is left running beside its replacement."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Set, Tuple

import pytest

from .helpers import Run, stoqctl, wait_until

TOO_MANY = "[Errno 24] Too many open files"


def _limit_descriptors(pid: int, spare: int) -> Tuple[int, int]:
    """Let ``pid`` open only ``spare`` more descriptors; returns its limits before."""
    before = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    taken: Set[int] = set()
    # Until what is open holds still (a stoqctl connection just answered may be closing).
    while taken != (now := {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}):
        taken = now
        free = [n for n in range(max(taken) + spare + 2) if n not in taken]
        # Below this limit: exactly ``spare`` numbers that are free (new descriptors take
        # the lowest free number, so none can be opened beyond those).
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (free[spare], before[1]))
        time.sleep(0.2)
    return before


def _source(status: Dict[str, Any]) -> Dict[str, Any]:
    return next(p for p in status["providers"] if p["name"] == "source")


def _idle_pool(status: Dict[str, Any]) -> bool:
    return len(status["workers"]) == 2 and all(w["state"] == "idle" for w in status["workers"])


# 1: too few for a socketpair; 6: enough for it, too few for what asks the forkserver for
# a process, which would end the forkserver and every child with it if it were asked.
@pytest.mark.parametrize("spare", [1, 6])
def test_a_provider_that_cannot_be_started_backs_off_and_starts_once_it_can(
    make_run: Callable[..., Run], spare: int
) -> None:
    run = make_run({
        "core": {"providers": "source"},
        "stoqd:source": {"autostart": "false", "backoff_initial": 1, "backoff_max": 1,
                         "startretries": 100},
        "source": {"count": 3, "outcomes": "{dir}/outcomes"},
    })  # fmt: skip
    daemon = run.start()
    workers = [w["pid"] for w in daemon.wait_for(_idle_pool, what="two idle workers")["workers"]]
    # One of them accepts stoqctl's connection.
    before = _limit_descriptors(daemon.pid, spare=spare)
    started = stoqctl("-s", str(daemon.socket), "start", "source")
    assert (started.returncode, started.stderr) == (
        1,
        f"stoqctl: provider source did not start: cannot start its process: {TOO_MANY} (BACKOFF)\n",
    )
    status = daemon.status()
    assert daemon.process.poll() is None
    assert _source(status)["state"] == "BACKOFF"
    assert _source(status)["last_error"] == f"cannot start its process: {TOO_MANY}"
    backoff = [e for e in daemon.events() if e["event"] == "backoff"]
    assert backoff[0]["exit"] == "not started"
    restarted = stoqctl("-s", str(daemon.socket), "restart", "source")
    assert restarted.returncode == 1
    assert restarted.stderr.startswith(
        f"stoqctl: provider source did not start: cannot start its process: {TOO_MANY}"
    )
    assert [w["pid"] for w in daemon.status()["workers"]] == workers  # untouched

    resource.prlimit(daemon.pid, resource.RLIMIT_NOFILE, before)
    # The retry starts it; it puts its three payloads and returns, which ends the daemon.
    assert daemon.wait_exit() == 0, daemon.log()
    assert sorted(run.outcomes()) == [(f"item-{i}", "saved", "-") for i in (1, 2, 3)]
    assert run.saved_ids() == {f"item-{i}": 1 for i in (1, 2, 3)}


# 0: what the dead worker held is all a replacement could get; 3: enough for its
# socketpairs, too few for asking the forkserver (see the provider's test).
@pytest.mark.parametrize("spare", [0, 3])
def test_a_worker_that_cannot_be_replaced_is_retried_and_the_daemon_stays_up(
    make_run: Callable[..., Run], spare: int
) -> None:
    run = make_run({
        "core": {"providers": "source"},
        "stoqd": {"backoff_initial": 1, "backoff_max": 1},
        "source": {"count": 3, "outcomes": "{dir}/outcomes", "hold_file": "{dir}/release"},
    })  # fmt: skip
    daemon = run.start()
    status = daemon.wait_for(lambda s: _idle_pool(s) and _source(s)["saved"] == 3, what="3 saved")
    victim, survivor = (w["pid"] for w in status["workers"])
    before = _limit_descriptors(daemon.pid, spare=spare)
    os.kill(victim, signal.SIGKILL)
    status = daemon.wait_for(
        lambda s: s["counters"]["worker_spawn_failures"] >= 1, what="a failed worker start"
    )
    assert daemon.process.poll() is None
    assert [w["pid"] for w in status["workers"]] == [survivor]
    assert status["daemon"]["worker_error"] == f"cannot start a worker process: {TOO_MANY}"
    shown = stoqctl("-s", str(daemon.socket), "status")
    assert f"workers: 1 of 2, error: cannot start a worker process: {TOO_MANY}, retry in" in (
        shown.stdout
    )
    failed = [e for e in daemon.events() if e["event"] == "spawn_failed"]
    assert failed[0]["error"] == f"cannot start a worker process: {TOO_MANY}"
    assert failed[0]["workers"] == 1

    resource.prlimit(daemon.pid, resource.RLIMIT_NOFILE, before)
    status = daemon.wait_for(
        lambda s: len(s["workers"]) == 2 and s["daemon"]["worker_error"] is None,
        what="the pool filled again",
    )
    Path(run.path("release")).touch()
    assert daemon.wait_exit() == 0, daemon.log()
    assert run.saved_ids() == {f"item-{i}": 1 for i in (1, 2, 3)}


def test_a_worker_due_for_recycling_keeps_its_place_until_a_replacement_starts(
    make_run: Callable[..., Run],
) -> None:
    run = make_run({
        "core": {"providers": "source", "always_dispatch": "hash, gate"},
        "stoqd": {"worker_max_payloads": 1, "backoff_initial": 1, "backoff_max": 1},
        "gate": {"gate_dir": "{dir}"},
        # Items 1 and 2 wait in the two workers for the file "release"; 3 and 4 in the queue.
        "source": {"count": 4, "special": "1, 2", "special_prefix": "HOLD",
                   "outcomes": "{dir}/outcomes"},
    })  # fmt: skip
    daemon = run.start()
    status = daemon.wait_for(
        lambda s: [w["state"] for w in s["workers"]] == ["busy", "busy"], what="two held items"
    )
    workers = [w["pid"] for w in status["workers"]]
    # One: room for a status request's connection, none for a worker (5 at least).
    before = _limit_descriptors(daemon.pid, spare=1)
    Path(run.path("release")).touch()  # both scans end, and both workers are due
    status = daemon.wait_for(
        lambda s: s["counters"]["worker_spawn_failures"] >= 1
        and all(w["payloads"] == 1 for w in s["workers"]),
        what="a replacement that could not start",
    )  # fmt: skip
    assert daemon.process.poll() is None
    assert [w["pid"] for w in status["workers"]] == workers  # neither left without one
    assert status["daemon"]["worker_error"] == f"cannot start a worker process: {TOO_MANY}"
    assert status["queue"]["depth"] == 2  # over their budget, they take no more
    assert not [e for e in daemon.events() if e["event"] == "recycling"]
    assert next(e["workers"] for e in daemon.events() if e["event"] == "spawn_failed") == 2

    resource.prlimit(daemon.pid, resource.RLIMIT_NOFILE, before)
    assert daemon.wait_exit() == 0, daemon.log()
    assert run.saved_ids() == {f"item-{i}": 1 for i in (1, 2, 3, 4)}
    recycled = [e for e in daemon.events() if e["event"] == "recycling"]
    assert {e["worker"] for e in recycled} >= {1, 2}
    assert {e["reason"] for e in recycled} == {"payloads"}


def test_stoqctl_waits_while_the_daemon_is_out_of_descriptors_and_is_answered_after(
    make_run: Callable[..., Run],
) -> None:
    run = make_run({"core": {"providers": "source"},
                    "source": {"count": 1, "hold_file": "{dir}/release"}})  # fmt: skip
    daemon = run.start()
    daemon.wait_for(lambda s: _idle_pool(s) and _source(s)["saved"] == 1, what="1 saved")
    before = _limit_descriptors(daemon.pid, spare=0)
    asking = subprocess.Popen(
        [sys.executable, "-m", "stoqd.ctl", "-s", str(daemon.socket), "status", "--json"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        failed = wait_until(
            lambda: [e for e in daemon.events() if e["event"] == "control_accept_failed"],
            what="a failed accept",
        )
        assert failed[0]["error"] == TOO_MANY
        time.sleep(1.5)
        assert asking.poll() is None  # its connection waits in the backlog
        assert daemon.process.poll() is None
        # Tried again after 0.5 s, then 1 s: not in a loop that spins on the socket.
        retries = [e for e in daemon.events() if e["event"] == "control_accept_failed"]
        assert [e["retry_in"] for e in retries][:2] == [0.5, 1.0]
        assert len(retries) <= 3
        resource.prlimit(daemon.pid, resource.RLIMIT_NOFILE, before)
        out, _ = asking.communicate(timeout=30)
    finally:
        asking.kill()
    assert asking.returncode == 0
    assert json.loads(out)["daemon"]["pid"] == daemon.pid
    Path(run.path("release")).touch()
    assert daemon.wait_exit() == 0, daemon.log()


def _running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] not in (b"Z", b"X")


def _forkserver(daemon_pid: int) -> int:
    for pid in map(int, Path(f"/proc/{daemon_pid}/task/{daemon_pid}/children").read_text().split()):
        if b"forkserver" in Path(f"/proc/{pid}/cmdline").read_bytes():
            return pid
    raise AssertionError(f"no forkserver among the children of {daemon_pid}")


def test_children_die_with_a_killed_forkserver_and_are_replaced(
    make_run: Callable[..., Run],
) -> None:
    run = make_run({"core": {"providers": "hang"}})
    daemon = run.start()
    status = daemon.wait_for(
        lambda s: _idle_pool(s) and s["providers"][0]["state"] == "RUNNING",
        what="hang RUNNING and two idle workers",
    )
    old = [w["pid"] for w in status["workers"]] + [status["providers"][0]["pid"]]
    os.kill(_forkserver(daemon.pid), signal.SIGKILL)
    # Every child dies with its parent, the forkserver, and is replaced (by a new one).
    status = daemon.wait_for(
        lambda s: (
            _idle_pool(s)
            and s["providers"][0]["state"] == "RUNNING"
            and not {w["pid"] for w in s["workers"]} & set(old)
            and s["providers"][0]["pid"] not in old
        ),
        what="a new pool and provider",
    )
    assert not [pid for pid in old if _running(pid)]
    assert daemon.process.poll() is None
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit() == 0, daemon.log()
