"""stoqd.notify against a real datagram socket, as systemd's manager would bind it."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import struct
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator, List, Tuple

import pytest
from deploy_helpers import held_config

from stoqd import notify
from stoqd.testing import Daemon


class Listener:
    """A datagram socket standing in for systemd's notify socket."""

    def __init__(self, address: str, env_value: str) -> None:
        self.env_value = env_value
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(5)

    def recv(self) -> str:
        return self.sock.recv(4096).decode("utf-8")

    def nothing_pending(self) -> bool:
        self.sock.setblocking(False)
        try:
            self.sock.recv(4096)
        except BlockingIOError:
            return True
        finally:
            self.sock.settimeout(5)
        return False


@pytest.fixture(params=["path", "abstract"])
def listener(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Listener]:
    if request.param == "path":
        # pytest's tmp_path can exceed the 107-byte limit of a socket path.
        directory = tempfile.mkdtemp(prefix="stoqd-notify-")
        path = os.path.join(directory, "notify.sock")
        sock = Listener(path, path)
    else:
        name = f"stoqd-test-{uuid.uuid4().hex}"
        sock = Listener("\0" + name, "@" + name)
    monkeypatch.setenv("NOTIFY_SOCKET", sock.env_value)
    yield sock
    sock.sock.close()
    notify.default().close()
    if request.param == "path":
        Path(path).unlink()
        os.rmdir(directory)


def test_ready_sends_ready(listener: Listener) -> None:
    assert notify.ready() is True
    assert listener.recv() == "READY=1"


def test_ready_with_status_is_one_datagram(listener: Listener) -> None:
    notify.ready("1 provider running, 2 workers")
    assert listener.recv() == "READY=1\nSTATUS=1 provider running, 2 workers"


def test_status_keeps_to_one_line(listener: Listener) -> None:
    notify.status("queue 3\nin flight 1")
    assert listener.recv() == "STATUS=queue 3 in flight 1"


def test_stopping_watchdog_mainpid(listener: Listener) -> None:
    notify.stopping()
    notify.watchdog()
    notify.main_pid(4242)
    notify.main_pid()
    assert listener.recv() == "STOPPING=1"
    assert listener.recv() == "WATCHDOG=1"
    assert listener.recv() == "MAINPID=4242"
    assert listener.recv() == f"MAINPID={os.getpid()}"


def test_extend_timeout_in_microseconds(listener: Listener) -> None:
    notify.extend_timeout(2.5)
    assert listener.recv() == "EXTEND_TIMEOUT_USEC=2500000"


def test_reloading_carries_monotonic_usec(listener: Listener) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notify.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    first, second = listener.recv().split("\n")
    assert first == "RELOADING=1"
    key, value = second.split("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after


def test_unset_socket_is_a_silent_no_op(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify.default().enabled is False
    assert notify.ready() is False
    assert notify.status("x") is False
    assert notify.watchdog() is False
    assert caplog.records == []


def test_vanished_socket_warns_once_and_never_raises(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tempfile.mkdtemp(prefix="stoqd-notify-")
    path = os.path.join(directory, "gone.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    with caplog.at_level(logging.WARNING, logger="stoqd.notify"):
        assert notify.ready() is False
        assert notify.watchdog() is False
        assert notify.stopping() is False
    os.rmdir(directory)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1
    assert warnings[0].startswith(f"cannot notify systemd at {path}: ")


def test_socket_coming_back_is_used_again(monkeypatch: pytest.MonkeyPatch) -> None:
    directory = tempfile.mkdtemp(prefix="stoqd-notify-")
    path = os.path.join(directory, "late.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert notify.watchdog() is False
    late = Listener(path, path)
    try:
        assert notify.watchdog() is True
        assert late.recv() == "WATCHDOG=1"
    finally:
        late.sock.close()
        notify.default().close()
        os.unlink(path)
        os.rmdir(directory)


def test_relative_socket_value_is_refused_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "relative/notify.sock")
    with caplog.at_level(logging.WARNING, logger="stoqd.notify"):
        assert notify.ready() is False
        assert notify.ready() is False
    assert [r.getMessage() for r in caplog.records] == [
        "NOTIFY_SOCKET='relative/notify.sock' is not a path or @name; notifications are off"
    ]


def test_messages_from_the_daemon_only(listener: Listener) -> None:
    """Nothing is sent that the caller did not ask for."""
    notify.status("idle")
    assert listener.recv() == "STATUS=idle"
    assert listener.nothing_pending()


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("20000000", None, 20.0),
        ("20000000", "self", 20.0),
        ("20000000", "1", None),  # meant for another process (we inherited it)
        ("0", None, None),
        ("junk", None, None),
        (None, None, None),
    ],
)
def test_watchdog_interval(
    monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None, expected: float | None
) -> None:
    for name, value in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, str(os.getpid()) if value == "self" else value)
    assert notify.watchdog_interval() == expected
    assert notify.watchdog_ping_interval() == (None if expected is None else expected / 2)


def _recv_with_pid(sock: socket.socket) -> Tuple[str, int]:
    """One datagram and the pid the kernel says sent it (as systemd checks NotifyAccess)."""
    data, ancillary, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(struct.calcsize("iII")))
    pid = next(
        struct.unpack("iII", cdata)[0]
        for level, kind, cdata in ancillary
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS
    )
    return data.decode(), pid


def _until(sock: socket.socket, pids: set, predicate: Callable[[str], bool]) -> List[str]:
    seen: List[str] = []
    while True:
        message, pid = _recv_with_pid(sock)  # times out after the socket's 10 s
        pids.add(pid)
        seen.append(message)
        if predicate(message):
            return seen


def test_live_daemon_speaks_the_protocol(short_dir: Path) -> None:
    """READY once up, STATUS with counts, WATCHDOG, RELOADING on SIGHUP, STOPPING on SIGTERM."""
    path = str(short_dir / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    sock.settimeout(10)
    pids: set = set()
    daemon = Daemon(held_config(short_dir), env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000"})
    try:
        ready = _until(sock, pids, lambda m: m.startswith("READY=1"))[-1]
        assert ready.startswith("READY=1\nSTATUS=1/1 providers running, 1 workers, queue ")
        _until(sock, pids, lambda m: m == "WATCHDOG=1")
        status = _until(sock, pids, lambda m: "saved 3" in m)[-1]
        assert status.startswith("STATUS=1/1 providers running, 1 workers, queue 0/100, ")
        daemon.signal(signal.SIGHUP)
        reloading = _until(sock, pids, lambda m: m.startswith("RELOADING=1"))[-1]
        assert reloading.split("\n")[1].startswith("MONOTONIC_USEC=")
        _until(sock, pids, lambda m: m.startswith("READY=1"))
        daemon.signal(signal.SIGTERM)
        stopping = _until(sock, pids, lambda m: m.startswith("STOPPING=1"))[-1]
        assert stopping == "STOPPING=1\nSTATUS=stopping: draining in-flight work"
        assert daemon.wait_exit(30) == 0
    finally:
        daemon.close()
        sock.close()
    # NotifyAccess=main: only the supervisor itself may speak, never a child.
    assert pids == {daemon.pid}


_ENV_PROBE_PY = """\
import os

from stoq import Payload, PayloadMeta
from stoq.plugins import ProviderPlugin


class EnvProbe(ProviderPlugin):
    def ingest(self, queue):
        names = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
        seen = {name: os.environ.get(name, "unset") for name in names}
        queue.put(Payload(b"probe", PayloadMeta(extra_data=seen)))
"""


def test_children_do_not_inherit_the_notify_socket(short_dir: Path) -> None:
    """A plugin calling sd_notify must not speak for the daemon (READY, WATCHDOG)."""
    config = held_config(short_dir, count=0)
    plugin = short_dir / "plugins" / "envprobe"
    plugin.mkdir()
    (plugin / "envprobe.stoq").write_text("[Core]\nName = envprobe\nModule = envprobe\n")
    (plugin / "envprobe.py").write_text(_ENV_PROBE_PY)
    config.write_text(config.read_text().replace("providers = heldprov", "providers = envprobe"))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(short_dir / "notify.sock"))
    env = {"NOTIFY_SOCKET": str(short_dir / "notify.sock"), "WATCHDOG_USEC": "1000000"}
    daemon = Daemon(config, env=env)
    try:
        assert daemon.wait_exit(30) == 0, daemon.log()
    finally:
        daemon.close()
        sock.close()
    (result,) = [
        json.loads(line) for line in (short_dir / "results.jsonl").read_text().splitlines()
    ]
    seen = result["results"][0]["payload_meta"]["extra_data"]
    assert seen == {"NOTIFY_SOCKET": "unset", "WATCHDOG_USEC": "unset", "WATCHDOG_PID": "unset"}
