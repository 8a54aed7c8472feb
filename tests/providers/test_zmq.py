"""The zmq provider over real ZeroMQ sockets (tcp and ipc), in-process and in the daemon."""

from __future__ import annotations

import json
import queue as stdlib_queue
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable, List

import pytest
import zmq

from stoqd.framework.data import Payload
from stoqd.framework.exceptions import StoqPluginException
from stoqd.framework.loader import PluginRegistry
from stoqd.testing import Daemon, RecordingQueue, read_jsonl, temp_dir, write_config

REGISTRY = PluginRegistry()


def build(**opts: Any) -> Any:
    return REGISTRY.load("zmq", {k: str(v) for k, v in opts.items()})


def free_tcp() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{probe.getsockname()[1]}"


class Running:
    """``ingest`` on a thread against ``queue``; ``stop()`` returns once it returned."""

    def __init__(self, plugin: Any, queue: RecordingQueue) -> None:
        self.queue = queue
        self.errors: List[BaseException] = []
        self.thread = threading.Thread(target=self._run, args=(plugin,), daemon=True)
        self.thread.start()

    def _run(self, plugin: Any) -> None:
        try:
            plugin.ingest(self.queue)
        except BaseException as exc:  # handed to the test
            self.errors.append(exc)

    def wait(self, predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.02)
        raise AssertionError(f"timed out waiting for {what}; stats {self.queue.stats}")

    def stop(self) -> RecordingQueue:
        self.queue.stopping.set()
        self.thread.join(10)
        assert not self.thread.is_alive()
        if self.errors:
            raise self.errors[0]
        return self.queue


class Collecting(RecordingQueue):
    """Records puts and answers ``saved``; stays open until told to stop."""

    def _record(self, put: Any) -> None:
        self.puts.append(put)
        if put.done is not None:
            put.done(self.outcome(put))


@pytest.fixture
def short_dir() -> Any:
    """A directory with a short path (ipc socket paths are limited to 107 characters)."""
    path = temp_dir("zmq-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def context() -> Any:
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def _push(context: Any, endpoint: str, **options: int) -> Any:
    """A PUSH socket connected to ``endpoint``, with ``options`` (zmq names) set before
    it connects: a buffer size set later may miss the connection made in between."""
    sock = context.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 1000)
    for name, value in options.items():
        sock.setsockopt(getattr(zmq, name), value)
    sock.connect(endpoint)
    return sock


@pytest.mark.parametrize("transport", ["tcp", "ipc"])
def test_pull_receives_single_and_metadata_frames(
    context: Any, transport: str, short_dir: Path
) -> None:
    endpoint = free_tcp() if transport == "tcp" else f"ipc://{short_dir}/in.sock"
    running = Running(build(endpoint=endpoint), Collecting())
    push = _push(context, endpoint)
    push.send_multipart([b"raw bytes"])
    metadata = {"extra_data": {"sensor": "s1"}, "dispatch_to": ["hash"], "should_archive": False}
    push.send_multipart([json.dumps(metadata).encode(), b"with metadata"])
    running.wait(lambda: len(running.queue.puts) == 2, "two payloads")
    queue = running.stop()
    first, second = (p.item for p in queue.puts)
    assert isinstance(first, Payload) and first.content == b"raw bytes"
    assert second.content == b"with metadata"
    assert second.payload_meta.extra_data == {"sensor": "s1"}
    assert second.payload_meta.dispatch_to == ["hash"]
    assert second.payload_meta.should_archive is False
    assert queue.stats["saved"] == 2 and queue.stats["received"] == 2
    assert queue.stats["acknowledgement"].startswith("none: ZeroMQ has no acknowledgement")


@pytest.mark.parametrize(
    "frames, reason",
    [
        ([b"{bad", b"x"], "metadata frame is not valid JSON"),
        ([b"[1]", b"x"], "metadata frame must be a JSON object"),
        ([b'{"extra": {}}', b"x"], "metadata key 'extra' is not one of extra_data, dispatch_to"),
        ([b"a", b"b", b"c"], "message of 3 frames: expected [payload] or [metadata, payload]"),
        ([b"x" * 2048], "payload of 2048 bytes exceeds max_message_size 1024"),
        ([b'{"dispatch_to": "hash"}', b"x"], "metadata dispatch_to must be a list of worker"),
    ],
)
def test_malformed_message_is_dropped_and_receiving_goes_on(
    context: Any, frames: List[bytes], reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    endpoint = free_tcp()
    running = Running(build(endpoint=endpoint, max_message_size="1K"), Collecting())
    push = _push(context, endpoint)
    push.send_multipart(frames)
    push.send_multipart([b"good"])
    running.wait(lambda: len(running.queue.puts) == 1, "the good payload")
    queue = running.stop()
    assert queue.puts[0].item.content == b"good"
    assert queue.stats["dropped"] == 1
    assert queue.stats["last_error"].startswith(reason)
    assert any(r.getMessage().startswith(f"message dropped: {reason}") for r in caplog.records)


def test_sub_filters_topics(context: Any) -> None:
    endpoint = free_tcp()
    publisher = context.socket(zmq.PUB)
    publisher.bind(endpoint)
    running = Running(
        build(socket_type="sub", endpoint=endpoint, bind="false", topics="alerts, files"),
        Collecting(),
    )
    # PUB drops everything until the subscription has arrived: send until one lands.
    deadline = time.monotonic() + 10
    while not running.queue.puts and time.monotonic() < deadline:
        publisher.send_multipart([b"alerts", b"probe"])
        time.sleep(0.05)
    publisher.send_multipart([b"noise", b"not subscribed"])
    publisher.send_multipart([b"files.exe", b'{"extra_data": {"n": 1}}', b"MZ"])
    running.wait(lambda: any(p.item.content == b"MZ" for p in running.queue.puts), "MZ")
    queue = running.stop()
    contents = [p.item.content for p in queue.puts]
    assert b"not subscribed" not in contents
    mz = next(p.item for p in queue.puts if p.item.content == b"MZ")
    assert mz.payload_meta.extra_data == {"topic": "files.exe", "n": 1}


class FullQueue(Collecting):
    """stoqd's queue while it is full: every put times out until ``opened`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.opened = threading.Event()

    def put(self, item: Any, block: bool = True, timeout: Any = None, **kw: Any) -> None:
        if not self.opened.wait(timeout):
            raise stdlib_queue.Full
        super().put(item, block, timeout, **kw)


@pytest.mark.parametrize("hwm", [10, 200])
def test_high_water_mark_is_the_backpressure(context: Any, short_dir: Path, hwm: int) -> None:
    # While stoqd's queue is full the provider holds the one message it received; ZeroMQ
    # then buffers ``hwm`` more and the sender blocks. What else holds messages is kept to
    # a few: ipc (no TCP windows), messages of 10 KiB, a sender SNDHWM of 1 and a small
    # SNDBUF, so the sender gets out hwm + 7 messages here; unset, RCVHWM is 1000.
    endpoint = f"ipc://{short_dir}/in.sock"
    queue = FullQueue()
    running = Running(build(endpoint=endpoint, hwm=hwm), queue)
    running.wait(lambda: bool(queue.stats.get("connection")), "the socket bound")
    push = _push(context, endpoint, SNDHWM=1, SNDBUF=4096)
    padding = b"\0" * (10 * 1024 - 8)
    sent = 0
    while True:  # until the sender has been held back for 2 s: every buffer is full
        try:
            push.send(b"%08d" % sent + padding, flags=zmq.NOBLOCK)
            sent += 1
        except zmq.Again:
            if not push.poll(2000, zmq.POLLOUT):
                break
    assert hwm <= sent <= hwm + 20, f"{sent} messages sent before the sender blocked"
    queue.opened.set()
    running.wait(lambda: len(queue.puts) == sent, "every message sent")
    running.stop()
    assert [p.item.content for p in queue.puts] == [b"%08d" % n + padding for n in range(sent)]


def test_options_are_checked() -> None:
    with pytest.raises(StoqPluginException) as error:
        build(endpoint="tcp://127.0.0.1:1", socket_type="router")
    assert str(error.value) == "plugin zmq: option socket_type='router' must be pull or sub"
    with pytest.raises(StoqPluginException) as error:
        build()
    assert str(error.value) == "plugin zmq: option endpoint is required"


def test_endpoint_that_cannot_be_bound_is_named(context: Any) -> None:
    endpoint = free_tcp()
    taken = context.socket(zmq.PULL)
    taken.bind(endpoint)
    running = Running(build(endpoint=endpoint), Collecting())
    running.thread.join(10)
    assert str(running.errors[0]) == (
        f"plugin zmq: cannot bind {endpoint}: Address already in use (addr='{endpoint}')"
    )


def test_daemon_scans_what_is_pushed(context: Any) -> None:
    root = temp_dir("stoqd-zmq-")
    endpoint = f"ipc://{root}/in.sock"
    config = write_config(root, {
        "core": {"providers": "zmq", "connectors": "jsonl", "always_dispatch": "hash"},
        "stoqd": {"workers": 1},
        "zmq": {"endpoint": endpoint},
        "jsonl": {"output_file": "${here}/results.jsonl"},
    })  # fmt: skip
    daemon = Daemon(config)
    try:
        daemon.wait_for(lambda s: (daemon.provider("zmq").get("stats") or {}).get("connection"),
                        what="the socket bound")  # fmt: skip
        push = _push(context, endpoint)
        for number in range(20):
            push.send_multipart([b'{"extra_data": {"n": %d}}' % number, b"payload %d" % number])
        daemon.wait_for(lambda s: daemon.provider("zmq")["stats"].get("saved") == 20,
                        what="twenty results")  # fmt: skip
        numbers = sorted(response["results"][0]["payload_meta"]["extra_data"]["n"]
                         for response in read_jsonl(root / "results.jsonl"))  # fmt: skip
        assert numbers == list(range(20))
        status = daemon.provider("zmq")["stats"]
        assert status["acknowledgement"].startswith("none: ZeroMQ has no acknowledgement")
    finally:
        daemon.close()
        shutil.rmtree(root, ignore_errors=True)
