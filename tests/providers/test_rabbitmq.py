"""The rabbitmq provider and connector against a real RabbitMQ node started by a fixture.

Unit level: the provider's ``ingest`` in-process (``stoqd.testing.run_provider``) with the
outcome each item gets chosen by the test. Behaviour: real ``stoqd`` daemons consuming the
node, killed and restarted, with results read from their jsonl output.
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

import pika
import pytest
from services import RabbitNode

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
from stoqd.workqueue import FAILED, NOT_DONE, SAVED, Outcome

pytestmark = pytest.mark.services

REGISTRY = PluginRegistry()


def build(node: RabbitNode, **opts: Any) -> Any:
    """The rabbitmq plugin as stoqd builds it, pointed at ``node``."""
    base = {"host": "127.0.0.1", "port": node.port}
    return REGISTRY.load("rabbitmq", {k: str(v) for k, v in {**base, **opts}.items()})


def unique(prefix: str = "q") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


class Broker:
    """A pika connection for the test itself: publish, count, fetch."""

    def __init__(self, node: RabbitNode) -> None:
        self.connection = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", node.port))
        self.channel = self.connection.channel()

    def publish(self, queue: str, body: bytes, **properties: Any) -> None:
        self.channel.basic_publish(
            "", queue, body, pika.BasicProperties(delivery_mode=2, **properties)
        )

    def ready(self, queue: str) -> int:
        return int(self.channel.queue_declare(queue, passive=True).method.message_count)

    def get_all(self, queue: str) -> List[Tuple[Any, bytes]]:
        out = []
        while True:
            method, properties, body = self.channel.basic_get(queue, auto_ack=True)
            if method is None:
                return out
            out.append((properties, body))

    def close(self) -> None:
        self.connection.close()


@pytest.fixture
def broker(mq_rabbitmq: RabbitNode) -> Any:
    broker = Broker(mq_rabbitmq)
    yield broker
    try:
        broker.close()
    except pika.exceptions.AMQPError:
        pass  # the broker-restart test closed it under us


def declare_queue(node: RabbitNode, queue: str, **arguments: Any) -> None:
    """``queue`` and its dead-letter queue, declared as the provider declares them (the
    provider would fail on any difference), with other queue ``arguments`` if given (for
    a passive provider, which declares nothing)."""
    with pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", node.port)) as link:
        channel = link.channel()
        channel.exchange_declare("stoqd.dead-letter", "direct", durable=True)
        channel.queue_declare(f"{queue}.dead", durable=True)
        channel.queue_bind(f"{queue}.dead", "stoqd.dead-letter", routing_key=queue)
        channel.queue_declare(queue, durable=True, arguments={
            "x-dead-letter-exchange": "stoqd.dead-letter",
            "x-dead-letter-routing-key": queue, **arguments})  # fmt: skip


def declare(node: RabbitNode, queue: str, **opts: Any) -> Any:
    """The plugin for ``queue``, with the queue declared (``declare_queue``)."""
    declare_queue(node, queue)
    return build(node, queue=queue, **opts)


def consume(plugin: Any, outcome: Any = None, max_items: Optional[int] = None,
            timeout: float = 10.0) -> RecordingQueue:  # fmt: skip
    """``run_provider``, but returning only once ``ingest`` has returned (link closed)."""
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
    thread.join(timeout)
    queue.stopping.set()
    thread.join(30)
    assert not thread.is_alive(), "the provider did not return after stopping"
    if errors:
        raise errors[0]
    return queue


# -- the fixture itself --------------------------------------------------------------------


def test_node_round_trips_a_message(mq_rabbitmq: RabbitNode, broker: Broker) -> None:
    queue = unique()
    broker.channel.queue_declare(queue)
    broker.publish(queue, b"hello")
    [(_, body)] = broker.get_all(queue)
    assert body == b"hello"


# -- messages become work --------------------------------------------------------------------


def test_message_becomes_payload_with_properties_and_is_acked_after_saved(
    mq_rabbitmq: RabbitNode,
    broker: Broker,
) -> None:
    queue = unique()
    plugin = declare(mq_rabbitmq, queue)
    broker.publish(queue, b"payload one", message_id="m-1", headers={"sensor": "s1"},
                   content_type="application/octet-stream")  # fmt: skip
    recorded = consume(plugin, max_items=1)
    [put] = recorded.puts
    assert isinstance(put.item, Payload)
    assert put.item.content == b"payload one"
    extra = put.item.payload_meta.extra_data
    assert extra["message_id"] == "m-1"
    assert extra["headers"] == {"sensor": "s1"}
    assert extra["queue"] == queue and extra["redelivered"] is False
    assert broker.ready(queue) == 0
    assert recorded.stats["acked"] == 1 and recorded.stats["received"] == 1


def test_message_id_is_the_key_and_a_requeued_message_is_put_as_redelivered(
    mq_rabbitmq: RabbitNode, broker: Broker
) -> None:
    # The key and the broker's redelivered flag are what let stoqd answer a restarted
    # provider's redelivery from the earlier run (docs/providers.md, the completion API).
    queue = unique()
    plugin = declare(mq_rabbitmq, queue)
    broker.publish(queue, b"given back once", message_id="m-again")
    outcomes = iter([Outcome(NOT_DONE), Outcome(SAVED, scan_id="s")])
    recorded = consume(plugin, outcome=lambda put: next(outcomes), max_items=2)
    assert [(p.key, p.redelivered) for p in recorded.puts] == [("m-again", False),
                                                               ("m-again", True)]  # fmt: skip
    assert recorded.stats["acked"] == 1 and recorded.stats["nacked"] == 1
    assert broker.ready(queue) == 0 and _unacked(mq_rabbitmq, queue) == 0


def test_json_message_is_an_archiver_reference(mq_rabbitmq: RabbitNode, broker: Broker) -> None:
    queue = unique()
    plugin = declare(mq_rabbitmq, queue)
    reference = {"filedir": {"sha256": "ab" * 32}}
    broker.publish(queue, json.dumps(reference).encode(), content_type="application/json")
    [put] = consume(plugin, max_items=1).puts
    assert put.item == reference


def test_failed_scan_is_retried_then_dead_lettered(mq_rabbitmq: RabbitNode, broker: Broker) -> None:
    queue = unique()
    plugin = declare(mq_rabbitmq, queue, max_retries=2)
    broker.publish(queue, b"never saved", message_id="m-fail")
    failed = lambda put: Outcome(FAILED, error="connector jsonl failed: disk full")  # noqa: E731
    recorded = consume(plugin, outcome=failed, max_items=3)
    assert [p.item.content for p in recorded.puts] == [b"never saved"] * 3
    assert [p.item.payload_meta.extra_data.get("headers", {}).get("x-stoqd-retries", 0)
            for p in recorded.puts] == [0, 1, 2]  # fmt: skip
    wait_until(lambda: broker.ready(f"{queue}.dead") == 1, what="the dead letter")
    [(properties, body)] = broker.get_all(f"{queue}.dead")
    assert body == b"never saved"
    assert properties.headers["x-death"][0]["reason"] == "rejected"
    assert properties.headers["x-stoqd-error"] == "connector jsonl failed: disk full"
    assert broker.ready(queue) == 0


@pytest.mark.parametrize(
    "body, content_type, reason",
    [
        (b"{not json", "application/json", "JSON message is not valid JSON"),
        (b'["x"]', "application/json", "JSON message is not a stoQ archiver reference"),
        (b"x" * 2048, None, "message of 2048 bytes exceeds max_message_size 1024"),
    ],
)
def test_malformed_message_is_dead_lettered_and_consuming_goes_on(
    mq_rabbitmq: RabbitNode,
    broker: Broker,
    caplog: pytest.LogCaptureFixture,
    body: bytes,
    content_type: Optional[str],
    reason: str,
) -> None:
    queue = unique()
    plugin = declare(mq_rabbitmq, queue, max_message_size="1K")
    broker.publish(queue, body, content_type=content_type, message_id="bad")
    broker.publish(queue, b"good", message_id="good")
    recorded = RecordingQueue()
    thread = threading.Thread(target=plugin.ingest, args=(recorded,), daemon=True)
    thread.start()
    # The copy carrying the reason goes to the back of the queue, behind "good".
    wait_until(lambda: recorded.puts and broker.ready(f"{queue}.dead") == 1,
               what="the good message put and the bad one dead-lettered")  # fmt: skip
    recorded.stopping.set()
    thread.join(30)
    assert [p.item.content for p in recorded.puts] == [b"good"]
    [(properties, dead)] = broker.get_all(f"{queue}.dead")
    assert dead == body
    assert properties.headers["x-stoqd-error"].startswith(reason)
    assert properties.headers["x-death"][0]["reason"] == "rejected"
    assert broker.ready(queue) == 0
    assert recorded.stats["dead_lettered"] == 1
    assert recorded.stats["received"] == 3  # the bad message twice: itself and its copy
    assert recorded.stats["last_error"] == properties.headers["x-stoqd-error"]
    assert any(reason in r.getMessage() and "message bad dead-lettered" in r.getMessage()
               for r in caplog.records)  # fmt: skip


def test_malformed_message_of_a_consume_only_user_is_dead_lettered_without_a_copy(
    mq_rabbitmq: RabbitNode, broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    # The copy that would carry the reason needs write permission on the default
    # exchange; this user has none (403 closes the channel). Not a loop: the message
    # comes back on the next channel and is dead-lettered as it is.
    user = unique("reader")
    mq_rabbitmq.ctl("add_user", user, "secret")
    mq_rabbitmq.ctl("set_permissions", "-p", "/", user, "^$", "^$", ".*")
    queue = unique()
    declare_queue(mq_rabbitmq, queue)
    broker.publish(queue, b"{not json", content_type="application/json", message_id="bad")
    broker.publish(queue, b"good", message_id="good")
    plugin = build(mq_rabbitmq, queue=queue, passive=True, user=user, password="secret",
                   reconnect_max=0.2)  # fmt: skip
    recorded = RecordingQueue()
    thread = threading.Thread(target=plugin.ingest, args=(recorded,), daemon=True)
    thread.start()
    wait_until(lambda: recorded.puts and broker.ready(f"{queue}.dead") == 1,
               what="the good message put and the bad one dead-lettered",
               detail=lambda: f"provider {recorded.stats}")  # fmt: skip
    recorded.stopping.set()
    thread.join(30)
    assert [p.item.content for p in recorded.puts] == [b"good"]
    [(properties, dead)] = broker.get_all(f"{queue}.dead")
    assert dead == b"{not json"
    assert "x-stoqd-error" not in (properties.headers or {})
    assert properties.headers["x-death"][0]["count"] == 1
    assert recorded.stats["dead_lettered"] == 1
    assert any("refused a copy of message bad (403 ACCESS_REFUSED" in r.getMessage()
               for r in caplog.records)  # fmt: skip


def test_failed_scan_whose_retry_a_full_queue_refuses_is_dead_lettered(
    mq_rabbitmq: RabbitNode, broker: Broker
) -> None:
    # While "fails" is held unacknowledged, "waits" fills the queue to its x-max-length
    # (ready messages): the broker nacks the retry's copy, and the message is dead-lettered.
    queue = unique()
    declare_queue(mq_rabbitmq, queue, **{"x-max-length": 1, "x-overflow": "reject-publish"})
    broker.publish(queue, b"fails", message_id="fails")

    def outcome(put: Any) -> Outcome:
        if put.item.content != b"fails":
            return Outcome(SAVED)
        parameters = pika.ConnectionParameters("127.0.0.1", mq_rabbitmq.port)
        with pika.BlockingConnection(parameters) as link:  # this thread's own connection
            channel = link.channel()
            channel.confirm_delivery()
            channel.basic_publish("", queue, b"waits", pika.BasicProperties(message_id="waits"))
        return Outcome(FAILED, error="connector jsonl failed: disk full")

    recorded = consume(build(mq_rabbitmq, queue=queue, passive=True, prefetch=1),
                       outcome=outcome, max_items=2)  # fmt: skip
    assert [p.item.content for p in recorded.puts] == [b"fails", b"waits"]
    wait_until(lambda: broker.ready(f"{queue}.dead") == 1, what="the dead letter")
    [(_, dead)] = broker.get_all(f"{queue}.dead")
    assert dead == b"fails"
    assert recorded.stats["last_error"] == (
        "failed, and the queue refused its retry: connector jsonl failed: disk full"
    )
    assert (recorded.stats["retried"], recorded.stats["dead_lettered"]) == (0, 1)
    assert broker.ready(queue) == 0


def test_queue_is_bound_to_its_exchange_by_routing_key(
    mq_rabbitmq: RabbitNode, broker: Broker
) -> None:
    queue, exchange = unique(), unique("ex")
    plugin = declare(mq_rabbitmq, queue, exchange=exchange, exchange_type="direct",
                     routing_key="alerts, files")  # fmt: skip
    consume(plugin, timeout=1)  # declares the exchange and binds the queue
    for key in ("files", "other", "alerts"):
        broker.channel.basic_publish(exchange, key, key.encode())
    recorded = consume(plugin, max_items=2)
    assert sorted(p.item.content for p in recorded.puts) == [b"alerts", b"files"]
    assert [p.item.payload_meta.extra_data["exchange"] for p in recorded.puts] == [exchange] * 2
    assert broker.ready(queue) == 0  # "other" was bound nowhere: dropped by the exchange


def test_passive_provider_binds_nothing(mq_rabbitmq: RabbitNode, broker: Broker) -> None:
    queue, exchange = unique(), unique("ex")
    broker.channel.exchange_declare(exchange, "direct", durable=True)
    broker.channel.queue_declare(queue, durable=True)
    plugin = build(mq_rabbitmq, queue=queue, passive=True, exchange=exchange,
                   routing_key="files")  # fmt: skip
    recorded = consume(plugin, timeout=1)
    assert recorded.stats["last_error"] is None
    broker.channel.confirm_delivery()  # routed (or dropped) before it returns
    broker.channel.basic_publish(exchange, "files", b"routed nowhere")
    assert broker.ready(queue) == 0


class HoldingQueue(RecordingQueue):
    """Records puts and never reports an outcome: every item stays in flight."""

    def _record(self, put: Any) -> None:
        if self.stopping.is_set():
            raise stdlib_queue.Full
        self.puts.append(put)


def test_prefetch_bounds_unacknowledged_messages(mq_rabbitmq: RabbitNode, broker: Broker) -> None:
    queue = unique()
    plugin = declare(mq_rabbitmq, queue, prefetch=3)
    for number in range(10):
        broker.publish(queue, b"%d" % number)
    holding = HoldingQueue()
    thread = threading.Thread(target=plugin.ingest, args=(holding,), daemon=True)
    thread.start()
    wait_until(lambda: len(holding.puts) == 3, what="three messages")
    time.sleep(0.5)  # room for a fourth, were prefetch not enforced
    assert len(holding.puts) == 3
    assert broker.ready(queue) == 7
    # The lag is the queue's ready count, refreshed every 5 s.
    wait_until(lambda: holding.stats.get("lag") == 7, timeout=15, what="lag 7",
               detail=lambda: f"provider {holding.stats}")  # fmt: skip
    # Answer them (a copy of the list: under load the next three are put while this loop
    # runs, and answering those too let all ten through): the next three arrive.
    for put in holding.puts[:3]:
        put.done(Outcome(SAVED))
    wait_until(lambda: len(holding.puts) == 6, what="three more messages",
               detail=lambda: f"puts {len(holding.puts)}, provider {holding.stats}, "
                              f"ready {broker.ready(queue)}")  # fmt: skip
    holding.stopping.set()
    for put in holding.puts[3:]:
        put.done(Outcome(SAVED))
    thread.join(30)
    assert not thread.is_alive()
    # What it had prefetched and not put goes back; the broker requeues it on its own time.
    wait_until(lambda: broker.ready(queue) == 4, what="4 messages ready again")


# -- options -------------------------------------------------------------------------------


def test_password_file_that_cannot_be_read_is_named(
    mq_rabbitmq: RabbitNode, tmp_path: Path
) -> None:
    with pytest.raises(StoqPluginException) as error:
        build(mq_rabbitmq, queue="q", password_file=tmp_path / "nope")
    assert str(error.value) == (
        f"plugin rabbitmq: option password_file: cannot read {tmp_path / 'nope'}: "
        "No such file or directory"
    )


def test_password_env_that_is_not_set_is_named(mq_rabbitmq: RabbitNode) -> None:
    os.environ.pop("STOQD_TEST_NO_SUCH_VAR", None)
    with pytest.raises(StoqPluginException) as error:
        build(mq_rabbitmq, queue="q", password_env="STOQD_TEST_NO_SUCH_VAR")
    assert str(error.value) == (
        "plugin rabbitmq: option password_env: environment variable STOQD_TEST_NO_SUCH_VAR "
        "is not set"
    )


def test_password_from_the_environment_is_used(
    mq_rabbitmq: RabbitNode, broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STOQD_TEST_RABBIT_PASSWORD", "guest")
    queue = unique()
    plugin = declare(mq_rabbitmq, queue, password="wrong",
                     password_env="STOQD_TEST_RABBIT_PASSWORD")  # fmt: skip
    broker.publish(queue, b"hello")
    [put] = consume(plugin, max_items=1).puts
    assert put.item.content == b"hello"


def test_queue_in_another_vhost_is_consumed(mq_rabbitmq: RabbitNode) -> None:
    vhost = unique("vhost")
    mq_rabbitmq.ctl("add_vhost", vhost)
    mq_rabbitmq.ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    queue = unique()
    plugin = build(mq_rabbitmq, queue=queue, vhost=vhost)
    consume(plugin, timeout=1)  # declares the queue in that vhost
    parameters = pika.ConnectionParameters("127.0.0.1", mq_rabbitmq.port, virtual_host=vhost)
    with pika.BlockingConnection(parameters) as link:
        link.channel().basic_publish("", queue, b"in another vhost")
    [put] = consume(plugin, max_items=1).puts
    assert put.item.content == b"in another vhost"
    assert plugin.where() == f"amqp://127.0.0.1:{mq_rabbitmq.port}/{vhost}"


def test_password_from_file_is_used_and_a_refusal_reported(
    mq_rabbitmq: RabbitNode, broker: Broker, tmp_path: Path
) -> None:
    secret = tmp_path / "secret"
    secret.write_text("wrong-password\n")
    plugin = build(mq_rabbitmq, queue=unique(), password_file=secret, reconnect_max=0.2)
    recorded = consume(plugin, timeout=2)
    assert "ACCESS_REFUSED" in recorded.stats["last_error"]


def test_passive_queue_that_does_not_exist_is_an_error(mq_rabbitmq: RabbitNode) -> None:
    plugin = build(mq_rabbitmq, queue="no-such-queue", passive=True)
    with pytest.raises(StoqPluginException) as error:
        consume(plugin, timeout=10)
    assert str(error.value) == (
        f"plugin rabbitmq: cannot use queue no-such-queue on amqp://127.0.0.1:"
        f"{mq_rabbitmq.port}/: NOT_FOUND - no queue 'no-such-queue' in vhost '/'"
    )


def test_bad_publish_mode_is_rejected(mq_rabbitmq: RabbitNode) -> None:
    with pytest.raises(StoqPluginException) as error:
        build(mq_rabbitmq, publish="everything")
    assert str(error.value) == (
        "plugin rabbitmq: option publish='everything' must be auto, results or references"
    )


# -- the connector -------------------------------------------------------------------------


def _response(archivers: Optional[Dict[str, Any]] = None) -> StoqResponse:
    payload = Payload(b"content")
    results = Results.from_payload(payload)
    results.archivers = archivers or {}
    return StoqResponse([results], RequestMeta(), new_errors(), scan_id="scan-1")


def test_connector_publishes_results(mq_rabbitmq: RabbitNode, broker: Broker) -> None:
    queue = unique("results")
    build(mq_rabbitmq, publish_queue=queue).save(_response())
    [(properties, body)] = broker.get_all(queue)
    assert properties.content_type == "application/json"
    assert properties.message_id == "scan-1"
    assert json.loads(body)["scan_id"] == "scan-1"


def test_connector_publishes_archiver_references_that_the_provider_reads(
    mq_rabbitmq: RabbitNode,
    broker: Broker,
) -> None:
    queue = unique("refs")
    task = {"path": "ab/cd/abcd", "sha256": "ab" * 32}
    build(mq_rabbitmq, publish_queue=queue).save(_response({"filedir": task}))
    [put] = consume(build(mq_rabbitmq, queue=queue), max_items=1).puts
    assert put.item == {"filedir": task}


def test_connector_without_destination_says_so(mq_rabbitmq: RabbitNode) -> None:
    with pytest.raises(StoqPluginException) as error:
        build(mq_rabbitmq).save(_response())
    assert str(error.value) == (
        "plugin rabbitmq: set option publish_queue or publish_exchange to publish results"
    )


# -- through the real daemon -----------------------------------------------------------------

# The "gate" worker (tests/fixtures/daemon_plugins/gate) holds, slows or SIGKILLs its
# worker by the payload's first word: HOLD, SLOW, KILL.
PLUGINS = Path(__file__).resolve().parents[1] / "fixtures" / "daemon_plugins"


class Run:
    """A stoqd daemon consuming one queue of the test node, and what it saved."""

    def __init__(self, node: RabbitNode, queue: str, workers: int = 2, **rabbit: Any) -> None:
        self.dir = temp_dir("stoqd-mq-")
        self.gate = self.dir / "gate"
        self.gate.mkdir()
        self.results = self.dir / "results.jsonl"
        self.config = write_config(self.dir, {
            "core": {"providers": "rabbitmq", "connectors": "jsonl", "source_archivers": "filedir",
                     "always_dispatch": "gate", "plugin_dir_list": str(PLUGINS)},
            "gate": {"gate_dir": str(self.gate)},
            "stoqd": {"workers": workers, "backoff_initial": 0.1, "backoff_max": 1,
                      "startretries": 100, "graceful_timeout": 10},
            "rabbitmq": {"host": "127.0.0.1", "port": node.port, "queue": queue,
                         "reconnect_max": 1, **rabbit},
            "jsonl": {"output_file": "${here}/results.jsonl"},
            # A source archiver for references: payloads below archive/ only.
            "filedir": {"archive_dir": "${here}/archive"},
        })  # fmt: skip
        self.daemon: Optional[Daemon] = None

    def start(self) -> Daemon:
        self.daemon = Daemon(self.config)
        return self.daemon

    def saved(self) -> List[Dict[str, Any]]:
        """``extra_data`` of the root payload of every saved result."""
        saved = []
        for response in read_jsonl(self.results):
            results = response["results"]
            if results:  # failure records (why an item could not be scanned) have none
                saved.append(results[0]["payload_meta"]["extra_data"])
        return saved

    def stats(self) -> Dict[str, Any]:
        assert self.daemon is not None
        return self.daemon.provider("rabbitmq").get("stats") or {}

    def close(self) -> None:
        if self.daemon is not None:
            self.daemon.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def runs() -> Any:
    started: List[Run] = []

    def make(*args: Any, **kwargs: Any) -> Run:
        run = Run(*args, **kwargs)
        started.append(run)
        return run

    yield make
    for run in started:
        run.close()


def _unacked(node: RabbitNode, queue: str) -> int:
    out = node.ctl("list_queues", "-q", "--no-table-headers", "name", "messages_unacknowledged")
    counts = dict(line.split() for line in out.splitlines() if line.strip())
    return int(counts[queue])


def test_message_is_acked_only_after_its_result_is_saved(
    mq_rabbitmq: RabbitNode, broker: Broker, runs: Any
) -> None:
    queue = unique()
    run = runs(mq_rabbitmq, queue)
    daemon = run.start()
    daemon.wait_for(lambda s: run.stats().get("connection", "").startswith("connected"),
                    what="the provider connected")  # fmt: skip
    broker.publish(queue, b"HOLD this one", message_id="held")
    wait_until(lambda: (run.gate / "holding").exists(), what="the scan to start")
    assert _unacked(mq_rabbitmq, queue) == 1  # being scanned: on the broker, unacknowledged
    assert run.saved() == []
    (run.gate / "release").touch()
    wait_until(lambda: len(run.saved()) == 1, what="the result")
    daemon.wait_for(lambda s: run.stats().get("acked") == 1, what="the ack")
    assert broker.ready(queue) == 0 and _unacked(mq_rabbitmq, queue) == 0
    assert run.saved()[0]["message_id"] == "held"


def test_a_slow_message_does_not_hold_up_the_ones_behind_it(
    mq_rabbitmq: RabbitNode, broker: Broker, runs: Any
) -> None:
    queue = unique()
    declare(mq_rabbitmq, queue)
    broker.publish(queue, b"HOLD the head", message_id="held")
    fast = [f"m{n}" for n in range(20)]
    for message_id in fast:
        broker.publish(queue, message_id.encode(), message_id=message_id)
    run = runs(mq_rabbitmq, queue, prefetch=4)
    daemon = run.start()
    wait_until(lambda: (run.gate / "holding").exists(), what="the slow scan to start")
    # Five times the prefetch window went by while the first message is still scanned:
    # the ones saved behind it were acked, or the broker would have stopped delivering.
    # Those the burst put behind the held one in its worker were given back to the other.
    wait_until(
        lambda: len(run.saved()) == 20,
        what="the messages behind the slow one",
        timeout=60,
        detail=lambda: f"saved {len(run.saved())}, stats {run.stats()}",
    )
    assert "held" not in [r["message_id"] for r in run.saved()]
    wait_until(lambda: _unacked(mq_rabbitmq, queue) == 1, what="all but the held one acked")
    (run.gate / "release").touch()
    wait_until(lambda: len(run.saved()) == 21, what="every result", timeout=60)
    daemon.wait_for(lambda s: run.stats().get("acked") == 21, what="every ack")
    assert sorted(r["message_id"] for r in run.saved()) == sorted(["held", *fast])
    assert broker.ready(queue) == 0 and _unacked(mq_rabbitmq, queue) == 0


def test_kill_9_while_a_slow_message_is_scanned_redelivers_it_and_not_what_was_acked(
    mq_rabbitmq: RabbitNode, broker: Broker, runs: Any
) -> None:
    queue = unique()
    declare(mq_rabbitmq, queue)
    broker.publish(queue, b"HOLD the head", message_id="held")
    ids = ["held"] + [f"m{n}" for n in range(12)]
    for message_id in ids[1:]:
        broker.publish(queue, message_id.encode(), message_id=message_id)
    run = runs(mq_rabbitmq, queue, prefetch=10)
    daemon = run.start()
    wait_until(lambda: (run.gate / "holding").exists(), what="the slow scan to start")
    # Saved out of order, behind the held message: acked one by one, never by a
    # multiple-ack reaching over the held one.
    daemon.wait_for(lambda s: (run.stats().get("acked") or 0) >= 5, what="acks behind it")
    acked = run.stats()["acked"]
    os.killpg(daemon.pid, signal.SIGKILL)  # supervisor, provider and workers at once
    daemon.process.wait()
    wait_until(
        lambda: _unacked(mq_rabbitmq, queue) == 0, what="the broker to take the messages back"
    )
    back = [properties.message_id for properties, _ in broker.get_all(queue)]
    assert "held" in back
    assert len(back) <= len(ids) - acked  # an acked message never comes back
    saved = {r["message_id"] for r in run.saved()}
    assert "held" not in saved
    assert saved | set(back) == set(ids)  # each saved, or back on the queue


def test_kill_9_of_a_worker_mid_scan_loses_nothing(
    mq_rabbitmq: RabbitNode, broker: Broker, runs: Any
) -> None:
    queue = unique()
    declare(mq_rabbitmq, queue)
    ids = [f"m{n}" for n in range(30)]
    for number, message_id in enumerate(ids):
        body = b"KILL %d" % number if number % 10 == 3 else b"SLOW %d" % number
        broker.publish(queue, body, message_id=message_id)
    run = runs(mq_rabbitmq, queue)
    daemon = run.start()
    wait_until(lambda: len(run.saved()) >= len(ids), what="every result", timeout=60)
    daemon.wait_for(lambda s: run.stats().get("acked") == len(ids), what="every ack")
    assert sorted(r["message_id"] for r in run.saved()) == sorted(ids)  # each exactly once
    assert len(list(run.gate.glob("killed-*"))) == 3
    assert broker.ready(queue) == 0 and _unacked(mq_rabbitmq, queue) == 0


def test_kill_9_of_the_provider_redelivers_what_was_not_acked(
    mq_rabbitmq: RabbitNode, broker: Broker, runs: Any
) -> None:
    queue = unique()
    declare(mq_rabbitmq, queue)
    ids = [f"m{n}" for n in range(40)]
    for number, message_id in enumerate(ids):
        broker.publish(queue, b"SLOW %d" % number, message_id=message_id)
    run = runs(mq_rabbitmq, queue, prefetch=5)
    daemon = run.start()
    daemon.wait_for(lambda s: (run.stats().get("acked") or 0) >= 5, what="some acks")
    first = daemon.provider("rabbitmq")["pid"]
    os.kill(first, signal.SIGKILL)
    daemon.wait_for(lambda s: daemon.provider("rabbitmq")["pid"] not in (None, first),
                    what="the provider restarted")  # fmt: skip
    wait_until(
        lambda: {r["message_id"] for r in run.saved()} == set(ids), what="every result", timeout=60
    )
    wait_until(
        lambda: broker.ready(queue) == 0 and _unacked(mq_rabbitmq, queue) == 0,
        what="every message acknowledged",
        timeout=60,
    )
    # What the killed run handed over is answered, not scanned again, on redelivery.
    assert sorted(r["message_id"] for r in run.saved()) == sorted(ids)  # each exactly once
    assert broker.get_all(f"{queue}.dead") == []


def test_broker_restart_loses_nothing_and_scans_each_message_once(
    mq_rabbitmq: RabbitNode, broker: Broker, runs: Any
) -> None:
    queue = unique()
    declare(mq_rabbitmq, queue)
    ids = [f"m{n}" for n in range(60)]
    for number, message_id in enumerate(ids):
        broker.publish(queue, b"SLOW %d" % number, message_id=message_id)
    broker.close()
    run = runs(mq_rabbitmq, queue, prefetch=10)
    daemon = run.start()
    daemon.wait_for(lambda s: (run.stats().get("acked") or 0) >= 5, what="some acks")
    mq_rabbitmq.stop()
    daemon.wait_for(lambda s: run.stats().get("connection", "").startswith("down"),
                    what="the provider to see the broker gone")  # fmt: skip
    mq_rabbitmq.start()
    wait_until(
        lambda: {r["message_id"] for r in run.saved()} == set(ids), what="every result", timeout=90
    )
    daemon.wait_for(lambda s: run.stats().get("connection", "").startswith("connected"),
                    what="the provider reconnected")  # fmt: skip
    again = Broker(mq_rabbitmq)
    try:
        wait_until(
            lambda: again.ready(queue) == 0 and _unacked(mq_rabbitmq, queue) == 0,
            what="every message acknowledged",
            timeout=60,
        )
    finally:
        again.close()
    assert sorted(r["message_id"] for r in run.saved()) == sorted(ids)


@pytest.mark.parametrize(
    "reference, reason",
    [
        ({"nosucharchiver": {"path": "x"}}, "nosucharchiver"),
        ({"filedir": {"path": "../../../etc/passwd"}}, "outside"),
        ({"dirmon": {"source_dir": "/"}}, "not in [core] source_archivers (filedir)"),
    ],
)
def test_unresolvable_reference_is_retried_then_dead_lettered(
    mq_rabbitmq: RabbitNode, broker: Broker, runs: Any, reference: Any, reason: str
) -> None:
    queue = unique()
    declare(mq_rabbitmq, queue)
    reference = json.dumps(reference).encode()
    broker.publish(queue, reference, content_type="application/json", message_id="ref")
    broker.publish(queue, b"fine", message_id="fine")
    run = runs(mq_rabbitmq, queue, max_retries=1)
    daemon = run.start()
    daemon.wait_for(lambda s: run.stats().get("dead_lettered") == 1, what="the dead letter")
    wait_until(lambda: broker.ready(f"{queue}.dead") == 1, what="the dead-letter queue")
    [(properties, body)] = broker.get_all(f"{queue}.dead")
    assert body == reference
    assert reason in properties.headers["x-stoqd-error"]
    assert properties.headers["x-stoqd-retries"] == 1
    assert [r.get("message_id") for r in run.saved() if r.get("message_id")] == ["fine"]


def test_two_daemons_on_one_queue_share_the_load(
    mq_rabbitmq: RabbitNode, broker: Broker, runs: Any
) -> None:
    queue = unique()
    declare(mq_rabbitmq, queue)
    ids = [f"m{n}" for n in range(60)]
    for number, message_id in enumerate(ids):
        broker.publish(queue, b"SLOW %d" % number, message_id=message_id)
    first, second = (
        runs(mq_rabbitmq, queue, workers=1, prefetch=2),
        runs(mq_rabbitmq, queue, workers=1, prefetch=2),
    )
    first.start(), second.start()
    wait_until(
        lambda: len(first.saved()) + len(second.saved()) >= len(ids),
        what="every result",
        timeout=60,
    )
    one = [r["message_id"] for r in first.saved()]
    two = [r["message_id"] for r in second.saved()]
    assert one and two  # both did a share
    assert sorted(one + two) == sorted(ids)  # and together every message, once


def _tls(node: RabbitNode, **opts: Any) -> Dict[str, Any]:
    """Options for the node's TLS listener, which verifies the client's certificate."""
    certificates = node.ca_file.parent
    return {"tls": "true", "port": node.tls_port, "tls_ca_file": node.ca_file,
            "tls_server_name": "localhost", "tls_cert_file": certificates / "client.pem",
            "tls_key_file": certificates / "client.key", **opts}  # fmt: skip


def test_tls_connection_verifies_the_broker(mq_rabbitmq: RabbitNode, broker: Broker) -> None:
    queue = unique()
    declare(mq_rabbitmq, queue)
    broker.publish(queue, b"over tls")
    recorded = consume(build(mq_rabbitmq, queue=queue, **_tls(mq_rabbitmq)), max_items=1)
    assert [p.item.content for p in recorded.puts] == [b"over tls"]
    assert recorded.stats["acked"] == 1


def test_tls_broker_refuses_a_client_without_its_certificate(mq_rabbitmq: RabbitNode) -> None:
    options = _tls(mq_rabbitmq, reconnect_max=0.2)
    del options["tls_cert_file"], options["tls_key_file"]
    recorded = consume(build(mq_rabbitmq, queue=unique(), **options), timeout=2)
    assert recorded.puts == []
    assert "CERTIFICATE_REQUIRED" in recorded.stats["last_error"], recorded.stats


def test_tls_refuses_a_broker_it_cannot_verify(mq_rabbitmq: RabbitNode) -> None:
    plugin = build(
        mq_rabbitmq, queue=unique(), tls="true", port=mq_rabbitmq.tls_port, reconnect_max=0.2
    )  # fmt: skip  (the system store does not know our CA)
    recorded = consume(plugin, timeout=2)
    assert recorded.puts == []
    assert "CERTIFICATE_VERIFY_FAILED" in recorded.stats["last_error"]


def test_tls_ca_file_that_cannot_be_read_is_named(mq_rabbitmq: RabbitNode, tmp_path: Path) -> None:
    with pytest.raises(StoqPluginException) as error:
        build(mq_rabbitmq, tls="true", tls_ca_file=tmp_path / "none.pem")
    assert str(error.value) == "plugin rabbitmq: TLS options: No such file or directory"


def test_sigterm_gives_back_what_was_not_saved(
    mq_rabbitmq: RabbitNode, broker: Broker, runs: Any
) -> None:
    queue = unique()
    declare(mq_rabbitmq, queue)
    ids = [f"m{n}" for n in range(200)]
    for number, message_id in enumerate(ids):
        broker.publish(queue, b"SLOW %d" % number, message_id=message_id)
    run = runs(mq_rabbitmq, queue, prefetch=10)
    daemon = run.start()
    daemon.wait_for(lambda s: (run.stats().get("acked") or 0) >= 5, what="some acks")
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit(60) == 0
    saved = [r["message_id"] for r in run.saved()]
    back = [properties.message_id for properties, _ in broker.get_all(queue)]
    assert back, "stopped before the queue ran dry: some messages must be back"
    assert sorted(saved + back) == sorted(ids)  # each saved and acked, or back: never both
