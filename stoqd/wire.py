"""Frames on the private socket between the supervisor and each child.

Why not one shared ``multiprocessing.Queue``: a child killed while holding its lock or
halfway through writing a message corrupts or deadlocks the queue for everyone. Here
every child has its own socketpair to the supervisor, so a child that dies mid-write
only ruins its own stream, which the supervisor drops with the child.

A frame is ``!II`` (header length, body length), a JSON header, then raw body bytes:
nothing is ever unpickled or evaluated. The supervisor side is non-blocking
(``Channel``), so a stuck child can never stall the supervisor loop; the child side
blocks (``Endpoint``).
"""

from __future__ import annotations

import errno
import json
import socket
import struct
import threading
from typing import Any, Callable, Dict, List, Optional, Tuple

_PREFIX = struct.Struct("!II")
MAX_HEADER = 16 << 20
MAX_BODY = 1 << 30

Message = Tuple[Dict[str, Any], bytes]


class ProtocolError(Exception):
    """The peer sent something that is not a frame."""


def encode(header: Dict[str, Any], body: bytes = b"") -> bytes:
    raw = json.dumps(header, separators=(",", ":")).encode()
    return _PREFIX.pack(len(raw), len(body)) + raw + body


class Decoder:
    """Splits a byte stream into frames."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> List[Message]:
        self._buffer += data
        messages: List[Message] = []
        view = self._buffer
        offset = 0
        while len(view) - offset >= _PREFIX.size:
            header_len, body_len = _PREFIX.unpack_from(view, offset)
            if header_len > MAX_HEADER or body_len > MAX_BODY:
                raise ProtocolError(f"frame of {header_len}+{body_len} bytes is too large")
            end = offset + _PREFIX.size + header_len + body_len
            if len(view) < end:
                break
            start = offset + _PREFIX.size
            try:
                header = json.loads(bytes(view[start : start + header_len]))
            except ValueError as exc:
                raise ProtocolError(f"bad frame header: {exc}") from None
            if not isinstance(header, dict):
                raise ProtocolError("frame header is not an object")
            messages.append((header, bytes(view[start + header_len : end])))
            offset = end
        if offset:
            del self._buffer[:offset]
        return messages


class Channel:
    """The supervisor's end: non-blocking, with an outgoing buffer flushed when writable."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._decoder = Decoder()
        self._out = bytearray()
        self.closed = False
        # Called before the socket closes, so its owner can unregister it from a selector
        # while the fd number is still this socket's (the next child may be given it).
        self.on_close: Optional[Callable[[Channel], None]] = None

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, header: Dict[str, Any], body: bytes = b"") -> None:
        """Queue a frame; the loop flushes every channel once per turn.

        Waking a child costs far more than copying bytes, so frames sent during one
        turn of the loop leave in as few system calls as possible.
        """
        if not self.closed:
            self._out += encode(header, body)

    def flush(self) -> None:
        while self._out and not self.closed:
            try:
                sent = self.sock.send(self._out)
            except BlockingIOError:
                return
            except OSError:
                self.close()
                return
            del self._out[:sent]

    @property
    def wants_write(self) -> bool:
        return bool(self._out) and not self.closed

    def receive(self) -> Optional[List[Message]]:
        """Frames now readable; None when the peer has gone (EOF or error)."""
        if self.closed:
            return None
        messages: List[Message] = []
        while True:
            try:
                data = self.sock.recv(1 << 20)
            except BlockingIOError:
                return messages
            except OSError:
                self.close()
                return messages or None
            if not data:
                self.close()
                return messages or None
            try:
                messages += self._decoder.feed(data)
            except ProtocolError:
                # A child that writes garbage is treated like one that died.
                self.close()
                return messages or None
            if len(data) < (1 << 20):
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
        self._pending: List[Message] = []
        self._send_lock = threading.Lock()

    def send(self, header: Dict[str, Any], body: bytes = b"") -> None:
        frame = encode(header, body)
        with self._send_lock:
            self.sock.sendall(frame)

    def receive(self) -> Optional[Message]:
        """The next frame; None when the supervisor has gone."""
        while not self._pending:
            try:
                data = self.sock.recv(1 << 20)
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                return None
            if not data:
                return None
            self._pending += self._decoder.feed(data)
        return self._pending.pop(0)
