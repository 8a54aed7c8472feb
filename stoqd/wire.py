"""Frames on the private socket between the supervisor and each child.

Why not one shared ``multiprocessing.Queue``: a child killed while holding its lock or
halfway through writing a message corrupts or deadlocks the queue for everyone. Here
every child has its own socketpair to the supervisor, so a child that dies mid-write
only ruins its own stream, which the supervisor drops with the child.

A frame is ``!II`` (header length, body length), a JSON header, then raw body bytes:
nothing is ever unpickled or evaluated. The supervisor side is non-blocking
(``Channel``), so a stuck child can never stall the supervisor loop; the child side
blocks (``Endpoint``).

Every payload crosses this module two or three times, so it avoids work per frame:
each end receives into one reused buffer (a fresh ``recv(n)`` allocates ``n`` bytes
every call), and headers go through orjson both ways, with the json module only where
orjson would refuse or change them (see ``encode_header`` and ``decode_header``).
"""

from __future__ import annotations

import contextlib
import errno
import json
import re
import socket
import struct
import threading
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import orjson

_PREFIX = struct.Struct("!II")
MAX_HEADER = 16 << 20
MAX_BODY = 1 << 30
# One receive buffer per end. Larger frames arrive over several receives; a small
# buffer that is reused costs less than a large one allocated per call.
RECEIVE_SIZE = 64 << 10
# Frames one thread holds back at most (Endpoint.holding): about a receive buffer's worth
# of 4 KiB items, and never a long wait for the first of them.
_HELD_FRAMES_MAX = 16
# Entries one batch frame carries at most (Channel.send_in_batch): far below MAX_HEADER
# even with long error lines, and already one frame per many items.
_BATCH_MAX = 128

Message = Tuple[Dict[str, Any], bytes]
# A message with its header as it arrived, for passing on without re-encoding it.
Frame = Tuple[Dict[str, Any], bytes, bytes]
Buffer = Union[bytes, bytearray, memoryview]

_encoder = json.JSONEncoder(separators=(",", ":"))
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_]+")  # a key JSON writes as it is, between quotes
# 19 digits in a row: maybe an integer beyond 64 bits, which orjson would decode as a float.
# Found as 19 ones after turning every digit into a one: a fifth of the time of a regular
# expression, which would cost more than orjson's decoding.
_DIGITS_TO_ONES = bytes.maketrans(b"0123456789", b"1" * 10)
_LONG_NUMBER = b"1" * 19
_decoder = json.JSONDecoder()


class ProtocolError(Exception):
    """The peer sent something that is not a frame."""


def encode_header(header: Dict[str, Any]) -> bytes:
    """A header as it travels: compact JSON."""
    try:
        return orjson.dumps(header, option=orjson.OPT_NON_STR_KEYS)
    except orjson.JSONEncodeError:  # a big integer, a lone surrogate; or not JSON at all
        return _encoder.encode(header).encode()


def frame(raw_header: bytes, body: Buffer = b"") -> bytes:
    """A frame from a header already encoded (``encode_header``) and its body."""
    return b"".join((_PREFIX.pack(len(raw_header), len(body)), raw_header, body))


def encode(header: Dict[str, Any], body: Buffer = b"") -> bytes:
    return frame(encode_header(header), body)


def with_members(raw_header: bytes, members: Dict[str, Any]) -> bytes:
    """``raw_header`` (an encoded JSON object) with ``members`` appended.

    Lets a header be passed on without decoding and re-encoding all of it. A key of
    ``members`` already in ``raw_header`` is then in the text twice; JSON decoders
    (Python's among them) keep the last, so ``members`` win.
    """
    if not members:
        return raw_header
    return _append(raw_header, encode_header(members)[1:-1])


def with_number(raw_header: bytes, key: str, number: int) -> bytes:
    """``with_members(raw_header, {key: number})`` for a plain key, without a JSON encoder.

    Runs once per item in the supervisor, where an encoder call would cost more than
    the rest of passing the header on.
    """
    if not _PLAIN_KEY.fullmatch(key):
        return with_members(raw_header, {key: number})
    return _append(raw_header, b'"%s":%d' % (key.encode(), int(number)))


def _append(raw_header: bytes, members: bytes) -> bytes:
    # decode_header accepted raw_header as one JSON object, so it ends with "}"; it may
    # still hold whitespace (another encoder's "{ }"), which the comma must not follow.
    head = raw_header.rstrip()[:-1].rstrip()
    return b"".join((head, b"" if head.endswith(b"{") else b",", members, b"}"))


def decode_header(raw: Buffer) -> Dict[str, Any]:
    """A header from its JSON; ProtocolError unless it is one JSON object (whitespace
    around it allowed), nested no deeper than the interpreter's recursion limit."""
    header = _quick_decode(raw)
    if header is None:
        try:
            text = str(raw, "utf-8")
            header, end = _decoder.raw_decode(text)
        except (ValueError, RecursionError) as exc:  # ValueError: JSON, UTF-8
            raise ProtocolError(f"bad frame header: {exc}") from None
        if end != len(text):
            raise ProtocolError(f"bad frame header: extra data at {end}")
    if not isinstance(header, dict):
        raise ProtocolError("frame header is not an object")
    return header


def _quick_decode(raw: Buffer) -> Any:
    """``raw`` decoded by orjson, or None where only the json module gives it back exactly.

    Every frame is decoded at least once, the supervisor's busiest work, and orjson takes a
    fraction of the json module's time. It would turn an integer beyond 64 bits into a
    float, so a header that may hold one goes to the json module; so does one orjson
    refuses: not JSON, or the ``NaN`` that the json module writes in the rare headers
    orjson could not encode.
    """
    data = raw if isinstance(raw, bytes) else bytes(raw)
    if _LONG_NUMBER in data.translate(_DIGITS_TO_ONES):
        return None
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None


class Decoder:
    """Splits a byte stream into frames."""

    def __init__(self) -> None:
        self._buffer = bytearray()  # the start of a frame not yet complete

    def feed(self, data: Buffer) -> List[Message]:
        """Frames completed by ``data``; ``data`` is not kept and may be reused after."""
        return [(header, body) for header, _, body in self.feed_frames(data)]

    def feed_frames(self, data: Buffer) -> List[Frame]:
        """``feed``, with each header's raw bytes as well."""
        if not self._buffer:
            # The usual case: frames are parsed straight from ``data``, and only an
            # incomplete tail is copied.
            messages, used = _split(data)
            if used < len(data):
                self._buffer += memoryview(data)[used:]
            return messages
        self._buffer += data
        messages, used = _split(self._buffer)
        if used:
            del self._buffer[:used]
        return messages


def _split(data: Buffer) -> Tuple[List[Frame], int]:
    """The complete frames at the start of ``data`` and how many bytes they take."""
    messages: List[Frame] = []
    offset = 0
    size = len(data)
    with memoryview(data) as view:
        while size - offset >= _PREFIX.size:
            header_len, body_len = _PREFIX.unpack_from(view, offset)
            if header_len > MAX_HEADER or body_len > MAX_BODY:
                raise ProtocolError(f"frame of {header_len}+{body_len} bytes is too large")
            start = offset + _PREFIX.size
            end = start + header_len + body_len
            if size < end:
                break
            raw = bytes(view[start : start + header_len])
            messages.append((decode_header(raw), raw, bytes(view[start + header_len : end])))
            offset = end
    return messages, offset


class Channel:
    """The supervisor's end: non-blocking, with an outgoing buffer flushed when writable."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._decoder = Decoder()
        self._chunk = bytearray(RECEIVE_SIZE)
        self._out = bytearray()
        # Entries for one batch frame not yet framed (``send_in_batch``): its kind, entries.
        self._batch: Optional[Tuple[str, List[Any]]] = None
        self.closed = False
        # The peer closed its end (it died): nothing more can be sent, but what it sent
        # before may still wait to be read.
        self.peer_gone = False
        # Whether its owner's selector watches it for writability (the owner keeps it).
        self.write_interest = False
        # Called before the socket closes, so its owner can unregister it from a selector
        # while the fd number is still this socket's (the next child may be given it).
        self.on_close: Optional[Callable[[Channel], None]] = None

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, header: Dict[str, Any], body: Buffer = b"") -> None:
        """Queue a frame; the loop flushes every channel once per turn.

        Waking a child costs far more than copying bytes, so frames sent during one
        turn of the loop leave in as few system calls as possible.
        """
        self.send_raw(encode_header(header), body)

    def send_in_batch(self, kind: str, entry: Any) -> None:
        """Queue ``entry`` (JSON) for one frame ``{"t": kind, "items": [entry, ...]}``
        carrying every entry queued since the last other frame or flush.

        For what the supervisor sends per item (outcomes): the peer then decodes one
        header per turn of the loop instead of one per item. Order is kept: the batch is
        framed before any frame sent after it.
        """
        batch = self._batch
        if batch is not None and batch[0] == kind and len(batch[1]) < _BATCH_MAX:
            batch[1].append(entry)
            return
        self._end_batch()
        self._batch = (kind, [entry])

    def _end_batch(self) -> None:
        batch, self._batch = self._batch, None
        if batch is not None:
            self.send_raw(encode_header({"t": batch[0], "items": batch[1]}))

    def send_raw(self, raw_header: bytes, body: Buffer = b"") -> None:
        """``send`` with a header already encoded (``encode_header``, ``with_members``)."""
        if self._batch is not None:
            self._end_batch()
        if not self.closed and not self.peer_gone:
            out = self._out
            out += _PREFIX.pack(len(raw_header), len(body))
            out += raw_header
            out += body

    def flush(self) -> None:
        self._end_batch()
        while self._out and not self.closed:
            try:
                sent = self.sock.send(self._out)
            except BlockingIOError:
                return
            except (BrokenPipeError, ConnectionResetError):
                # A worker killed mid-scan may have sent results before it died; closing
                # now would lose them and rescan what was saved. The socket stays open
                # for reading; its end-of-file closes it.
                self.peer_gone = True
                self._out.clear()
                return
            except OSError:
                self.close()
                return
            del self._out[:sent]

    @property
    def reachable(self) -> bool:
        """Whether a frame sent now can still reach the peer."""
        return not self.closed and not self.peer_gone

    @property
    def wants_write(self) -> bool:
        return bool(self._out or self._batch) and not self.closed

    @property
    def holds_only_a_batch(self) -> bool:
        """Whether all that waits to be sent is a batch not yet framed (see
        ``send_in_batch``), which its owner may let grow for a while."""
        return not self._out and self._batch is not None

    def receive(self) -> Optional[List[Message]]:
        """Frames now readable; None when the peer has gone (EOF or error)."""
        frames = self.receive_frames()
        if frames is None:
            return None
        return [(header, body) for header, _, body in frames]

    def receive_frames(self) -> Optional[List[Frame]]:
        """``receive``, with each header's raw bytes as well."""
        if self.closed:
            return None
        messages: List[Frame] = []
        chunk = self._chunk
        while True:
            try:
                count = self.sock.recv_into(chunk)
            except BlockingIOError:
                return messages
            except OSError:
                self.close()
                return messages or None
            if not count:
                self.close()
                return messages or None
            try:
                with memoryview(chunk) as view:
                    messages += self._decoder.feed_frames(view[:count])
            except ProtocolError:
                # A child that writes garbage is treated like one that died.
                self.close()
                return messages or None
            if count < len(chunk):
                return messages

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.on_close is not None:
                self.on_close(self)
            self.sock.close()


class Endpoint:
    """A child's end: blocking sends (serialised across threads) and receives."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(True)
        self.sock = sock
        self._decoder = Decoder()
        self._chunk = bytearray(RECEIVE_SIZE)
        self._pending: List[Message] = []
        # Held by ``receive`` (blocked in recv too) and ``take_waiting``, which another
        # thread calls: each frame received goes to exactly one of them.
        self._receive_lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._held = threading.local()  # .frames: parts of frames this thread holds back
        self._broken = False  # a send failed part-way: nothing more is sent (_write)

    def send(self, header: Dict[str, Any], body: Buffer = b"") -> None:
        self.send_raw(encode_header(header), body)

    def send_raw(self, raw_header: bytes, body: Buffer = b"") -> None:
        """``send`` with a header already encoded (``encode_header``, ``with_members``)."""
        prefix = _PREFIX.pack(len(raw_header), len(body))
        held: Optional[List[Buffer]] = getattr(self._held, "frames", None)
        if held is not None and len(body) <= RECEIVE_SIZE:
            # The parts, not a frame joined from them: release_held joins all at once, so
            # a body is copied once on its way out, not twice.
            held += (prefix, raw_header, body)
            if len(held) >= 3 * _HELD_FRAMES_MAX:
                self.release_held()
            return
        if held:
            self.release_held()  # this thread's frames leave in the order it sent them
        if len(body) > RECEIVE_SIZE:
            self._write(prefix + raw_header, body)  # not copied into one frame first
        else:
            self._write(b"".join((prefix, raw_header, body)))

    def _write(self, *parts: Buffer) -> None:
        """Send ``parts`` whole, under the lock; after a send that failed, nothing more.

        A send cut short, by a dead supervisor or by an exception from a signal handler
        (the SystemExit that stops a provider) in the middle of ``sendall``, may have
        written part of a frame. Anything written after it would be read as the rest of
        that frame, and scanned as a corrupt item. So the socket is shut for writing and
        later frames are dropped: the supervisor reads the end of this child's stream and
        closes its end, which ends the child (see ``providerproc._read_supervisor``).
        """
        with self._send_lock:
            if self._broken:
                return
            try:
                for part in parts:
                    self.sock.sendall(part)
            except BaseException:
                self._broken = True
                with contextlib.suppress(OSError):
                    self.sock.shutdown(socket.SHUT_WR)
                raise

    @contextlib.contextmanager
    def holding(self) -> Iterator[None]:
        """Hold back the frames this thread sends in the block, and send them together at
        its end (or at ``release_held``, or every ``_HELD_FRAMES_MAX`` frames).

        A provider that receives messages in bursts then costs one system call, and one
        wake-up of the supervisor, per burst instead of per message. Other threads' frames
        are not held. Nested blocks send at the end of the outermost.
        """
        if getattr(self._held, "frames", None) is not None:
            yield
            return
        self._held.frames = []
        try:
            yield
        finally:
            try:
                self.release_held()
            finally:
                self._held.frames = None

    def release_held(self) -> None:
        """Send what this thread holds back now, before it waits for the supervisor."""
        held: Optional[List[Buffer]] = getattr(self._held, "frames", None)
        if held:
            data = b"".join(held)
            held.clear()
            self._write(data)

    def receive(self) -> Optional[Message]:
        """The next frame; None when the supervisor has gone."""
        with self._receive_lock:
            while not self._pending:
                try:
                    if not self._read_some():
                        return None
                except OSError as exc:
                    if exc.errno == errno.EINTR:
                        continue
                    return None
            return self._pending.pop(0)

    def _read_some(self, flags: int = 0) -> int:
        """One receive into the frames waiting to be taken (under the receive lock): the
        bytes read, 0 at the end of the stream; OSError as ``recv`` raises it."""
        count = self.sock.recv_into(self._chunk, 0, flags)
        if count:
            with memoryview(self._chunk) as view:
                self._pending += self._decoder.feed(view[:count])
        return count

    def take_waiting(
        self,
        wanted: Callable[[Dict[str, Any]], bool],
        answer: Callable[[Endpoint, List[Message]], None],
    ) -> None:
        """Take the frames that have arrived, unreceived, whose header is ``wanted``, and
        call ``answer`` with them (an empty list if none).

        For another thread than the one that calls ``receive``: a worker scanning a slow
        item gives back the items that wait behind it. Nothing is taken while ``receive``
        runs, as it then waits for (or is taking) the next frame itself. A frame not yet
        wholly arrived stays, and so do frames not ``wanted``, in their order. ``answer``
        runs before ``receive`` may go on, so the receiving thread cannot take an ``exit``
        behind the taken frames and end the process before the answer has gone out.
        """
        if not self._receive_lock.acquire(blocking=False):
            answer(self, [])
            return
        try:
            while True:
                try:
                    if not self._read_some(socket.MSG_DONTWAIT):
                        break  # end of stream: receive finds it again
                except OSError:  # nothing more now, or the supervisor is gone
                    break
            taken: List[Message] = []
            kept: List[Message] = []
            for message in self._pending:
                (taken if wanted(message[0]) else kept).append(message)
            self._pending = kept
            answer(self, taken)
        finally:
            self._receive_lock.release()
