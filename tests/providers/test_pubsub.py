"""The pubsub provider and connector against the official Pub/Sub emulator.

Each test has its own topic and subscription (the emulator keeps feeding a cancelled
stream for a while, so nothing is shared between tests).
"""

from __future__ import annotations

import json
import os
import queue as stdlib_queue
import shutil
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pytest
from google.cloud import pubsub_v1
from services import PubsubEmulator

from stoqd.framework.data import Payload, RequestMeta, StoqResponse, new_errors
from stoqd.framework.data import PayloadResults as Results
from stoqd.framework.exceptions import StoqPluginException
from stoqd.framework.loader import PluginRegistry
from stoqd.testing import (
    Daemon,
    RecordingQueue,
    read_jsonl,
    temp_dir,
    wait_until,
    write_config,
)
from stoqd.workqueue import FAILED, Outcome

pytestmark = pytest.mark.services

REGISTRY = PluginRegistry()
PROJECT = "stoqd-test"


def build(**opts: Any) -> Any:
    return REGISTRY.load("pubsub", {k: str(v) for k, v in {"project_id": PROJECT, **opts}.items()})


class Topic:
    """A fresh topic with one subscription (10 s ack deadline) on the emulator."""

    def __init__(self) -> None:
        name = uuid.uuid4().hex[:10]
        self.publisher = pubsub_v1.PublisherClient()
        self.subscriber = pubsub_v1.SubscriberClient()
        self.topic = f"topic-{name}"
        self.subscription = f"sub-{name}"
        self.topic_path = self.publisher.topic_path(PROJECT, self.topic)
        self.sub_path = self.subscriber.subscription_path(PROJECT, self.subscription)
        self.publisher.create_topic(name=self.topic_path)
        self.subscriber.create_subscription(
            name=self.sub_path, topic=self.topic_path, ack_deadline_seconds=10
        )

    def publish(self, data: bytes, **attributes: str) -> str:
        return str(self.publisher.publish(self.topic_path, data, **attributes).result(30))

    def listen(self, topic: str) -> Topic:
        """A subscription on another topic (created if missing), to read what lands there."""
        other = Topic.__new__(Topic)
        other.publisher, other.subscriber = self.publisher, self.subscriber
        other.topic, other.topic_path = topic, self.publisher.topic_path(PROJECT, topic)
        other.subscription = f"listen-{uuid.uuid4().hex[:10]}"
        other.sub_path = self.subscriber.subscription_path(PROJECT, other.subscription)
        try:
            self.publisher.create_topic(name=other.topic_path)
        except Exception:  # AlreadyExists
            pass
        self.subscriber.create_subscription(name=other.sub_path, topic=other.topic_path)
        return other

    def pull(self, want: int, timeout: float = 20.0) -> List[Tuple[bytes, Dict[str, str]]]:
        """Pull and ack until ``want`` messages arrived (or ``timeout``)."""
        got: List[Tuple[bytes, Dict[str, str]]] = []
        deadline = time.monotonic() + timeout
        while len(got) < want and time.monotonic() < deadline:
            response = self.subscriber.pull(subscription=self.sub_path, max_messages=10, timeout=5)
            ids = []
            for received in response.received_messages:
                got.append((received.message.data, dict(received.message.attributes)))
                ids.append(received.ack_id)
            if ids:
                self.subscriber.acknowledge(subscription=self.sub_path, ack_ids=ids)
        return got


@pytest.fixture
def topic(mq_pubsub: PubsubEmulator) -> Topic:
    return Topic()


def consume(plugin: Any, outcome: Any = None, max_items: Optional[int] = None,
            timeout: float = 15.0) -> RecordingQueue:  # fmt: skip
    """Run ``ingest`` until ``max_items`` were put or ``timeout``; return once it returned."""
    queue = RecordingQueue(max_items=max_items)
    if outcome is not None:
        queue.outcome = outcome
    errors: List[BaseException] = []

    def target() -> None:
        try:
            plugin.ingest(queue)
        except BaseException as exc:  # handed to the test
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while thread.is_alive() and time.monotonic() < deadline and not queue.stopping.is_set():
        time.sleep(0.05)
    queue.stopping.set()
    thread.join(30)
    assert not thread.is_alive(), "the provider did not return after stopping"
    if errors:
        raise errors[0]
    return queue


# -- the fixture itself --------------------------------------------------------------------


def test_emulator_round_trips_a_message(topic: Topic) -> None:
    topic.publish(b"hello", source="test")
    assert topic.pull(1) == [(b"hello", {"source": "test"})]


# -- messages become work --------------------------------------------------------------------


def test_message_becomes_payload_with_attributes(topic: Topic) -> None:
    message_id = topic.publish(b"payload one", sensor="s1")
    recorded = consume(build(subscription=topic.subscription), max_items=1)
    [put] = recorded.puts
    assert isinstance(put.item, Payload) and put.item.content == b"payload one"
    extra = put.item.payload_meta.extra_data
    assert extra["attributes"] == {"sensor": "s1"}
    assert extra["message_id"] == message_id
    assert extra["subscription"] == topic.sub_path
    assert recorded.stats["acked"] == 1


def test_json_message_is_an_archiver_reference(topic: Topic) -> None:
    reference = {"filedir": {"sha256": "cd" * 32}}
    topic.publish(json.dumps(reference).encode(), content_type="application/json")
    [put] = consume(build(subscription=topic.subscription), max_items=1).puts
    assert put.item == reference


def test_failed_scan_is_redelivered_then_dead_lettered(topic: Topic) -> None:
    dead = topic.listen(f"dead-{uuid.uuid4().hex[:8]}")
    topic.publish(b"never saved")
    plugin = build(subscription=topic.subscription, max_retries=2, dead_letter_topic=dead.topic)
    failed = lambda put: Outcome(FAILED, error="connector jsonl failed: disk full")  # noqa: E731
    recorded = consume(plugin, outcome=failed, max_items=3)
    assert [p.item.content for p in recorded.puts] == [b"never saved"] * 3
    [(data, attributes)] = dead.pull(1)
    assert data == b"never saved"
    assert attributes["stoqd_error"] == "failed 3 times: connector jsonl failed: disk full"


@pytest.mark.parametrize(
    "body, reason",
    [
        (b"{not json", "JSON message is not valid JSON"),
        (b"[1, 2]", "JSON message is not a stoQ archiver reference"),
        (b"x" * 2048, "message of 2048 bytes exceeds max_message_size 1024"),
    ],
)
def test_malformed_message_is_dead_lettered_and_consuming_goes_on(
    topic: Topic, body: bytes, reason: str
) -> None:
    dead = topic.listen(f"dead-{uuid.uuid4().hex[:8]}")
    topic.publish(body, content_type="application/json")
    topic.publish(b"good")
    plugin = build(subscription=topic.subscription, dead_letter_topic=dead.topic,
                   max_message_size="1K")  # fmt: skip
    recorded = consume(plugin, max_items=1)
    assert [p.item.content for p in recorded.puts] == [b"good"]
    [(data, attributes)] = dead.pull(1)
    assert data == body and attributes["stoqd_error"].startswith(reason)


def test_lease_is_extended_while_a_long_scan_runs(topic: Topic) -> None:
    topic.publish(b"slow to scan")

    def slow(put: Any) -> Outcome:  # longer than the subscription's 10 s ack deadline
        time.sleep(13)
        return Outcome("saved")

    recorded = consume(build(subscription=topic.subscription), outcome=slow, timeout=16)
    assert [p.item.content for p in recorded.puts] == [b"slow to scan"]
    # Not redelivered: a lease that lapsed mid-scan brings the message back on another
    # callback thread, where it is parked behind the scan and acked as a duplicate (one
    # put all the same), so the deliveries themselves are counted.
    stats = recorded.stats
    assert (stats["received"], stats["duplicates_skipped"], stats["nacked"]) == (1, 0, 0), stats
    assert stats["acked"] == 1


class HoldingQueue(RecordingQueue):
    """Records puts and never reports an outcome: every message stays outstanding."""

    def _record(self, put: Any) -> None:
        if self.stopping.is_set():
            raise stdlib_queue.Full
        self.puts.append(put)


def test_flow_control_bounds_outstanding_messages(topic: Topic) -> None:
    for number in range(10):
        topic.publish(b"%d" % number)
    holding = HoldingQueue()
    plugin = build(subscription=topic.subscription, max_messages=3)
    thread = threading.Thread(target=plugin.ingest, args=(holding,), daemon=True)
    thread.start()
    wait_until(lambda: len(holding.puts) == 3, what="three messages", timeout=20)
    time.sleep(1)  # room for a fourth, were flow control not enforced
    assert len(holding.puts) == 3
    for put in list(holding.puts):
        put.done(Outcome("saved"))
    wait_until(lambda: len(holding.puts) == 6, what="three more", timeout=20)
    holding.stopping.set()
    for put in holding.puts[3:]:
        put.done(Outcome("saved"))
    thread.join(30)
    assert not thread.is_alive()


@pytest.mark.parametrize("outcome", ["saved", "failed"])
def test_a_message_redelivered_while_it_is_scanned_is_not_put_twice(
    topic: Topic, outcome: str
) -> None:
    # The client stops extending a lease after max_lease_duration; the emulator then
    # delivers the message again, with the same id, while its first delivery is in stoqd.
    # Pub/Sub delivers at least once; the provider must not turn that into two scans. The
    # repeat waits for the first delivery's outcome: acked with it when it was saved,
    # nacked with it when it failed (the message then comes back as one delivery).
    topic.publish(b"scanned for a long time")
    holding = HoldingQueue()
    plugin = build(subscription=topic.subscription, max_lease_duration=1, lease_extension=10)
    thread = threading.Thread(target=plugin.ingest, args=(holding,), daemon=True)
    thread.start()
    answered: List[Any] = []

    def answer(put: Any, status: str) -> None:
        answered.append(put)
        put.done(Outcome(status, error="scan failed" if status == "failed" else None))

    try:
        wait_until(lambda: holding.stats.get("received") == 2, what="the redelivery",
                   timeout=40)  # fmt: skip
        assert len(holding.puts) == 1
        answer(holding.puts[0], outcome)
        if outcome == "failed":
            wait_until(lambda: len(holding.puts) == 2, what="the retry", timeout=30)
            # The first delivery and its repeat (stats are reported every half second).
            wait_until(lambda: holding.stats.get("nacked") == 2, what="2 nacks", timeout=5)
            answer(holding.puts[1], "saved")
        wait_until(lambda: holding.stats.get("acked") == 1 and
                   holding.stats.get("in_flight") == 0, what="the message acked",
                   timeout=10)  # fmt: skip
        skipped = holding.stats["duplicates_skipped"]
        assert skipped == (1 if outcome == "saved" else 0)
        assert len(holding.puts) == (1 if outcome == "saved" else 2)
    finally:
        holding.stopping.set()
        for put in holding.puts:  # a failed wait leaves nothing leased behind
            if put not in answered:
                put.done(Outcome("not_done"))
        thread.join(30)
    assert not thread.is_alive()


def test_a_message_delivered_again_after_it_was_saved_is_acked_at_once_not_rescanned(
    topic: Topic,
) -> None:
    # Pub/Sub can deliver a message again after it was acked (an ack lost on the way).
    # Seeking the subscription back to a snapshot taken before the ack does that here:
    # the same message, with the same id, delivered to the provider that saved it.
    topic.publish(b"saved once")
    snapshot = topic.subscriber.snapshot_path(PROJECT, f"snap-{topic.subscription}")
    topic.subscriber.create_snapshot(name=snapshot, subscription=topic.sub_path)
    queue = RecordingQueue()  # every put saved at once
    plugin = build(subscription=topic.subscription)
    thread = threading.Thread(target=plugin.ingest, args=(queue,), daemon=True)
    thread.start()
    try:
        wait_until(lambda: queue.stats.get("acked") == 1, what="the first delivery acked",
                   timeout=20)  # fmt: skip
        # The client sends acks in batches a little later: a seek that lands before the
        # ack would be undone by it, so it is repeated until the message comes back.
        for _ in range(4):
            topic.subscriber.seek(request={"subscription": topic.sub_path, "snapshot": snapshot})
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and not queue.stats.get("duplicates_skipped"):
                time.sleep(0.1)
            if queue.stats.get("duplicates_skipped"):
                break
        assert queue.stats.get("duplicates_skipped", 0) >= 1, queue.stats
        assert [put.item.content for put in queue.puts] == [b"saved once"]
    finally:
        queue.stopping.set()
        thread.join(30)
        topic.subscriber.delete_snapshot(snapshot=snapshot)
    assert not thread.is_alive()
    # Acked, not left to come back once its ack deadline (10 s) lapses.
    assert topic.pull(1, timeout=12) == []


def test_missing_subscription_is_named(mq_pubsub: PubsubEmulator) -> None:
    with pytest.raises(StoqPluginException) as error:
        consume(build(subscription="no-such-sub"))
    assert str(error.value) == (
        f"plugin pubsub: subscription projects/{PROJECT}/subscriptions/no-such-sub does not "
        "exist (set create = true and topic to create it)"
    )


def test_create_makes_topic_and_subscription(mq_pubsub: PubsubEmulator) -> None:
    name = uuid.uuid4().hex[:8]
    plugin = build(subscription=f"sub-{name}", topic=f"topic-{name}", create="true")
    publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()

    def publish_once_created() -> None:
        path = subscriber.subscription_path(PROJECT, f"sub-{name}")
        wait_until(lambda: _exists(subscriber, path), what="the subscription", timeout=10)
        publisher.publish(publisher.topic_path(PROJECT, f"topic-{name}"), b"after").result(30)

    threading.Thread(target=publish_once_created, daemon=True).start()
    [put] = consume(plugin, max_items=1).puts
    assert put.item.content == b"after"


def _exists(subscriber: Any, path: str) -> bool:
    try:
        subscriber.get_subscription(subscription=path)
        return True
    except Exception:  # NotFound until the provider created it
        return False


def test_project_id_is_required() -> None:
    with pytest.raises(StoqPluginException) as error:
        REGISTRY.load("pubsub", {})
    assert str(error.value) == "plugin pubsub: option project_id is required"


def test_lease_extension_outside_what_pubsub_accepts_is_refused() -> None:
    with pytest.raises(StoqPluginException) as error:
        build(lease_extension=5)
    assert str(error.value) == (
        "plugin pubsub: option lease_extension=5 must be between 10 and 600 seconds"
    )


# -- the connector -------------------------------------------------------------------------


def _response(archivers: Optional[Dict[str, Any]] = None) -> StoqResponse:
    results = Results.from_payload(Payload(b"content"))
    results.archivers = archivers or {}
    return StoqResponse([results], RequestMeta(), new_errors(), scan_id="scan-1")


def test_connector_publishes_results(topic: Topic) -> None:
    build(publish_topic=topic.topic).save(_response())
    [(data, attributes)] = topic.pull(1)
    assert json.loads(data)["scan_id"] == "scan-1"
    assert attributes == {"content_type": "application/json", "stoqd_message_id": "scan-1"}


def test_connector_references_are_read_by_the_provider(topic: Topic) -> None:
    task = {"path": "ab/cd/abcd"}
    build(publish_topic=topic.topic).save(_response({"filedir": task}))
    [put] = consume(build(subscription=topic.subscription), max_items=1).puts
    assert put.item == {"filedir": task}


def test_connector_to_a_missing_topic_fails_saving(mq_pubsub: PubsubEmulator) -> None:
    with pytest.raises(StoqPluginException) as error:
        build(publish_topic="no-such-topic").save(_response())
    assert str(error.value).startswith(
        f"plugin pubsub: cannot publish to projects/{PROJECT}/topics/no-such-topic: NotFound"
    )


# -- through the real daemon -----------------------------------------------------------------

# The "gate" worker (tests/fixtures/daemon_plugins/gate) holds, slows or SIGKILLs its
# worker by the payload's first word: HOLD, SLOW, KILL, POISON.
PLUGINS = Path(__file__).resolve().parents[1] / "fixtures" / "daemon_plugins"


def _daemon_dir(topic: Topic, emulator: PubsubEmulator) -> Tuple[Path, Path]:
    root = temp_dir("stoqd-ps-")
    config = write_config(root, {
        "core": {"providers": "pubsub", "connectors": "jsonl", "always_dispatch": "gate",
                 "plugin_dir_list": str(PLUGINS)},
        "gate": {"gate_dir": str(root)},
        "stoqd": {"workers": 2, "backoff_initial": 0.1, "backoff_max": 1, "startretries": 100},
        # Leases of 30 s: the killed provider's messages come back 30 s after their last
        # lease, not after the client's default of 60 s. Not shorter: the live provider
        # extends its leases at a random moment before they end, and on a loaded machine
        # a 10 s lease can lapse mid-scan, which Pub/Sub answers with a second delivery.
        "pubsub": {"project_id": PROJECT, "subscription": topic.subscription,
                   "max_messages": 5, "lease_extension": 30},
        "jsonl": {"output_file": "${here}/results.jsonl"},
    })  # fmt: skip
    return config, root / "results.jsonl"


def _saved_ids(results: Path) -> List[str]:
    """The message id of every saved result, in order (failure records have none)."""
    saved = []
    for response in read_jsonl(results):
        payloads = response["results"]
        if payloads:  # a record of why an item could not be scanned has no payload
            saved.append(payloads[0]["payload_meta"]["extra_data"]["message_id"])
    return saved


def test_daemon_acks_after_saving_and_kill_9_of_the_provider_loses_nothing(
    topic: Topic, mq_pubsub: PubsubEmulator
) -> None:
    ids = [topic.publish(b"SLOW message %d" % n) for n in range(40)]
    config, results = _daemon_dir(topic, mq_pubsub)
    daemon = Daemon(config, env=mq_pubsub.env)
    try:
        stats = lambda: daemon.provider("pubsub").get("stats") or {}  # noqa: E731
        daemon.wait_for(lambda s: (stats().get("acked") or 0) >= 5, what="some acks")
        first = daemon.provider("pubsub")["pid"]
        os.kill(first, signal.SIGKILL)
        daemon.wait_for(lambda s: daemon.provider("pubsub")["pid"] not in (None, first),
                        what="the provider restarted")  # fmt: skip
        # Messages leased by the killed process come back after their 30 s lease; the
        # emulator may first send some to the dead stream once more (INFRA.md): ~60 s,
        # and again after each lapsed lease while it still feeds that stream. Runs here
        # took 10-70 s; one fresh-clone run saw nothing redelivered within 180 s, so the
        # wait is 300 s (the emulator's schedule, not stoqd's: nothing is asserted on it).
        saved = lambda: set(_saved_ids(results)) == set(ids)  # noqa: E731

        def missing() -> str:
            return (f"not saved: {sorted(set(ids) - set(_saved_ids(results)))}\n"
                    f"provider: {daemon.provider('pubsub')}\n{daemon.log()[-20000:]}")  # fmt: skip

        wait_until(saved, what="every message saved", timeout=300, detail=missing)
        daemon.wait_for(lambda s: stats().get("in_flight") == 0, what="every outcome")
        # What the killed run handed over is answered, not scanned again, on redelivery.
        assert sorted(_saved_ids(results)) == sorted(ids)  # each exactly once
    finally:
        daemon.close()
        shutil.rmtree(config.parent, ignore_errors=True)
    # Everything was acknowledged: nothing comes back once the ack deadline has passed.
    time.sleep(11)
    assert topic.pull(1, timeout=5) == []


def send(topic: Topic, body: bytes) -> str:
    """Publish ``body`` with a unique ``key`` attribute; returns the key. Message ids will
    not do: a restarted emulator numbers its messages from 1 again."""
    key = uuid.uuid4().hex
    topic.publish(body, key=key)
    return key


class GateRun:
    """A stoqd daemon consuming ``topic``'s subscription through the ``gate`` worker."""

    def __init__(self, topic: Topic, emulator: PubsubEmulator, stoqd: Dict[str, Any],
                 pubsub: Dict[str, Any]) -> None:  # fmt: skip
        self.dir = temp_dir("stoqd-ps-")
        self.gate = self.dir / "gate"
        self.gate.mkdir()
        self.results = self.dir / "results.jsonl"
        config = write_config(self.dir, {
            "core": {"providers": "pubsub", "connectors": "jsonl", "always_dispatch": "gate",
                     "plugin_dir_list": str(PLUGINS)},
            "gate": {"gate_dir": str(self.gate)},
            "stoqd": {"workers": 2, "backoff_initial": 0.1, "backoff_max": 1,
                      "startretries": 100, **stoqd},
            "pubsub": {"project_id": PROJECT, "subscription": topic.subscription, **pubsub},
            "jsonl": {"output_file": "${here}/results.jsonl"},
        })  # fmt: skip
        self.daemon = Daemon(config, env=emulator.env)
        self.daemon.wait_for(lambda status: True, what="stoqd to answer")

    def stats(self) -> Dict[str, Any]:
        return self.daemon.provider("pubsub").get("stats") or {}

    def saved(self) -> List[str]:
        """The ``key`` attribute of every saved result (see ``send``)."""
        saved = []
        for response in read_jsonl(self.results):
            payloads = response["results"]
            if payloads:  # a record of why an item could not be scanned has no payload
                saved.append(payloads[0]["payload_meta"]["extra_data"]["attributes"]["key"])
        return saved

    def holding_pid(self) -> Optional[int]:
        try:
            return int((self.gate / "holding").read_text())
        except (OSError, ValueError):
            return None

    def wait(self, predicate: Any, what: str, timeout: float = 60.0) -> None:
        """Wait for ``predicate()``, checking all along that no message was acknowledged
        before its result was saved: the acks the provider reports never outnumber the
        saved results (read after the count, so a late save cannot excuse an early ack)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            acked = self.stats().get("acked") or 0
            saved = len(set(self.saved()))
            assert acked <= saved, f"{acked} messages acknowledged, {saved} results saved"
            if predicate():
                return
            time.sleep(0.1)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}; "
                             f"stats {self.stats()}\n{self.daemon.log()[-3000:]}")  # fmt: skip

    def close(self) -> None:
        self.daemon.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def test_kill_9_of_a_worker_mid_scan_saves_or_dead_letters_every_message(
    topic: Topic, mq_pubsub: PubsubEmulator
) -> None:
    """A worker SIGKILLed mid-scan costs nothing: stoqd scans the payload again and the
    message is acknowledged once its result is saved. A payload that kills every worker
    is quarantined (``max_attempts`` deaths), which fails the message: nacked, redelivered
    by Pub/Sub, quarantined again, then dead-lettered (``max_retries``) and acknowledged.
    A message whose worker the test kills from outside stays unacknowledged (leased by the
    provider) until its scan on another worker is saved.

    What the emulator cannot show: Pub/Sub has no call that lists a subscription's
    unacknowledged messages, so "not acknowledged before saved" is read from the
    provider's own ``acked`` count (checked against the saved results at every poll) and
    its ``in_flight`` lease, not from the broker.
    """
    dead = topic.listen(f"dead-{uuid.uuid4().hex[:8]}")
    bodies = [b"KILL %d" % n if n % 6 == 3 else b"SLOW %d" % n for n in range(18)]
    ids = [send(topic, body) for body in bodies]
    poison = send(topic, b"POISON pill")
    run = GateRun(topic, mq_pubsub, stoqd={"max_attempts": 2},
                  pubsub={"max_retries": 1, "dead_letter_topic": dead.topic,
                          "max_messages": 5})  # fmt: skip
    try:
        # 1. Workers killed by their payloads; one payload that kills every worker.
        run.wait(lambda: set(run.saved()) == set(ids) and run.stats().get("dead_lettered") == 1,
                 "every result and the dead letter")  # fmt: skip
        run.wait(lambda: run.stats().get("acked") == len(ids), "every ack")
        assert sorted(run.saved()) == sorted(ids)  # each exactly once, the poison never
        assert len(list(run.gate.glob("killed-*"))) == 3
        # Two deliveries of the poison, each quarantined after two worker deaths.
        assert (run.gate / "poisoned").read_text() == "xxxx"
        [(data, attributes)] = dead.pull(1)
        assert data == b"POISON pill" and attributes["key"] == poison
        assert attributes["stoqd_error"].startswith(
            "failed 2 times: quarantined: killed 2 workers while being scanned"
        )

        # 2. The test SIGKILLs the worker that is scanning a message.
        held = send(topic, b"HOLD me")
        run.wait(lambda: run.holding_pid() is not None, "the scan to start")
        first = run.holding_pid()
        assert first is not None
        os.kill(first, signal.SIGKILL)
        run.wait(lambda: run.holding_pid() not in (None, first), "the scan on another worker")
        # The provider reports its counters every 0.5 s: this can all come before the
        # first report that counts the held message (a fresh clone saw in_flight 0).
        run.wait(lambda: run.stats().get("in_flight") == 1, "the held message in flight")
        stats = run.stats()
        assert held not in run.saved()
        assert stats["acked"] == len(ids) and stats["in_flight"] == 1  # leased, not acked
        (run.gate / "release").touch()
        run.wait(lambda: held in run.saved(), "the held result")
        run.wait(lambda: run.stats().get("acked") == len(ids) + 1
                 and run.stats().get("in_flight") == 0, "its ack")  # fmt: skip
        assert run.saved().count(held) == 1
        assert run.stats()["in_flight"] == 0
        assert dead.pull(1, timeout=3) == []  # only the poison was dead-lettered
    finally:
        run.close()


def test_emulator_restart_is_reported_and_survived(topic: Topic, mq_pubsub: PubsubEmulator) -> None:
    """The Pub/Sub service goes away while messages are acknowledged and one is mid-scan,
    then comes back: the provider process rides the outage out (the client retries) and
    shows it in ``connection``; the scan that was running finishes and its result is
    saved; once the service is back the same stream consumes again, and every message
    published ends with exactly one saved result.

    What the emulator cannot show: it keeps everything in memory, so a restart forgets
    the topic, the subscription and the messages that were outstanding (the test creates
    the first two again, as they would still exist on Google). The acknowledgement of the
    message saved during the outage goes nowhere, and without exactly-once delivery
    Pub/Sub confirms no acknowledgement, so the provider counts it acked; on Google the
    message would come back after its ack deadline and be scanned a second time, the
    redelivery that the provider kill -9 test shows.
    """
    held = send(topic, b"HOLD during the outage")
    run = GateRun(topic, mq_pubsub, stoqd={}, pubsub={"max_messages": 5})
    try:
        run.wait(lambda: run.holding_pid() is not None, "the scan to start")
        before = [send(topic, b"SLOW before %d" % n) for n in range(10)]
        run.wait(lambda: (run.stats().get("acked") or 0) >= 5, "some acks")
        provider = run.daemon.provider("pubsub")["pid"]

        mq_pubsub.close()
        run.wait(lambda: run.stats().get("connection", "").startswith("down: "),
                 "the provider to see the service gone")  # fmt: skip
        (run.gate / "release").touch()
        run.wait(lambda: set(run.saved()) == {held, *before}, "the results of the outage")
        assert run.daemon.provider("pubsub")["pid"] == provider  # it never crashed

        mq_pubsub.start()
        topic.publisher.create_topic(name=topic.topic_path)
        topic.subscriber.create_subscription(
            name=topic.sub_path, topic=topic.topic_path, ack_deadline_seconds=10
        )
        run.wait(lambda: run.stats().get("connection", "").startswith("streaming pull"),
                 "the provider to see the service back")  # fmt: skip
        after = [send(topic, b"SLOW after %d" % n) for n in range(10)]
        run.wait(lambda: set(after) <= set(run.saved()), "the results after the restart")
        run.wait(lambda: run.stats().get("in_flight") == 0, "every outcome")
        assert sorted(run.saved()) == sorted([held, *before, *after])  # each exactly once
        assert run.daemon.process.poll() is None
        # (in_flight 0 is also what a report from before the last messages arrived says:
        # the acks are waited for too.)
        if run.daemon.provider("pubsub")["pid"] == provider:
            run.wait(lambda: run.stats().get("acked") == 21, "every ack")
            assert run.stats()["acked"] == 21  # 11 before and during the outage, 10 after
        else:  # the stream came back before the test recreated the subscription
            assert "does not exist (set create = true" in run.daemon.log()
            run.wait(lambda: run.stats().get("acked") == 10, "every ack")
            assert run.stats()["acked"] == 10
    finally:
        run.close()
        if mq_pubsub.process is None or mq_pubsub.process.poll() is not None:
            mq_pubsub.start()  # for the tests that follow
