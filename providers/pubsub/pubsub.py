"""Plugin ``pubsub``: a Google Pub/Sub subscription as a provider, a topic as a connector.

Provider: a streaming pull with flow control (``max_messages`` and ``max_bytes``
outstanding: the backpressure). While a message waits in stoqd's queue or is scanned,
the client library keeps extending its lease (up to ``max_lease_duration``, by at most
``lease_extension`` seconds at a time); it is
acknowledged only after stoqd reports its results saved, nacked (redelivered at once)
when the scan failed or stoqd stopped first. After ``max_retries`` failed deliveries it
is published to ``dead_letter_topic`` and acknowledged, or nacked again when there is
none. Message attributes go into the payload's metadata; a message whose attribute
``content_type`` is ``application/json`` is a stoQ archiver reference.

The Google client reads ``PUBSUB_EMULATOR_HOST`` itself: against the emulator, nothing
else changes.

Connector: publishes each result (or archiver references) to ``publish_topic`` and
returns only once Pub/Sub has accepted it.
"""

from __future__ import annotations

import collections
import concurrent.futures
import queue as stdlib_queue
import threading
import time
from configparser import ConfigParser
from typing import Any, Dict, List, Optional

from google.api_core import exceptions as google_errors
from google.cloud import pubsub_v1
from stoqd_providers.rabbitmq.rabbitmq import MessageError, message_item, publications

from stoqd.builtin._options import positive_int, size
from stoqd.childproc import one_line
from stoqd.framework.data import StoqResponse
from stoqd.framework.exceptions import StoqPluginException
from stoqd.framework.plugins import ConnectorPlugin, ProviderPlugin

_ATTEMPTS_KEPT = 100_000  # message ids with a failed delivery, for bounded retries
# Message ids saved (or dead-lettered) and acked, to skip Pub/Sub's redeliveries of them
# (an ack lost on the way comes back within an ack deadline): kept for two ack deadlines,
# at most this many (15-17 MiB).
_FINISHED_IDS_KEPT = 100_000
_PUBLISH_TIMEOUT = 60.0
# The streaming pull retries an unreachable service in silence, so the connection state
# in the status comes from a cheap call on the same channel every few seconds.
_PROBE_INTERVAL = 3.0
_PROBE_TIMEOUT = 3.0
_LEASE_EXTENSION = (10, 600)  # the ack deadlines Pub/Sub accepts, in seconds


class PubsubPlugin(ProviderPlugin, ConnectorPlugin):
    """Streaming-pull provider with late acknowledgement; result publisher as connector."""

    def __init__(self, config: ConfigParser, plugin_opts: Optional[Dict[str, Any]] = None) -> None:
        super().__init__(config, plugin_opts)
        self.project_id = self.option("project_id", "", str).strip()
        if not self.project_id:
            raise StoqPluginException(f"plugin {self.plugin_name}: option project_id is required")
        self.subscription = self.option("subscription", "", str).strip()
        self.topic = self.option("topic", "", str).strip()
        self.create = self.option("create", False, bool)
        self.max_messages = self.option("max_messages", 100, positive_int)
        self.max_bytes = self.option("max_bytes", "100M", size)
        self.max_lease_duration = self.option("max_lease_duration", 3600, positive_int)
        # Also how long the messages of a consumer that died stay leased to it: the
        # client asks for this deadline on its stream (its own default is 60 s).
        self.lease_extension = self.option("lease_extension", 60, positive_int)
        if not _LEASE_EXTENSION[0] <= self.lease_extension <= _LEASE_EXTENSION[1]:
            raise StoqPluginException(
                f"plugin {self.plugin_name}: option lease_extension={self.lease_extension} "
                f"must be between {_LEASE_EXTENSION[0]} and {_LEASE_EXTENSION[1]} seconds"
            )
        self.max_retries = self.option("max_retries", 3, int)
        self.dead_letter_topic = self.option("dead_letter_topic", "", str).strip()
        self.max_message_size = self.option("max_message_size", "10M", size)
        self.json_references = self.option("json_references", True, bool)
        self.publish_topic = self.option("publish_topic", "", str).strip()
        self.publish = self.option("publish", "auto", str).strip().lower()
        if self.publish not in ("auto", "results", "references"):
            raise StoqPluginException(
                f"plugin {self.plugin_name}: option publish={self.publish!r} must be "
                "auto, results or references"
            )
        if self.create and self.subscription and not self.topic:
            raise StoqPluginException(
                f"plugin {self.plugin_name}: option create needs option topic "
                "(the topic the subscription is created on)"
            )
        self._publisher: Optional[pubsub_v1.PublisherClient] = None

    def publisher(self) -> pubsub_v1.PublisherClient:
        if self._publisher is None:
            self._publisher = pubsub_v1.PublisherClient()
        return self._publisher

    def topic_path(self, topic: str) -> str:
        return (
            topic if topic.startswith("projects/") else f"projects/{self.project_id}/topics/{topic}"
        )

    # -- provider -------------------------------------------------------------------

    def ingest(self, queue: Any) -> None:
        """Pull ``subscription`` until stoqd stops (the client reconnects by itself)."""
        if not self.subscription:
            raise StoqPluginException(f"plugin {self.plugin_name}: option subscription is required")
        _Puller(self, queue).run()

    # -- connector ------------------------------------------------------------------

    def save(self, response: StoqResponse) -> None:
        """Publish the result (or archiver references); returns once Pub/Sub has it."""
        if not self.publish_topic:
            raise StoqPluginException(
                f"plugin {self.plugin_name}: set option publish_topic to publish results"
            )
        topic = self.topic_path(self.publish_topic)
        futures = [
            self.publisher().publish(
                topic, body, content_type="application/json", stoqd_message_id=message_id
            )
            for message_id, body in publications(response, self.publish)
        ]
        for future in futures:
            try:
                future.result(timeout=_PUBLISH_TIMEOUT)
            except Exception as exc:  # the client's errors (NotFound, timeouts) alike
                raise StoqPluginException(
                    f"plugin {self.plugin_name}: cannot publish to {topic}: {one_line(exc)}"
                ) from None


class _Puller:
    """One provider process's streaming pull and the outcomes of what it put."""

    def __init__(self, plugin: PubsubPlugin, queue: Any) -> None:
        self.plugin = plugin
        self.queue = queue
        self.log = plugin.log
        self.subscriber = pubsub_v1.SubscriberClient()
        self.path = self.subscriber.subscription_path(plugin.project_id, plugin.subscription)
        self.lock = threading.Lock()
        self.attempts: collections.OrderedDict[str, int] = collections.OrderedDict()
        # Pub/Sub delivers at least once: the same message (same id) can come again while
        # its first delivery is scanned (a lease that lapsed) or after it was saved (an ack
        # lost on the way). ``scanning``: ids with a delivery in stoqd, and the repeats
        # parked behind it; ``finished_ids``: ids this process saved or dead-lettered,
        # and acked, with when.
        self.scanning: Dict[str, List[Any]] = {}
        self.finished_ids: collections.OrderedDict[str, float] = collections.OrderedDict()
        self.in_flight = 0
        self.probing = True
        self.stats: Dict[str, Any] = {
            "connection": "connecting", "subscription": self.path,
            "acknowledgement": "after results are saved", "received": 0, "acked": 0,
            "nacked": 0, "dead_lettered": 0, "duplicates_skipped": 0, "in_flight": 0,
            "last_error": None,
        }  # fmt: skip

    def run(self) -> None:
        if self.plugin.create:
            self._create()
        flow = pubsub_v1.types.FlowControl(
            max_messages=self.plugin.max_messages,
            max_bytes=self.plugin.max_bytes,
            max_lease_duration=self.plugin.max_lease_duration,
            max_duration_per_lease_extension=self.plugin.lease_extension,
        )
        future = self.subscriber.subscribe(self.path, self._on_message, flow_control=flow)
        self._count(connection=f"streaming pull from {self.path}")
        next_probe = time.monotonic() + _PROBE_INTERVAL
        try:
            while True:
                try:
                    future.result(timeout=0.5)
                    return  # cancelled
                except concurrent.futures.TimeoutError:
                    pass
                if self.probing and time.monotonic() >= next_probe:
                    self._probe()
                    next_probe = time.monotonic() + _PROBE_INTERVAL
                self.queue.report(**self._snapshot())
                if self.queue.stopping.is_set() and self._idle():
                    return
        except google_errors.NotFound:
            raise StoqPluginException(
                f"plugin {self.plugin.plugin_name}: subscription {self.path} does not exist "
                "(set create = true and topic to create it)"
            ) from None
        finally:
            future.cancel()
            try:
                future.result(timeout=10)
            except Exception:  # cancelled, or the error raised above
                pass
            self.subscriber.close()
            self._count(connection="closed")
            self.queue.report(**self._snapshot())

    def _probe(self) -> None:
        """Ask for the subscription once, to tell a live stream from one being retried."""
        try:
            self.subscriber.get_subscription(
                subscription=self.path, retry=None, timeout=_PROBE_TIMEOUT
            )
        except google_errors.PermissionDenied:
            # roles/pubsub.subscriber may consume but not read a subscription: the state
            # stays unknown rather than reported down.
            self.probing = False
            self._count(connection=f"streaming pull from {self.path} (state not probed: "
                                   "no permission pubsub.subscriptions.get)")  # fmt: skip
        except Exception as exc:  # unreachable, timed out, not found: the stream fares alike
            reason = one_line(exc)
            self._count(connection=f"down: {reason}; the client keeps retrying",
                        last_error=reason)  # fmt: skip
        else:
            self._count(connection=f"streaming pull from {self.path}")

    def _idle(self) -> bool:
        with self.lock:
            return self.in_flight == 0

    def _create(self) -> None:
        """Create the topic, subscription and dead-letter topic that do not exist yet."""
        plugin = self.plugin
        publisher = plugin.publisher()
        for topic in filter(None, (plugin.topic, plugin.dead_letter_topic)):
            try:
                publisher.create_topic(name=plugin.topic_path(topic))
            except google_errors.AlreadyExists:
                pass
        try:
            self.subscriber.create_subscription(
                name=self.path, topic=plugin.topic_path(plugin.topic), ack_deadline_seconds=60
            )
        except google_errors.AlreadyExists:
            pass

    # -- messages (on the client's callback threads) ------------------------------------

    def _on_message(self, message: Any) -> None:
        self._count(received=1)
        if self._repeated(message):
            return
        try:
            self._hand_over(message)
        except BaseException:
            # Repeats parked behind a delivery that never reached stoqd must not wait on it.
            self._settle(message, finished=False)
            raise

    def _hand_over(self, message: Any) -> None:
        """Put a first delivery into stoqd's queue, or dead-letter or nack it."""
        plugin = self.plugin
        attributes = dict(message.attributes)
        extra = {
            "subscription": self.path,
            "message_id": message.message_id,
            "publish_time": message.publish_time.isoformat() if message.publish_time else None,
            "attributes": attributes,
            "delivery_attempt": message.delivery_attempt,
        }
        try:
            item = message_item(message.data, attributes.get("content_type"), extra,
                                plugin.max_message_size, plugin.json_references)  # fmt: skip
        except MessageError as exc:
            self._settle(message, finished=self._dead_letter(message, str(exc)))
            return
        with self.lock:
            self.in_flight += 1
        done = lambda outcome, m=message: self._done(m, outcome)  # noqa: E731
        # put() blocks while stoqd's queue is full; once stoqd stops it would block for
        # good, so the message goes back instead (as it does if put raises).
        handed_over = False
        try:
            while not self.queue.stopping.is_set():
                try:
                    # The message id as key: a restarted provider's redelivery of a message
                    # its killed predecessor handed over gets that item's outcome, no rescan.
                    self.queue.put(item, timeout=0.5, done=done, key=message.message_id)
                    handed_over = True
                    return
                except stdlib_queue.Full:
                    pass
        finally:
            if not handed_over:
                with self.lock:
                    self.in_flight -= 1
                message.nack()
                self._count(nacked=1)
                self._settle(message, finished=False)

    def _done(self, message: Any, outcome: Any) -> None:
        """stoqd's completion thread: Pub/Sub's ack and nack are thread-safe."""
        saved = outcome.status == "saved"
        finished = saved
        try:
            if saved:
                message.ack()
                self._count(acked=1)
            elif outcome.status == "failed":
                finished = self._failed(message, outcome.error or "scan failed")
            else:  # not_done: redelivered, to us or another consumer
                message.nack()
                self._count(nacked=1)
        finally:
            with self.lock:
                self.in_flight -= 1
            self._settle(message, finished)

    def _repeated(self, message: Any) -> bool:
        """Whether this delivery repeats a message already in stoqd or saved: it is then
        parked behind the first (settled with it) or acked at once, never scanned twice."""
        message_id = message.message_id
        with self.lock:
            if message_id in self.scanning:
                self.scanning[message_id].append(message)
                self.in_flight += 1  # a stop waits for it, as for the first delivery
                return True
            if message_id not in self.finished_ids:
                self.scanning[message_id] = []
                return False
        message.ack()
        self._count(duplicates_skipped=1)
        return True

    def _settle(self, message: Any, finished: bool) -> None:
        """The first delivery of ``message`` is done with: settle the repeats parked behind
        it. ``finished`` (saved, or dead-lettered): they are acked, the message needs
        nothing more, and its id is remembered. Otherwise they are nacked, and it comes
        back as one delivery."""
        message_id = message.message_id
        with self.lock:
            parked = self.scanning.pop(message_id, [])
            if finished:
                self._remember_finished(message_id)
        try:
            for repeat in parked:
                if finished:
                    repeat.ack()
                    self._count(duplicates_skipped=1)
                else:
                    repeat.nack()
                    self._count(nacked=1)
        finally:
            with self.lock:
                self.in_flight -= len(parked)

    def _remember_finished(self, message_id: str) -> None:
        """Keep a finished id for two ack deadlines, oldest first out (under the lock).

        A lost ack comes back once the deadline of the delivery it was for lapses: at most
        ``lease_extension`` seconds, or 60 on a subscription with exactly-once delivery.
        """
        now = time.monotonic()
        ids = self.finished_ids
        ids[message_id] = now
        ids.move_to_end(message_id)
        horizon = now - 2 * max(self.plugin.lease_extension, 60)
        while len(ids) > _FINISHED_IDS_KEPT or next(iter(ids.values())) < horizon:
            ids.popitem(last=False)

    def _failed(self, message: Any, reason: str) -> bool:
        """Nack a failed message for another try, or dead-letter it; True once it is
        acknowledged (dead-lettered)."""
        attempt = message.delivery_attempt or self._attempt(message.message_id)
        if attempt <= self.plugin.max_retries:
            self.log.warning("message %s failed (attempt %d of %d): %s", message.message_id,
                             attempt, self.plugin.max_retries + 1, reason)  # fmt: skip
            message.nack()
            self._count(nacked=1, last_error=reason)
            return False
        return self._dead_letter(message, f"failed {attempt} times: {reason}")

    def _attempt(self, message_id: str) -> int:
        with self.lock:
            count = self.attempts.pop(message_id, 0) + 1
            self.attempts[message_id] = count
            while len(self.attempts) > _ATTEMPTS_KEPT:
                self.attempts.popitem(last=False)
            return count

    def _dead_letter(self, message: Any, reason: str) -> bool:
        """Publish ``message`` to the dead-letter topic and ack it (True), or nack it."""
        topic = self.plugin.dead_letter_topic
        if not topic:
            self.log.error("message %s cannot be scanned and no dead_letter_topic is set; "
                           "nacked: %s", message.message_id, reason)  # fmt: skip
            message.nack()
            self._count(nacked=1, last_error=reason)
            return False
        attributes = {**message.attributes, "stoqd_error": reason[:1000],
                      "stoqd_subscription": self.path,
                      "stoqd_message_id": message.message_id}  # fmt: skip
        try:
            self.plugin.publisher().publish(
                self.plugin.topic_path(topic), message.data, **attributes
            ).result(timeout=_PUBLISH_TIMEOUT)
        except Exception as exc:  # not published: keep the message, try again later
            self.log.error("message %s: cannot publish to dead_letter_topic %s: %s; nacked",
                           message.message_id, topic, exc)  # fmt: skip
            message.nack()
            self._count(nacked=1, last_error=reason)
            return False
        message.ack()
        self.log.error("message %s dead-lettered to %s: %s", message.message_id, topic, reason)
        self._count(dead_lettered=1, last_error=reason)
        return True

    # -- status ---------------------------------------------------------------------

    def _count(self, **changes: Any) -> None:
        with self.lock:
            for key, value in changes.items():
                if isinstance(value, int) and isinstance(self.stats.get(key), int):
                    self.stats[key] += value
                else:
                    self.stats[key] = value

    def _snapshot(self) -> Dict[str, Any]:
        with self.lock:
            self.stats["in_flight"] = self.in_flight
            return dict(self.stats)
