"""``stoqctl`` against a live daemon, and the control socket it talks to: what an operator
types, what they read back, and the exit codes scripts and health checks rely on."""

from __future__ import annotations

import glob
import grp
import json
import os
import shutil
import signal
import socket
import stat
import threading
from pathlib import Path
from typing import Any, Callable, Dict, List

from stoqd.control import server as control_server

from .helpers import Run, stoqctl, wait_stubborn_asleep, wait_until


def _provider(status: Dict[str, Any], name: str) -> Dict[str, Any]:
    return next(p for p in status["providers"] if p["name"] == name)


def _running(run: Run) -> Dict[str, Any]:
    return run.daemon.wait_for(
        lambda s: (
            _provider(s, "hang")["state"] == "RUNNING"
            and len(s["workers"]) == 2
            and all(w["state"] == "idle" for w in s["workers"])
        ),
        what="hang RUNNING and two idle workers",
    )


def test_status_shows_a_table_for_people_and_json_for_machines(
    make_run: Callable[..., Run],
) -> None:
    run = make_run({
        "core": {"providers": "hang, source"},
        "source": {"count": 3, "report": "true", "outcomes": "{dir}/outcomes"},
    })  # fmt: skip
    daemon = run.start()
    # EXHAUSTED says the source ran dry; its items may still be in flight until saved.
    daemon.wait_for(
        lambda s: (
            _provider(s, "source")["state"] == "EXHAUSTED" and _provider(s, "source")["saved"] == 3
        ),
        what="EXHAUSTED and 3 saved",
    )
    _running(run)
    shown = stoqctl("-s", str(daemon.socket), "status")
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0].startswith(f"stoqd running, pid {daemon.pid}, uptime 0:00:")
    header = ["PROVIDER", "STATE", "PID", "UPTIME", "RESTARTS", "PUT", "SAVED", "FAILED", "INFO"]
    assert lines[2].split() == header
    rows = {line.split()[0]: line.split() for line in lines[3:5]}
    hang_pid = str(daemon.provider("hang")["pid"])
    assert rows["hang"][:3] == ["hang", "RUNNING", hang_pid]
    assert rows["hang"][4:8] == ["0", "0", "0", "0"]
    assert rows["source"] == [
        "source",
        "EXHAUSTED",
        "-",
        "-",
        "0",
        "3",
        "3",
        "0",
        "put=3,",
        "prefix=item",
    ]
    assert lines[6].split() == ["WORKER", "PID", "STATE", "CURRENT", "AGE", "DONE"]
    workers = [line.split() for line in lines[7:9]]
    assert [w[2:5] for w in workers] == [["idle", "-", "-"], ["idle", "-", "-"]]
    assert sum(int(w[5]) for w in workers) == 3
    assert lines[-1] == "queue: 0/100 waiting, 0 in flight"

    as_json = stoqctl("-s", str(daemon.socket), "status", "--json")
    assert as_json.returncode == 0, as_json.stderr
    status = json.loads(as_json.stdout)
    assert set(status) >= {"daemon", "providers", "workers", "queue", "counters"}
    assert status["daemon"]["pid"] == daemon.pid
    assert status["daemon"]["config"] == str(run.config)
    source = _provider(status, "source")
    assert (source["put"], source["saved"], source["failed"], source["queued"]) == (3, 3, 0, 0)
    assert source["stats"] == {"put": 3, "prefix": "item"}  # what it published with report()
    assert status["queue"] == {"depth": 0, "max": 100, "in_flight": 0}

    detail = stoqctl("-s", str(daemon.socket), "status", "source")
    assert detail.returncode == 0, detail.stderr
    fields = dict(line.split(None, 1) for line in detail.stdout.splitlines())
    assert (fields["name"], fields["state"], fields["saved"]) == ("source", "EXHAUSTED", "3")
    assert fields["prefix"] == "item"  # its own statistics, beside the daemon's
    unknown = stoqctl("-s", str(daemon.socket), "status", "nosuch")
    assert unknown.returncode == 1
    assert unknown.stderr == "stoqctl: no provider named 'nosuch' (running: hang, source)\n"


def test_stoqctl_finds_the_socket_from_the_config_file(make_run: Callable[..., Run]) -> None:
    run = make_run({"core": {"providers": "hang"}})
    run.start()
    _running(run)
    shown = stoqctl("-c", str(run.config), "status", "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["daemon"]["pid"] == run.daemon.pid


def test_stop_start_and_restart_a_provider(make_run: Callable[..., Run]) -> None:
    run = make_run({"core": {"providers": "hang"}})
    daemon = run.start()
    first_pid = _provider(_running(run), "hang")["pid"]
    sock = str(daemon.socket)

    stopped = stoqctl("-s", sock, "stop", "hang")
    assert (stopped.returncode, stopped.stdout) == (0, "hang: stopping\n")
    status = daemon.wait_for(lambda s: _provider(s, "hang")["state"] == "STOPPED", what="STOPPED")
    assert _provider(status, "hang")["pid"] is None
    again = stoqctl("-s", sock, "stop", "hang")
    assert (again.returncode, again.stderr) == (
        1,
        "stoqctl: provider hang is not running (STOPPED)\n",
    )
    assert daemon.process.poll() is None  # a stopped provider does not end the daemon

    started = stoqctl("-s", sock, "start", "hang")
    assert (started.returncode, started.stdout) == (0, "hang: started\n")
    status = daemon.wait_for(lambda s: _provider(s, "hang")["state"] == "RUNNING", what="RUNNING")
    second_pid = _provider(status, "hang")["pid"]
    assert second_pid not in (None, first_pid)
    again = stoqctl("-s", sock, "start", "hang")
    assert (again.returncode, again.stderr) == (1, "stoqctl: provider hang is already RUNNING\n")

    restarted = stoqctl("-s", sock, "restart", "hang")
    assert (restarted.returncode, restarted.stdout) == (0, "hang: restarting\n")
    status = daemon.wait_for(
        lambda s: (
            _provider(s, "hang")["state"] == "RUNNING"
            and _provider(s, "hang")["pid"] not in (None, second_pid)
        ),
        what="RUNNING with a new pid",
    )
    assert _provider(status, "hang")["restarts"] == 1
    events = [e["event"] for e in daemon.events() if e.get("provider") == "hang"]
    assert events.count("spawned") == 3 and events.count("stopped") == 2


def test_restart_while_shutting_down_is_refused(make_run: Callable[..., Run]) -> None:
    # One slow item keeps the daemon in its graceful stop long enough to ask.
    run = make_run({
        "core": {"providers": "source", "always_dispatch": "sleepy"},
        "source": {"count": 1, "special": "1", "special_prefix": "SLOW",
                   "hold_file": "{dir}/release"},
        "sleepy": {"match": "SLOW", "seconds": 3},
    })  # fmt: skip
    daemon = run.start()
    daemon.wait_for(lambda s: any(w["state"] == "busy" for w in s["workers"]), what="busy")
    daemon.signal(signal.SIGTERM)
    daemon.wait_for(lambda s: s["daemon"]["state"] == "stopping", what="stopping")
    refused = stoqctl("-s", str(daemon.socket), "restart", "source")
    assert (refused.returncode, refused.stderr) == (1, "stoqctl: stoqd is shutting down\n")
    assert daemon.wait_exit() == 0, daemon.log()
    assert run.saved_ids() == {"item-1": 1}


def test_an_exhausted_provider_still_finishing_its_items_is_not_started_again(
    make_run: Callable[..., Run],
) -> None:
    # Its ingest returned, but its process waits for item-1's outcome (held in a worker)
    # to acknowledge it: a second process beside it would have its exit taken for the
    # new one's. Once it has exited, start runs the source again.
    run = make_run({
        "core": {"providers": "hang, source", "always_dispatch": "gate"},
        "gate": {"gate_dir": "{dir}"},
        "source": {"count": 1, "special": "1", "special_prefix": "HOLD",
                   "outcomes": "{dir}/outcomes"},
    })  # fmt: skip
    daemon = run.start()
    sock = str(daemon.socket)
    wait_until(lambda: os.path.exists(run.path("holding")), what="item-1 held",
               detail=daemon.log)  # fmt: skip
    status = daemon.wait_for(
        lambda s: _provider(s, "source")["state"] == "EXHAUSTED", what="source EXHAUSTED"
    )
    pid = _provider(status, "source")["pid"]
    assert pid is not None  # still waiting for its outcome
    for verb in ("start", "restart"):
        refused = stoqctl("-s", sock, verb, "source")
        assert (refused.returncode, refused.stderr) == (
            1,
            f"stoqctl: provider source is EXHAUSTED and still finishing its items (pid {pid}); "
            "start it again once it has exited\n",
        )
    assert _provider(daemon.status(), "source")["pid"] == pid

    Path(run.path("release")).touch()
    daemon.wait_for(lambda s: _provider(s, "source")["pid"] is None, what="source exited")
    started = stoqctl("-s", sock, "start", "source")
    assert (started.returncode, started.stdout) == (0, "source: started\n")
    daemon.wait_for(
        lambda s: _provider(s, "source")["saved"] == 2 and _provider(s, "source")["pid"] is None,
        what="the second run's item saved and the source exited",
    )
    assert run.outcomes() == [("item-1", "saved", "-")] * 2
    assert stoqctl("-s", sock, "shutdown").returncode == 0
    assert daemon.wait_exit() == 0, daemon.log()
    spawned = [e for e in daemon.events() if e["event"] == "spawned" and
               e.get("provider") == "source"]  # fmt: skip
    assert len(spawned) == 2


def test_shutdown_stops_the_daemon_with_exit_0(make_run: Callable[..., Run]) -> None:
    run = make_run({"core": {"providers": "hang"}})
    daemon = run.start()
    _running(run)
    done = stoqctl("-s", str(daemon.socket), "shutdown")
    assert (done.returncode, done.stdout) == (0, "shutting down\n")
    assert daemon.wait_exit() == 0, daemon.log()
    assert [e["reason"] for e in daemon.events() if e["event"] == "stopping"] == [
        "stoqctl shutdown"
    ]
    assert not daemon.socket.exists()  # removed on the way out


def test_an_unknown_provider_name_is_refused_with_exit_1(make_run: Callable[..., Run]) -> None:
    run = make_run({
        "core": {"providers": "hang, source"},
        "source": {"count": 1, "hold_file": "{dir}/never"},
    })  # fmt: skip
    daemon = run.start()
    _running(run)
    for verb in ("start", "stop", "restart"):
        refused = stoqctl("-s", str(daemon.socket), verb, "nope")
        assert refused.returncode == 1
        assert refused.stderr == "stoqctl: no provider named nope (providers: hang, source)\n"


def test_stoqctl_says_when_the_daemon_is_down_with_exit_4(make_run: Callable[..., Run]) -> None:
    run = make_run({"core": {"providers": "hang"}})
    sock = run.dir / "run" / "stoqd.sock"
    for args in (["status"], ["status", "--json"], ["shutdown"], ["stop", "hang"]):
        down = stoqctl("-s", str(sock), *args)
        assert down.returncode == 4
        assert down.stderr == (
            f"stoqctl: stoqd is not running (cannot connect to {sock}: No such file or directory)\n"
        )
    assert stoqctl("-c", str(run.config), "status").returncode == 4


def test_stoqctl_usage_errors_exit_2(make_run: Callable[..., Run]) -> None:
    assert stoqctl("frobnicate").returncode == 2
    assert stoqctl("stop").returncode == 2  # a provider name is required


def test_the_control_socket_is_private(make_run: Callable[..., Run]) -> None:
    run = make_run({"core": {"providers": "hang"}})
    daemon = run.start()
    _running(run)
    mode = os.stat(daemon.socket).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600


def test_a_control_group_may_use_the_socket(make_run: Callable[..., Run]) -> None:
    run = make_run({"core": {"providers": "hang"}, "stoqd": {"control_group": "daemon"}})
    daemon = run.start()
    _running(run)
    info = os.stat(daemon.socket)
    assert stat.S_IMODE(info.st_mode) == 0o660
    assert info.st_gid == grp.getgrnam("daemon").gr_gid


def test_a_stale_socket_from_a_killed_run_is_replaced(make_run: Callable[..., Run]) -> None:
    run = make_run({"core": {"providers": "hang"}})
    killed = run.start()
    _running(run)
    os.killpg(killed.pid, signal.SIGKILL)  # the whole run, as a crash or kill -9 would
    killed.wait_exit()
    assert killed.socket.exists()  # left behind
    daemon = run.start()
    status = _running(run)
    assert status["daemon"]["pid"] == daemon.pid
    assert stoqctl("-s", str(daemon.socket), "status").returncode == 0


def test_a_stale_socket_file_nobody_listens_on_is_replaced(make_run: Callable[..., Run]) -> None:
    run = make_run({"core": {"providers": "hang"}})
    stale = run.dir / "run" / "stoqd.sock"
    stale.parent.mkdir()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(stale))  # bound, never listening, then closed: the file stays
    daemon = run.start()
    assert _running(run)["daemon"]["pid"] == daemon.pid


def test_a_live_socket_with_a_full_backlog_is_in_use_not_waited_on(tmp_path: Path) -> None:
    # What a daemon out of descriptors looks like from outside: it listens, accepts none.
    path = str(tmp_path / "busy.sock")
    busy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    busy.bind(path)
    busy.listen(1)
    waiting = []
    try:
        while True:  # fill its backlog
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.setblocking(False)
            waiting.append(client)
            try:
                client.connect(path)
            except BlockingIOError:
                break
        outcome: List[BaseException] = []

        def probe() -> None:
            try:
                control_server.listen(path)
            except BaseException as exc:  # what it raised is the outcome
                outcome.append(exc)

        thread = threading.Thread(target=probe, daemon=True)
        thread.start()
        thread.join(timeout=10)
        assert not thread.is_alive(), "listen() waits for room in another daemon's backlog"
        assert [type(e) for e in outcome] == [control_server.SocketInUse]
        assert str(outcome[0]) == f"control socket {path} is in use by a running stoqd"
        assert stat.S_ISSOCK(os.lstat(path).st_mode)  # kept
    finally:
        for client in waiting:
            client.close()
        busy.close()


def test_a_control_socket_path_holding_a_file_is_refused_and_kept(
    make_run: Callable[..., Run],
) -> None:
    run = make_run({"core": {"providers": "hang"}, "stoqd": {"control_socket": "{dir}/notes.txt"}})
    precious = run.dir / "notes.txt"
    precious.write_text("not a socket")
    daemon = run.start()
    assert daemon.wait_exit() == 78, daemon.log()
    assert f"{run.config}: [stoqd] control_socket: {precious}: exists and is not a socket; " \
        "not replacing it" in daemon.log().splitlines()  # fmt: skip
    assert precious.read_text() == "not a socket"
    assert glob.glob(f"/dev/shm/stoqd-{daemon.pid}-*") == []


def test_a_control_socket_that_cannot_be_created_is_one_line(make_run: Callable[..., Run]) -> None:
    run = make_run({"core": {"providers": "hang"}, "stoqd": {"control_socket": "/proc/x/s.sock"}})
    daemon = run.start()
    assert daemon.wait_exit() == 78, daemon.log()
    assert f"{run.config}: [stoqd] control_socket: /proc/x/s.sock: cannot create it: " \
        "No such file or directory" in daemon.log().splitlines()  # fmt: skip


def test_a_second_daemon_on_the_same_socket_exits_69(make_run: Callable[..., Run]) -> None:
    run = make_run({"core": {"providers": "hang"}})
    first = run.start()
    _running(run)
    second = run.start()
    assert second.wait_exit() == 69, second.log()
    message = f"control socket {first.socket} is in use by a running stoqd"
    assert message in second.log().splitlines()
    errors = [e for e in second.events() if e["event"] == "config_error"]
    assert [e["error"] for e in errors] == [message]
    assert not [e for e in second.events() if e["event"] == "spawned"]  # no child started
    # The first daemon still owns the socket and answers on it.
    assert first.status()["daemon"]["pid"] == first.pid


def test_a_refused_second_daemon_leaves_no_spool_directory(make_run: Callable[..., Run]) -> None:
    run = make_run({"core": {"providers": "hang"}})
    run.start()
    _running(run)
    second = run.start()
    assert second.wait_exit() == 69, second.log()
    leaked = glob.glob(f"/dev/shm/stoqd-{second.pid}-*")
    for path in leaked:  # do not leave it behind for the next run either
        shutil.rmtree(path, ignore_errors=True)
    assert leaked == []


def test_stop_kills_a_provider_that_ignores_sigterm(make_run: Callable[..., Run]) -> None:
    run = make_run({"core": {"providers": "stubborn"}, "stoqd": {"graceful_timeout": 1}})
    daemon = run.start()
    daemon.wait_for(lambda s: _provider(s, "stubborn")["state"] == "RUNNING", what="RUNNING")
    wait_stubborn_asleep(daemon)
    assert stoqctl("-s", str(daemon.socket), "stop", "stubborn").returncode == 0
    daemon.wait_for(
        lambda s: _provider(s, "stubborn")["state"] == "STOPPED", timeout=4, what="STOPPED"
    )


def test_stoqctl_says_so_when_something_else_answers_on_the_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "impostor.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)

    def answer_garbage() -> None:
        connection, _ = server.accept()
        connection.recv(4096)
        connection.sendall(b"not json\n")
        connection.close()

    threading.Thread(target=answer_garbage, daemon=True).start()
    try:
        done = stoqctl("-s", path, "status")
    finally:
        server.close()
    assert done.returncode == 4  # as for a daemon that is down: unhealthy
    assert done.stderr == (
        f"stoqctl: what answers on {path} is not stoqd (its answer is not a JSON object)\n"
    )
