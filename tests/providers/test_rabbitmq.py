"""The rabbitmq provider and connector against a real RabbitMQ node started by a fixture.

Unit level: the provider's ``ingest`` in-process (``stoqd.testing.run_provider``) with the
outcome each item gets chosen by the test. Behaviour: real ``stoqd`` daemons consuming the
node, killed and restarted, with results read from their jsonl output.
"""

from __future__ import annotations

import json
import os
import queue as stdlib_queue
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
from stoqd.testing import Daemon, RecordingQueue, temp_dir, write_config
from stoqd.workqueue import FAILED, SAVED, Outcome

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


def declare(node: RabbitNode, queue: str, **opts: Any) -> Any:
    """The plugin for ``queue``, with the queue and its dead-letter queue declared as the
    provider declares them (the provider would fail on any difference)."""
    with pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", node.port)) as link:
        channel = link.channel()
        channel.exchange_declare("stoqd.dead-letter", "direct", durable=True)
        channel.queue_declare(f"{queue}.dead", durable=True)
        channel.queue_bind(f"{queue}.dead", "stoqd.dead-letter", routing_key=queue)
        arguments = {"x-dead-letter-exchange": "stoqd.dead-letter",
                     "x-dead-letter-routing-key": queue}  # fmt: skip
        channel.queue_declare(queue, durable=True, arguments=arguments)
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
    _wait(lambda: broker.ready(f"{queue}.dead") == 1, "the dead letter")
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
    recorded = consume(plugin, max_items=1)
    assert [p.item.content for p in recorded.puts] == [b"good"]
    [(_, dead)] = broker.get_all(f"{queue}.dead")
    assert dead == body
    assert recorded.stats["dead_lettered"] == 1
    assert recorded.stats["last_error"].startswith(reason)
    assert any(reason in r.getMessage() and "message bad dead-lettered" in r.getMessage()
               for r in caplog.records)  # fmt: skip


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
    _wait(lambda: len(holding.puts) == 3, "three messages")
    time.sleep(0.5)  # room for a fourth, were prefetch not enforced
    assert len(holding.puts) == 3
    assert broker.ready(queue) == 7
    for put in holding.puts:  # answer them: the next three arrive
        put.done(Outcome(SAVED))
    _wait(lambda: len(holding.puts) == 6, "three more messages")
    holding.stopping.set()
    for put in holding.puts[3:]:
        put.done(Outcome(SAVED))
    thread.join(10)
    assert not thread.is_alive()
    assert broker.ready(queue) == 4


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


def _wait(predicate: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


_ = (SAVED, signal, temp_dir, write_config, Daemon)
