"""The provider side of the queue over a real socketpair: credits, shutdown, file reads."""

from __future__ import annotations

import errno
import os
import queue
import resource
import select
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from stoqd.wire import Decoder, Endpoint
from stoqd.workqueue import ItemError, Outcome, ProviderQueue, read_file

_PEERS: list[socket.socket] = []  # the supervisor's ends, kept open for the tests' lifetime


def _queue(tmp_path: Path) -> ProviderQueue:
    ours, theirs = socket.socketpair()
    _PEERS.append(theirs)
    return ProviderQueue(Endpoint(ours), inline_max_bytes=16, spool_dir=str(tmp_path))


def test_a_put_without_credit_and_no_wait_is_full(tmp_path: Path) -> None:
    with pytest.raises(queue.Full):
        _queue(tmp_path).put(b"x", block=False)


def test_a_bounded_put_during_shutdown_is_full_after_its_timeout(tmp_path: Path) -> None:
    provider_queue = _queue(tmp_path)
    provider_queue.on_message({"t": "credit", "n": 5})
    provider_queue.on_message({"t": "stop"})
    outcome: list[BaseException] = []

    def bounded_put() -> None:
        try:
            provider_queue.put(b"x", timeout=0.2)
        except BaseException as exc:
            outcome.append(exc)

    started = time.monotonic()
    putter = threading.Thread(target=bounded_put, daemon=True)
    putter.start()
    putter.join(timeout=30)  # it returns: not blocked until the SIGTERM that follows
    assert [type(exc) for exc in outcome] == [queue.Full]
    assert time.monotonic() - started >= 0.2  # after waiting as long as it was asked to
    with pytest.raises(queue.Full):
        provider_queue.put(b"y" * 100, block=False)  # spooled: its spool copy is removed
    assert list(tmp_path.iterdir()) == []


def test_read_file_refuses_a_symbolic_link(tmp_path: Path) -> None:
    (tmp_path / "real").write_bytes(b"data")
    os.symlink(tmp_path / "real", tmp_path / "link")
    assert read_file(str(tmp_path / "real"), 0) == b"data"
    message = r"^cannot read .*/link: Too many levels of symbolic links$"
    with pytest.raises(ItemError, match=message):
        read_file(str(tmp_path / "link"), 0)


def _queue_and_peer(tmp_path: Path) -> tuple[ProviderQueue, socket.socket]:
    ours, theirs = socket.socketpair()
    _PEERS.append(theirs)
    return ProviderQueue(Endpoint(ours), inline_max_bytes=16, spool_dir=str(tmp_path)), theirs


def _frames_waiting(peer: socket.socket, timeout: float = 0.0) -> list:
    """The frames the supervisor's end can read within ``timeout``, without blocking."""
    if not select.select([peer], [], [], timeout)[0]:
        return []
    peer.setblocking(False)
    try:
        return Decoder().feed(peer.recv(1 << 20))
    finally:
        peer.setblocking(True)


def test_puts_in_a_batch_reach_the_supervisor_together_when_it_ends(tmp_path: Path) -> None:
    provider_queue, peer = _queue_and_peer(tmp_path)
    provider_queue.on_message({"t": "credit", "n": 3})
    with provider_queue.batched():
        provider_queue.put(b"one")
        provider_queue.put(b"two")
        assert _frames_waiting(peer, 0.2) == []  # held back
    assert [body for _, body in _frames_waiting(peer, 5)] == [b"one", b"two"]
    provider_queue.put(b"three")  # outside a batch: sent at once
    assert [body for _, body in _frames_waiting(peer, 5)] == [b"three"]


def test_a_batched_put_that_waits_for_room_first_sends_what_is_held(tmp_path: Path) -> None:
    provider_queue, peer = _queue_and_peer(tmp_path)
    provider_queue.on_message({"t": "credit", "n": 1})
    waiting = threading.Event()

    def burst() -> None:
        with provider_queue.batched():
            provider_queue.put(b"first")
            waiting.set()
            provider_queue.put(b"second", timeout=30)  # no credit left: waits

    putter = threading.Thread(target=burst, daemon=True)
    putter.start()
    assert waiting.wait(5)
    # "first" holds the only credit: stoqd gets it while "second" waits for room.
    assert [body for _, body in _frames_waiting(peer, 5)] == [b"first"]
    provider_queue.on_message({"t": "credit", "n": 1})
    putter.join(timeout=30)
    assert [body for _, body in _frames_waiting(peer, 5)] == [b"second"]


def test_a_batch_holds_at_most_sixteen_puts(tmp_path: Path) -> None:
    provider_queue, peer = _queue_and_peer(tmp_path)
    provider_queue.on_message({"t": "credit", "n": 20})
    with provider_queue.batched():
        for number in range(17):
            provider_queue.put(b"%d" % number)
        assert len(_frames_waiting(peer, 5)) == 16
    assert [body for _, body in _frames_waiting(peer, 5)] == [b"16"]


def test_a_failing_done_callback_does_not_keep_the_others_from_their_outcomes(
    tmp_path: Path,
) -> None:
    provider_queue = _queue(tmp_path)
    provider_queue.on_message({"t": "credit", "n": 3})
    outcomes: list = []

    def broken(outcome: Outcome) -> None:
        raise RuntimeError("ack failed")

    provider_queue.put(b"a", done=outcomes.append)
    provider_queue.put(b"b", done=broken)
    provider_queue.put(b"c", done=outcomes.append)
    assert provider_queue.qsize() == 3
    provider_queue.on_message(
        {"t": "done", "items": [[1, "saved", None, "s1"], [2, "saved", None, "s2"],
                                [3, "failed", "disk full", None]]}
    )  # fmt: skip
    assert outcomes == [Outcome("saved", None, "s1"), Outcome("failed", "disk full", None)]
    assert provider_queue.qsize() == 0
    provider_queue.wait_idle()  # returns: nothing is owed


def test_outcomes_after_a_callback_that_exits_stay_owed(tmp_path: Path) -> None:
    provider_queue = _queue(tmp_path)
    provider_queue.on_message({"t": "credit", "n": 2})
    outcomes: list = []

    def leaving(outcome: Outcome) -> None:
        raise SystemExit(1)

    provider_queue.put(b"a", done=leaving)
    provider_queue.put(b"b", done=outcomes.append)
    with pytest.raises(SystemExit):
        provider_queue.on_message(
            {"t": "done", "items": [[1, "saved", None, "s1"], [2, "saved", None, "s2"]]}
        )
    assert outcomes == []
    # Neither callback finished: both stay owed, so wait_idle does not report idle.
    assert provider_queue.qsize() == 2


def test_a_payload_that_cannot_be_spooled_whole_leaves_no_file(tmp_path: Path) -> None:
    # The spool full (here: a file size limit, EFBIG): the put fails, nothing half-written.
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1000, limits[1]))
    try:
        with pytest.raises(OSError) as raised:
            _queue(tmp_path).put(b"x" * 5000)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, previous)
    assert raised.value.errno == errno.EFBIG
    assert list(tmp_path.iterdir()) == []


def test_spooled_payloads_are_named_after_the_process_that_spooled_them(tmp_path: Path) -> None:
    provider_queue = _queue(tmp_path)
    provider_queue.on_message({"t": "credit", "n": 1})
    provider_queue.put(b"x" * 100)
    (spooled,) = tmp_path.iterdir()
    assert spooled.name.startswith(f"payload-{os.getpid()}-")
