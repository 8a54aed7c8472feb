"""Plugin ``rabbitmq``: a provider consuming a queue, and a connector publishing results.

Provider: each message becomes a payload (its body) or, when its content type is JSON, a
stoQ archiver reference ``{"ARCHIVER": {...}}``. A message is acknowledged only after
stoqd reports its results saved. A failed scan is published again to the queue with a
retry count in the header ``x-stoqd-retries``; after ``max_retries`` it is rejected and
RabbitMQ moves it to the queue's dead-letter exchange. ``prefetch`` bounds the messages
held unacknowledged, which is the backpressure. Connection losses are retried with
exponential backoff; RabbitMQ redelivers what was not acknowledged.

All pika calls happen on the thread running ``ingest``: stoqd's completion thread only
queues outcomes and wakes that thread (pika connections are not thread-safe).

Connector: publishes each result as JSON, or for each archived payload a reference
``{"ARCHIVER": {...}}`` another stoqd's rabbitmq provider turns back into the payload.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import json
import os
import queue as stdlib_queue
import ssl
import time
from configparser import ConfigParser
from dataclasses import dataclass
from typing import Any, Deque, Dict, List, Optional, Tuple, Union

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection
from pika.spec import Basic, BasicProperties

from stoqd import backoff
from stoqd.builtin._options import positive_int, size
from stoqd.framework.data import Payload, PayloadMeta, StoqResponse
from stoqd.framework.exceptions import StoqPluginException
from stoqd.framework.helpers import dumps
from stoqd.framework.plugins import ConnectorPlugin, ProviderPlugin

RETRIES_HEADER = "x-stoqd-retries"
ERROR_HEADER = "x-stoqd-error"
MALFORMED_HEADER = "x-stoqd-malformed"  # a copy published only to be dead-lettered
_PROPERTIES = (
    "content_type", "content_encoding", "headers", "delivery_mode", "priority",
    "correlation_id", "reply_to", "expiration", "message_id", "timestamp", "type",
    "user_id", "app_id",
)  # fmt: skip
_SAVED_IDS_KEPT = 100_000  # ids saved but not acknowledged (channel lost): skip redeliveries
_REPORT_EVERY = 0.5
# How long saved messages wait behind an unsaved one for a multiple-ack to cover them.
_OUT_OF_ORDER_WAIT = 0.05
_LAG_EVERY = 5.0
_ACCESS_REFUSED = 403
_REFUSED_IDS_KEPT = 1000


class MessageError(Exception):
    """A message that can never be scanned (bad JSON, not a reference, too big)."""


@dataclass
class Delivery:
    """One message held unacknowledged, with the channel generation it arrived on."""

    generation: int
    tag: int
    exchange: str
    routing_key: str
    redelivered: bool
    properties: BasicProperties
    body: bytes

    @property
    def message_id(self) -> Optional[str]:
        return self.properties.message_id or None

    @property
    def retries(self) -> int:
        try:
            return int((self.properties.headers or {}).get(RETRIES_HEADER, 0))
        except (TypeError, ValueError):
            return 0


class RabbitmqPlugin(ProviderPlugin, ConnectorPlugin):
    """Consumes ``queue`` with late acknowledgement; publishes results when a connector."""

    def __init__(self, config: ConfigParser, plugin_opts: Optional[Dict[str, Any]] = None) -> None:
        super().__init__(config, plugin_opts)
        self.host = self.option("host", "localhost", str)
        self.tls = self.option("tls", False, bool)
        self.port = self.option("port", 5671 if self.tls else 5672, positive_int)
        self.vhost = self.option("vhost", "/", str)
        self.user = self.option("user", "guest", str)
        self.password = self._password()
        self.ssl_options = self._ssl_options() if self.tls else None
        self.heartbeat = self.option("heartbeat", 60, int)
        # provider
        self.queue_name = self.option("queue", "", str).strip()
        self.passive = self.option("passive", False, bool)
        self.durable = self.option("durable", True, bool)
        self.exchange = self.option("exchange", "", str).strip()
        self.exchange_type = self.option("exchange_type", "direct", str).strip()
        self.routing_keys = self.option("routing_key", [], list)
        self.prefetch = self.option("prefetch", 50, positive_int)
        self.max_retries = self.option("max_retries", 3, int)
        self.dead_letter_exchange = self.option("dead_letter_exchange", "stoqd.dead-letter", str)
        self.dead_letter_queue = self.option("dead_letter_queue", "", str).strip()
        self.max_message_size = self.option("max_message_size", "256M", size)
        self.json_references = self.option("json_references", True, bool)
        self.reconnect_max = self.option("reconnect_max", 30.0, float)
        # connector
        self.publish_exchange = self.option("publish_exchange", "", str).strip()
        self.publish_queue = self.option("publish_queue", "", str).strip()
        self.publish_routing_key = self.option("publish_routing_key", "", str).strip()
        self.publish = self.option("publish", "auto", str).strip().lower()
        if self.publish not in ("auto", "results", "references"):
            raise StoqPluginException(
                f"plugin {self.plugin_name}: option publish={self.publish!r} must be "
                "auto, results or references"
            )
        if self.max_retries < 0:
            raise StoqPluginException(
                f"plugin {self.plugin_name}: option max_retries must be 0 or more"
            )
        self._publisher: Optional[Tuple[BlockingConnection, BlockingChannel]] = None

    # -- options --------------------------------------------------------------------

    def _password(self) -> str:
        """The password from ``password_file``, else ``password_env``, else ``password``."""
        path = self.option("password_file", "", str).strip()
        if path:
            try:
                with open(os.path.expanduser(path), encoding="utf-8") as handle:
                    return handle.read().rstrip("\r\n")
            except OSError as exc:
                raise StoqPluginException(
                    f"plugin {self.plugin_name}: option password_file: cannot read {path}: "
                    f"{exc.strerror}"
                ) from None
        variable = self.option("password_env", "", str).strip()
        if variable:
            if variable not in os.environ:
                raise StoqPluginException(
                    f"plugin {self.plugin_name}: option password_env: environment variable "
                    f"{variable} is not set"
                )
            return os.environ[variable]
        return self.option("password", "guest", str)

    def _ssl_options(self) -> pika.SSLOptions:
        ca_file = self.option("tls_ca_file", "", str).strip() or None
        cert_file = self.option("tls_cert_file", "", str).strip() or None
        key_file = self.option("tls_key_file", "", str).strip() or None
        verify = self.option("tls_verify", True, bool)
        try:
            context = ssl.create_default_context(cafile=ca_file)
            if cert_file:
                context.load_cert_chain(cert_file, key_file)
        except (OSError, ssl.SSLError) as exc:
            raise StoqPluginException(
                f"plugin {self.plugin_name}: TLS options: {exc.strerror or exc}"
            ) from None
        if not verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        server_name = self.option("tls_server_name", "", str).strip() or self.host
        return pika.SSLOptions(context, server_name)

    def parameters(self) -> pika.ConnectionParameters:
        """pika's connection parameters from the options (one attempt: we retry)."""
        return pika.ConnectionParameters(
            host=self.host,
            port=self.port,
            virtual_host=self.vhost,
            credentials=pika.PlainCredentials(self.user, self.password),
            ssl_options=self.ssl_options,
            heartbeat=self.heartbeat,
            connection_attempts=1,
            socket_timeout=10,
            blocked_connection_timeout=300,
            client_properties={"connection_name": f"stoqd {self.plugin_name} pid {os.getpid()}"},
        )

    def declare_queue(self, channel: BlockingChannel, name: str) -> None:
        """Declare queue ``name`` with its dead-letter exchange and queue (``NAME.dead``)."""
        arguments: Dict[str, Any] = {}
        if self.dead_letter_exchange:
            dead_queue = self.dead_letter_queue or f"{name}.dead"
            channel.exchange_declare(self.dead_letter_exchange, "direct", durable=True)
            channel.queue_declare(dead_queue, durable=True)
            channel.queue_bind(dead_queue, self.dead_letter_exchange, routing_key=name)
            arguments = {
                "x-dead-letter-exchange": self.dead_letter_exchange,
                "x-dead-letter-routing-key": name,
            }
        channel.queue_declare(name, durable=self.durable, arguments=arguments)

    def where(self) -> str:
        scheme = "amqps" if self.tls else "amqp"
        return f"{scheme}://{self.host}:{self.port}{'/' + self.vhost.lstrip('/')}"

    # -- provider -------------------------------------------------------------------

    def ingest(self, queue: Any) -> None:
        """Consume ``queue`` until stoqd stops; reconnect with backoff when the link drops."""
        if not self.queue_name:
            raise StoqPluginException(f"plugin {self.plugin_name}: option queue is required")
        _Consumer(self, queue).run()

    # -- connector ------------------------------------------------------------------

    def save(self, response: StoqResponse) -> None:
        """Publish the result (or archiver references); returns once the broker confirms."""
        if not (self.publish_exchange or self.publish_queue):
            raise StoqPluginException(
                f"plugin {self.plugin_name}: set option publish_queue or publish_exchange "
                "to publish results"
            )
        messages = publications(response, self.publish)
        for attempt in (1, 2):  # a publisher idle past its heartbeat finds its link closed
            try:
                channel = self._publish_channel()
                for message_id, body in messages:
                    channel.basic_publish(
                        self.publish_exchange,
                        self.publish_routing_key or self.publish_queue,
                        body,
                        BasicProperties(
                            content_type="application/json",
                            delivery_mode=2,
                            message_id=message_id,
                        ),
                    )
                return
            except pika.exceptions.AMQPError as exc:
                self._close_publisher()
                if attempt == 2:
                    raise StoqPluginException(
                        f"plugin {self.plugin_name}: cannot publish to {self.where()}: "
                        f"{_describe(exc)}"
                    ) from None

    def _publish_channel(self) -> BlockingChannel:
        if self._publisher is not None and self._publisher[1].is_open:
            self._publisher[0].process_data_events(0)  # answer heartbeats that came in
            return self._publisher[1]
        connection = pika.BlockingConnection(self.parameters())
        channel = connection.channel()
        channel.confirm_delivery()  # basic_publish returns only once the broker has it
        if self.publish_queue:
            # Declared as a consuming stoqd declares it, so either side may come first.
            self.declare_queue(channel, self.publish_queue)
            if self.publish_exchange:
                channel.queue_bind(
                    self.publish_queue,
                    self.publish_exchange,
                    routing_key=self.publish_routing_key or self.publish_queue,
                )
        self._publisher = (connection, channel)
        return channel

    def _close_publisher(self) -> None:
        if self._publisher is not None:
            try:
                self._publisher[0].close()
            except Exception:  # already broken: nothing to close cleanly
                pass
        self._publisher = None


def publications(response: StoqResponse, mode: str) -> List[Tuple[str, bytes]]:
    """What to publish for a result: ``(message_id, JSON body)`` pairs.

    ``references`` (and ``auto`` when some payload was archived): one
    ``{"ARCHIVER": {...}}`` per archived payload, from its first destination archiver;
    otherwise the whole result. Message ids let consumers spot duplicates.
    """
    references = []
    if mode in ("auto", "references"):
        for result in response.results:
            archived = [(k, v) for k, v in (result.archivers or {}).items() if v]
            if archived:
                name, task = archived[0]
                body = dumps({name: task}, compactly=True).encode()
                references.append((f"{response.scan_id}/{result.payload_id}", body))
    if references or mode == "references":
        return references
    return [(response.scan_id, dumps(response, compactly=True).encode())]


def message_item(
    body: bytes,
    content_type: Optional[str],
    extra_data: Dict[str, Any],
    max_size: int,
    json_references: bool = True,
    payload_id: Optional[str] = None,
) -> Union[Payload, Dict[str, Any]]:
    """A message as stoqd work: a payload, or an archiver reference when it is JSON.

    ``payload_id`` names the payload (a new UUID when None). Raises ``MessageError`` for
    what can never be scanned.
    """
    if max_size and len(body) > max_size:
        raise MessageError(f"message of {len(body)} bytes exceeds max_message_size {max_size}")
    kind = (content_type or "").split(";")[0].strip().lower()
    if json_references and kind == "application/json":
        return archiver_reference(body)
    return Payload(body, PayloadMeta(extra_data=extra_data), payload_id=payload_id)


def archiver_reference(body: bytes) -> Dict[str, Any]:
    """``{"ARCHIVER": {task}}`` from a JSON message body, or ``MessageError``."""
    try:
        decoded = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MessageError(f"JSON message is not valid JSON: {exc}") from None
    if (
        not isinstance(decoded, dict)
        or not decoded
        or not all(isinstance(k, str) and isinstance(v, dict) for k, v in decoded.items())
    ):
        raise MessageError('JSON message is not a stoQ archiver reference {"ARCHIVER": {...}}')
    return decoded


def _describe(exc: BaseException) -> str:
    text = str(exc).strip() or repr(exc)
    return f"{type(exc).__name__}: {text.splitlines()[0]}"


class _Consumer:
    """The consuming loop of one provider process (see the module docstring)."""

    def __init__(self, plugin: RabbitmqPlugin, queue: Any) -> None:
        self.plugin = plugin
        self.queue = queue
        self.log = plugin.log
        self.generation = 0
        self.connection: Optional[BlockingConnection] = None
        self.channel: Optional[BlockingChannel] = None
        self.consumer_tag: Optional[str] = None
        self.pending: Deque[Delivery] = collections.deque()  # received, not yet put
        # Filled by stoqd's completion thread, drained here: deque appends are atomic.
        self.outcomes: Deque[Tuple[Delivery, Any]] = collections.deque()
        self.in_flight: Dict[str, int] = {}  # message id -> copies put and not finished
        self.parked: Dict[str, List[Delivery]] = {}  # redeliveries of ids still in flight
        self.saved_unacked: collections.OrderedDict[str, None] = collections.OrderedDict()
        # Delivery tags of the current channel not yet acked or nacked, in arrival order,
        # with None until saved, then the message id ("" without one). A saved run at the
        # front is acked with one multiple-ack.
        self.unsettled: collections.OrderedDict[int, Optional[str]] = collections.OrderedDict()
        self._saved_unsettled = 0  # entries of ``unsettled`` that are saved (not None)
        # When saved messages began to wait behind an unsaved one (see _flush_acks).
        self._waiting_since: Optional[float] = None
        self._unfinished_count = 0  # put and not finished, with or without a message id
        self._id_prefix = f"rabbitmq-{os.getpid()}-"  # + channel generation and delivery tag
        self.stats: Dict[str, Any] = {
            "connection": "connecting", "queue": plugin.queue_name,
            "acknowledgement": "after results are saved", "received": 0, "acked": 0,
            "nacked": 0, "retried": 0, "dead_lettered": 0, "duplicates_skipped": 0,
            "in_flight": 0, "lag": None, "last_error": None,
        }  # fmt: skip
        self._last_report = 0.0
        self._last_lag = 0.0
        # Copies the broker refused (see _publish_again): every one, or these messages'.
        self.copies_refused = False
        self.copy_refused_for: collections.OrderedDict[str, None] = collections.OrderedDict()

    # -- the loop ---------------------------------------------------------------------

    def run(self) -> None:
        failures = 0
        try:
            while not self._finished():
                try:
                    self._connect()
                    failures = 0
                    self._consume()
                except (
                    pika.exceptions.AMQPConnectionError,
                    pika.exceptions.ChannelClosed,
                    pika.exceptions.ChannelWrongStateError,
                    pika.exceptions.StreamLostError,
                    OSError,
                ) as exc:  # fmt: skip  (OSError: sockets, DNS, TLS)
                    failures += 1
                    self._lost(exc, failures)
        finally:
            self._close()

    def _finished(self) -> bool:
        # Once stoqd stops, wait for the outcome of everything put, then leave.
        return self.queue.stopping.is_set() and self._unfinished() == 0

    def _unfinished(self) -> int:
        # A running count: summing ``in_flight`` (up to prefetch ids) per message costs more.
        return self._unfinished_count

    def _connect(self) -> None:
        plugin = self.plugin
        self.stats["connection"] = f"connecting to {plugin.where()}"
        self._report(force=True)
        connection = pika.BlockingConnection(plugin.parameters())
        channel = connection.channel()
        channel.confirm_delivery()  # retries re-published before the original is acked
        self.generation += 1
        self._clear_unsettled()
        self.connection, self.channel = connection, channel
        self._declare(channel)
        channel.basic_qos(prefetch_count=plugin.prefetch)
        self.consumer_tag = channel.basic_consume(
            plugin.queue_name, self._on_message, auto_ack=False
        )
        self.stats["connection"] = f"connected to {plugin.where()}"
        self.log.info("connected to %s, consuming queue %s", plugin.where(), plugin.queue_name)
        self._report(force=True)

    def _declare(self, channel: BlockingChannel) -> None:
        plugin = self.plugin
        name = plugin.queue_name
        try:
            if plugin.passive:
                channel.queue_declare(name, passive=True)
            else:
                plugin.declare_queue(channel, name)
            if plugin.exchange:
                channel.exchange_declare(
                    plugin.exchange, plugin.exchange_type, durable=True, passive=plugin.passive
                )
                # Passive changes nothing on the broker (its user may not be allowed to):
                # the exchange must exist, and so must its bindings.
                for key in [] if plugin.passive else plugin.routing_keys or [name]:
                    channel.queue_bind(name, plugin.exchange, routing_key=key)
        except pika.exceptions.ChannelClosedByBroker as exc:
            # 404 (passive: it does not exist) or 406 (exists with other arguments): a
            # configuration problem, reported as a crash so stoqd backs off and says why.
            raise StoqPluginException(
                f"plugin {plugin.plugin_name}: cannot use queue {name} on {plugin.where()}: "
                f"{exc.reply_text}"
            ) from None

    def _consume(self) -> None:
        assert self.connection is not None
        while not self._finished():
            if self.queue.stopping.is_set() and self.consumer_tag is not None:
                self._stop_consuming()
            self._put_pending()
            self._drain_outcomes()
            # Short waits keep heartbeats answered and acks prompt while put() is full,
            # and wake the loop in time for saved messages waiting out of order.
            wait = 0 if self.pending else _OUT_OF_ORDER_WAIT if self._saved_unsettled else 0.2
            self.connection.process_data_events(time_limit=wait)
            self._drain_outcomes()
            self._maybe_lag()
            self._report()

    def _lost(self, exc: BaseException, failures: int) -> None:
        self.connection = self.channel = None
        self.consumer_tag = None
        # Messages received but not handed to stoqd are redelivered by the broker, and
        # so are redeliveries parked behind an earlier copy still being scanned.
        self.pending.clear()
        self.parked.clear()
        for message_id in self.unsettled.values():
            if message_id:  # saved, its ack not sent: skip the redelivery
                _remember(self.saved_unacked, message_id, _SAVED_IDS_KEPT)
        self._clear_unsettled()
        wait = backoff.delay(failures, 0.5, self.plugin.reconnect_max)
        reason = _describe(exc)
        self.stats["connection"] = f"down: {reason}; retry in {wait:.1f}s"
        self.stats["last_error"] = reason
        self.log.warning("connection to %s lost: %s; retry in %.1fs",
                         self.plugin.where(), reason, wait)  # fmt: skip
        self._report(force=True)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and not self._finished():
            self._drain_outcomes()
            self.queue.stopping.wait(0.1)

    def _stop_consuming(self) -> None:
        assert self.channel is not None
        try:
            self.channel.basic_cancel(self.consumer_tag)
        finally:
            self.consumer_tag = None
        for delivery in self.pending:  # never handed to stoqd: give them back now
            self._nack(delivery, requeue=True)
        self.pending.clear()

    def _close(self) -> None:
        try:
            # Acks for outcomes that arrived with the stop signal, and for saved messages
            # that waited behind one still being scanned: none is left to be redelivered.
            self._drain_outcomes(everything=True)
            if self.connection is not None and self.connection.is_open:
                self.connection.close()
        except Exception as exc:  # closing a broken link: nothing more to do
            self.log.debug("closing: %s", _describe(exc))
        self.stats["connection"] = "closed"
        self._report(force=True)

    # -- messages in ------------------------------------------------------------------

    def _on_message(self, channel: BlockingChannel, method: Basic.Deliver,
                    properties: BasicProperties, body: bytes) -> None:  # fmt: skip
        self.stats["received"] += 1
        self.unsettled[method.delivery_tag] = None
        self.pending.append(
            Delivery(self.generation, method.delivery_tag, method.exchange or "",
                     method.routing_key or "", bool(method.redelivered), properties, body)
        )  # fmt: skip

    def _put_pending(self) -> None:
        # Deliveries come in bursts (up to the prefetch): handed over together. (Those
        # queued behind a slow scan in a worker are given back to another one, so a burst
        # cannot fill the prefetch window behind one slow message.)
        with self.queue.batched():
            while self.pending and not self.queue.stopping.is_set():
                delivery = self.pending[0]
                if not self._hand_over(delivery):
                    return  # stoqd's queue is full: back to the broker loop, try again soon
                self.pending.popleft()

    def _hand_over(self, delivery: Delivery) -> bool:
        message_id = delivery.message_id
        if message_id is not None and delivery.redelivered:
            if message_id in self.saved_unacked:
                # Saved before the channel it came on was lost: do not scan it again.
                self.saved_unacked.pop(message_id)
                self.stats["duplicates_skipped"] += 1
                self._ack(delivery)
                return True
            if message_id in self.in_flight:
                self.parked.setdefault(message_id, []).append(delivery)
                return True
        try:
            # stoqd's queue carries content and metadata only (the worker names the payload
            # it scans), so this short-lived Payload gets a cheap id, not a uuid4 each.
            payload_id = f"{self._id_prefix}{delivery.generation}-{delivery.tag}"
            item = message_item(delivery.body, delivery.properties.content_type,
                                self._extra_data(delivery), self.plugin.max_message_size,
                                self.plugin.json_references, payload_id)  # fmt: skip
        except MessageError as exc:
            self._reject_malformed(delivery, str(exc))
            return True
        try:
            # The message id as key: if this process is killed, stoqd answers the next
            # run's redelivery with this item's outcome instead of scanning it twice. A
            # delivery RabbitMQ does not flag as redelivered is new, whatever its id.
            self.queue.put(
                item, timeout=0.1, key=message_id, redelivered=delivery.redelivered,
                done=lambda outcome, d=delivery: self._done(d, outcome),
            )  # fmt: skip
        except stdlib_queue.Full:
            return False
        if message_id is not None:
            self.in_flight[message_id] = self.in_flight.get(message_id, 0) + 1
        self._unfinished_count += 1
        self.stats["in_flight"] = self._unfinished_count
        return True

    def _extra_data(self, delivery: Delivery) -> Dict[str, Any]:
        extra: Dict[str, Any] = {
            "queue": self.plugin.queue_name,
            "exchange": delivery.exchange,
            "routing_key": delivery.routing_key,
            "redelivered": delivery.redelivered,
        }
        properties = vars(delivery.properties)  # pika keeps every property there, None if unset
        extra.update(
            {name: value for name in _PROPERTIES if (value := properties.get(name)) is not None}
        )
        return extra

    # -- outcomes ---------------------------------------------------------------------

    def _done(self, delivery: Delivery, outcome: Any) -> None:
        """stoqd's completion thread: queue the outcome and wake the pika thread."""
        wake = not self.outcomes  # one wake-up per batch, not one socket write per item
        self.outcomes.append((delivery, outcome))
        connection = self.connection
        if wake and connection is not None:
            try:
                connection.add_callback_threadsafe(_nothing)
            except Exception:  # closed meanwhile: the loop drains outcomes anyway
                pass

    def _drain_outcomes(self, everything: bool = False) -> None:
        while self.outcomes:
            delivery, outcome = self.outcomes.popleft()
            self._finish(delivery, outcome)
        if self.channel is not None:
            self._flush_acks(everything)
        self.stats["in_flight"] = self._unfinished()

    def _flush_acks(self, everything: bool = False) -> None:
        """Acknowledge saved messages: the run of them at the front of ``unsettled`` with
        one multiple-ack (it covers exactly that run: every earlier tag is settled).

        Saved messages behind one not yet saved wait up to ``_OUT_OF_ORDER_WAIT``: workers
        finish neighbours out of order all the time, and the next run usually covers them
        with no ack of their own. After that (or with ``everything``) each is acked on its
        own, so a slow scan never holds up delivery for longer.
        """
        assert self.channel is not None
        if not self._saved_unsettled:
            return  # the usual case between completions: nothing to walk
        run = list(itertools.takewhile(lambda kv: kv[1] is not None, self.unsettled.items()))
        if run:
            self.channel.basic_ack(run[-1][0], multiple=True)
            for tag, _ in run:  # only once sent: a failed ack leaves them for _lost
                del self.unsettled[tag]
            self._settled(len(run))
        if not self._saved_unsettled:
            self._waiting_since = None
            return
        now = time.monotonic()
        if self._waiting_since is None:
            self._waiting_since = now
        if everything or now - self._waiting_since >= _OUT_OF_ORDER_WAIT:
            saved = [tag for tag, message_id in self.unsettled.items() if message_id is not None]
            for tag in saved:
                self.channel.basic_ack(tag)
                del self.unsettled[tag]
                self._settled(1)
            self._waiting_since = None

    def _settled(self, count: int) -> None:
        self._saved_unsettled -= count
        self.stats["acked"] += count

    def _clear_unsettled(self) -> None:
        self.unsettled.clear()
        self._saved_unsettled = 0
        self._waiting_since = None

    def _forget_tag(self, tag: int) -> None:
        """Drop a delivery tag acked or rejected one by one (not by ``_flush_acks``)."""
        if self.unsettled.pop(tag, None) is not None:
            self._saved_unsettled -= 1

    def _finish(self, delivery: Delivery, outcome: Any) -> None:
        message_id = delivery.message_id
        if message_id is not None:
            copies = self.in_flight.pop(message_id, 0) - 1
            if copies > 0:
                self.in_flight[message_id] = copies
        self._unfinished_count -= 1
        if delivery.generation != self.generation or self.channel is None:
            # Its channel is gone, so is its delivery tag; the broker redelivers it.
            if outcome.saved and message_id is not None:
                _remember(self.saved_unacked, message_id, _SAVED_IDS_KEPT)
        elif outcome.status == "saved":
            self.unsettled[delivery.tag] = message_id or ""  # acked by _flush_acks
            self._saved_unsettled += 1
        elif outcome.status == "failed":
            self._retry_or_dead_letter(delivery, outcome.error or "scan failed")
        else:  # not_done: stoqd stopped before scanning it
            self._nack(delivery, requeue=True)
        if message_id is not None and message_id in self.parked:
            if message_id not in self.in_flight:  # its last copy in flight has ended
                self._release_parked(message_id, outcome.saved)

    def _release_parked(self, message_id: str, saved: bool) -> None:
        for parked in self.parked.pop(message_id):
            if parked.generation != self.generation or self.channel is None:
                continue  # its channel is gone too; it comes back again
            if saved:
                self.saved_unacked.pop(message_id, None)
                self.stats["duplicates_skipped"] += 1
                self._ack(parked)
            else:
                self.pending.appendleft(parked)

    def _ack(self, delivery: Delivery, counter: Optional[str] = "acked") -> None:
        assert self.channel is not None
        self._forget_tag(delivery.tag)
        self.channel.basic_ack(delivery.tag)
        if counter is not None:
            self.stats[counter] += 1

    def _nack(self, delivery: Delivery, requeue: bool) -> None:
        assert self.channel is not None
        self._forget_tag(delivery.tag)
        self.channel.basic_nack(delivery.tag, requeue=requeue)
        self.stats["nacked"] += 1

    def _retry_or_dead_letter(self, delivery: Delivery, reason: str) -> None:
        if delivery.retries >= self.plugin.max_retries:
            self._dead_letter(delivery, f"failed {delivery.retries + 1} times: {reason}")
            return
        retry = {RETRIES_HEADER: delivery.retries + 1, ERROR_HEADER: reason[:1000]}
        if not self._publish_again(delivery, retry, counter="retried"):
            self._dead_letter(delivery, f"failed, and the queue refused its retry: {reason}")
            return
        self.log.warning("message %s failed, retry %d of %d: %s",
                         delivery.message_id or f"tag {delivery.tag}", delivery.retries + 1,
                         self.plugin.max_retries, reason)  # fmt: skip

    def _reject_malformed(self, delivery: Delivery, reason: str) -> None:
        """Dead-letter a message that can never be scanned, with its reason on it.

        A reject cannot add a header, and the dead-letter exchange may come from a policy
        this provider does not know, so the message is first published again carrying
        ``x-stoqd-error`` and a mark; when the marked copy comes back it is rejected, and
        RabbitMQ dead-letters it with the reason (and its own ``x-death``) on it. (The mark,
        not the reason's text, ends it: two consumers that word it differently, with other
        size limits, must not pass a message back and forth for ever.)
        """
        copy = {MALFORMED_HEADER: 1, ERROR_HEADER: reason[:1000]}
        marked = (delivery.properties.headers or {}).get(MALFORMED_HEADER)
        if marked or not self._publish_again(delivery, copy, counter=None):
            self._dead_letter(delivery, reason)
            return
        self.stats["last_error"] = reason
        self.log.warning("message %s cannot be scanned, published again with the reason "
                         "to be dead-lettered: %s",
                         delivery.message_id or f"tag {delivery.tag}", reason)  # fmt: skip

    def _publish_again(
        self, delivery: Delivery, headers: Dict[str, Any], counter: Optional[str]
    ) -> bool:
        """Publish a copy to the back of the queue with ``headers`` added and ack the
        original: True. False when the broker will not take the copy, and the caller
        dead-letters the message instead (never a redelivery loop).

        A copy the broker refuses by closing the channel (a user that may only consume,
        403; a body over the broker's size limit) raises, as any channel loss does: the
        message is delivered again on the next channel, and this time not copied.
        """
        assert self.channel is not None
        if self.copies_refused or (
            self.copy_refused_for and _identity(delivery) in self.copy_refused_for
        ):  # (a body is hashed only when some copy was refused)
            return False
        properties = delivery.properties
        properties.headers = {**(properties.headers or {}), **headers}
        try:
            # Published (and confirmed) before the original is acked: a crash in between
            # leaves two copies, never none.
            self.channel.basic_publish("", self.plugin.queue_name, delivery.body, properties)
        except (pika.exceptions.NackError, pika.exceptions.UnroutableError):
            return False  # this copy refused (a full queue that rejects publishes)
        except pika.exceptions.ChannelClosedByBroker as exc:
            self._copy_refused(delivery, exc)
            raise
        self._ack(delivery, counter=counter)
        return True

    def _copy_refused(self, delivery: Delivery, exc: pika.exceptions.ChannelClosedByBroker) -> None:
        if exc.reply_code == _ACCESS_REFUSED:  # no copy of any message will be taken
            self.copies_refused = True
            scope = "from now on, failed and malformed messages are"
        else:
            _remember(self.copy_refused_for, _identity(delivery), _REFUSED_IDS_KEPT)
            scope = "when it comes back, it is"
        self.log.error("queue %s refused a copy of message %s (%s %s): %s dead-lettered "
                       "without retries or a reason header", self.plugin.queue_name,
                       delivery.message_id or f"tag {delivery.tag}", exc.reply_code,
                       exc.reply_text, scope)  # fmt: skip

    def _dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Reject without requeue: RabbitMQ moves it to the queue's dead-letter exchange."""
        assert self.channel is not None
        self._forget_tag(delivery.tag)
        self.channel.basic_nack(delivery.tag, requeue=False)
        self.stats["dead_lettered"] += 1
        self.stats["last_error"] = reason
        where = (
            f"dead-letter exchange {self.plugin.dead_letter_exchange}"
            if self.plugin.dead_letter_exchange and not self.plugin.passive
            else "the queue's dead-letter exchange (discarded if it has none)"
        )
        self.log.error("message %s dead-lettered to %s: %s",
                       delivery.message_id or f"tag {delivery.tag}", where, reason)  # fmt: skip

    # -- status -----------------------------------------------------------------------

    def _maybe_lag(self) -> None:
        now = time.monotonic()
        if self.channel is None or now - self._last_lag < _LAG_EVERY:
            return
        self._last_lag = now
        declared = self.channel.queue_declare(self.plugin.queue_name, passive=True)
        self.stats["lag"] = declared.method.message_count  # ready, not yet delivered

    def _report(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last_report >= _REPORT_EVERY:
            self._last_report = now
            self.queue.report(**self.stats)


def _remember(ids: collections.OrderedDict[str, None], key: str, kept: int) -> None:
    """Add ``key`` to a bounded record of ids, forgetting the oldest beyond ``kept``."""
    ids[key] = None
    while len(ids) > kept:
        ids.popitem(last=False)


def _identity(delivery: Delivery) -> str:
    """Which message a delivery is, across redeliveries: its id, else its body's digest."""
    return delivery.message_id or hashlib.sha256(delivery.body).hexdigest()


def _nothing() -> None:
    """Wakes ``process_data_events``; the outcome itself waits in ``_Consumer.outcomes``."""
