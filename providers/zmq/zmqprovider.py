"""Plugin ``zmq``: payloads from a ZeroMQ PULL or SUB socket.

Frames of one message (PULL): ``[payload]`` or ``[metadata, payload]``; on a SUB socket
the topic frame comes first: ``[topic, payload]`` or ``[topic, metadata, payload]``.
``metadata`` is a JSON object with any of ``extra_data`` (object), ``dispatch_to`` (list
of worker names) and ``should_archive`` (boolean). Received bytes are only ever decoded
as JSON text: nothing is unpickled or evaluated.

ZeroMQ has no acknowledgement. Backpressure is the receive high-water mark (``hwm``):
while stoqd's queue is full the provider stops reading, ZeroMQ queues up to ``hwm``
messages, and then a PUSH sender blocks while a PUB sender drops messages.
"""

from __future__ import annotations

import json
import queue as stdlib_queue
import time
from configparser import ConfigParser
from typing import Any, Dict, List, Optional

import zmq

from stoqd.builtin._options import positive_int, size
from stoqd.framework.data import Payload, PayloadMeta
from stoqd.framework.exceptions import StoqPluginException
from stoqd.framework.plugins import ProviderPlugin

_METADATA_KEYS = ("extra_data", "dispatch_to", "should_archive")
_REPORT_EVERY = 0.5
_BURST = 16  # messages already received that are handed over in one write (queue.batched)
_ACKNOWLEDGEMENT = (
    "none: ZeroMQ has no acknowledgement; messages not yet saved are lost if stoqd stops"
)


class MessageError(Exception):
    """Frames that do not make a payload."""


def payload_of(frames: List[bytes], subscribed: bool, max_size: int) -> Payload:
    """A payload from one message's frames (see the module docstring), or ``MessageError``."""
    extra: Dict[str, Any] = {}
    if subscribed:
        if len(frames) < 2:
            raise MessageError(f"SUB message of {len(frames)} frame needs [topic, payload]")
        extra["topic"] = frames[0].decode("utf-8", "backslashreplace")
        frames = frames[1:]
    if len(frames) not in (1, 2):
        raise MessageError(
            f"message of {len(frames)} frames: expected [payload] or [metadata, payload]"
        )
    content = frames[-1]
    if max_size and len(content) > max_size:
        raise MessageError(f"payload of {len(content)} bytes exceeds max_message_size {max_size}")
    meta = PayloadMeta(extra_data=extra)
    if len(frames) == 2:
        _apply_metadata(meta, frames[0])
    return Payload(content, meta)


def _apply_metadata(meta: PayloadMeta, frame: bytes) -> None:
    try:
        decoded = json.loads(frame)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MessageError(f"metadata frame is not valid JSON: {exc}") from None
    if not isinstance(decoded, dict):
        raise MessageError("metadata frame must be a JSON object")
    unknown = sorted(set(decoded) - set(_METADATA_KEYS))
    if unknown:
        raise MessageError(f"metadata key {unknown[0]!r} is not one of {', '.join(_METADATA_KEYS)}")
    extra = decoded.get("extra_data", {})
    dispatch = decoded.get("dispatch_to", [])
    archive = decoded.get("should_archive", True)
    if not isinstance(extra, dict):
        raise MessageError("metadata extra_data must be a JSON object")
    if not (isinstance(dispatch, list) and all(isinstance(d, str) for d in dispatch)):
        raise MessageError("metadata dispatch_to must be a list of worker names")
    if not isinstance(archive, bool):
        raise MessageError("metadata should_archive must be true or false")
    meta.extra_data.update(extra)
    meta.dispatch_to = dispatch
    meta.should_archive = archive


class ZmqProvider(ProviderPlugin):
    """Receives payloads on a PULL or SUB socket until stoqd stops."""

    def __init__(self, config: ConfigParser, plugin_opts: Optional[Dict[str, Any]] = None) -> None:
        super().__init__(config, plugin_opts)
        self.socket_type = self.option("socket_type", "pull", str).strip().lower()
        if self.socket_type not in ("pull", "sub"):
            raise StoqPluginException(
                f"plugin {self.plugin_name}: option socket_type={self.socket_type!r} must be "
                "pull or sub"
            )
        self.endpoint = self.option("endpoint", "", str).strip()
        if not self.endpoint:
            raise StoqPluginException(f"plugin {self.plugin_name}: option endpoint is required")
        self.bind = self.option("bind", True, bool)
        self.topics = self.option("topics", [], list)
        self.hwm = self.option("hwm", 1000, positive_int)
        self.max_message_size = self.option("max_message_size", "256M", size)

    def ingest(self, queue: Any) -> None:
        """Receive until ``queue.stopping``; malformed messages are logged and dropped."""
        context = zmq.Context.instance()
        sock = context.socket(zmq.SUB if self.socket_type == "sub" else zmq.PULL)
        sock.setsockopt(zmq.RCVHWM, self.hwm)
        sock.setsockopt(zmq.LINGER, 0)
        if self.socket_type == "sub":
            for topic in self.topics or [""]:
                sock.setsockopt(zmq.SUBSCRIBE, topic.encode())
        try:
            (sock.bind if self.bind else sock.connect)(self.endpoint)
        except zmq.ZMQError as exc:
            sock.close()
            raise StoqPluginException(
                f"plugin {self.plugin_name}: cannot {'bind' if self.bind else 'connect'} "
                f"{self.endpoint}: {exc}"
            ) from None
        try:
            _Receiver(self, sock, queue).run()
        finally:
            sock.close()


class _Receiver:
    def __init__(self, plugin: ZmqProvider, sock: zmq.Socket, queue: Any) -> None:
        self.plugin = plugin
        self.sock = sock
        self.queue = queue
        verb = "bound to" if plugin.bind else "connected to"
        self.stats: Dict[str, Any] = {
            "connection": f"{plugin.socket_type.upper()} {verb} {plugin.endpoint}",
            "acknowledgement": _ACKNOWLEDGEMENT, "received": 0, "put": 0, "dropped": 0,
            "saved": 0, "failed": 0, "not_done": 0, "last_error": None,
        }  # fmt: skip
        self._last_report = 0.0

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        self._report(force=True)
        while not self.queue.stopping.is_set():
            if poller.poll(200):
                self._receive_burst()
            self._report()
        self._report(force=True)

    def _receive_burst(self) -> None:
        """What has already arrived, up to ``_BURST`` messages, handed over together."""
        with self.queue.batched():
            for _ in range(_BURST):
                self._receive_one()
                if self.queue.stopping.is_set() or not self.sock.poll(0, zmq.POLLIN):
                    return

    def _receive_one(self) -> None:
        frames = self.sock.recv_multipart()
        self.stats["received"] += 1
        try:
            payload = payload_of(frames, self.plugin.socket_type == "sub",
                                 self.plugin.max_message_size)  # fmt: skip
        except MessageError as exc:
            self.stats["dropped"] += 1
            self.stats["last_error"] = str(exc)
            self.plugin.log.error("message dropped: %s", exc)
            return
        while not self.queue.stopping.is_set():
            try:
                self.queue.put(payload, timeout=0.5, done=self._done)
                self.stats["put"] += 1
                return
            except stdlib_queue.Full:
                self._report()  # full: ZeroMQ now buffers up to hwm, then senders wait

    def _done(self, outcome: Any) -> None:
        # Only stoqd's completion thread writes these counters: no lock needed.
        self.stats[outcome.status] = self.stats.get(outcome.status, 0) + 1
        if not outcome.saved and outcome.error:
            self.stats["last_error"] = outcome.error

    def _report(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last_report >= _REPORT_EVERY:
            self._last_report = now
            self.queue.report(**self.stats)
