"""Frames between supervisor and children: split anywhere, refused when malformed."""

import select
import socket
import struct
import threading

import pytest

from stoqd.wire import Channel, Decoder, Endpoint, ProtocolError, encode


def test_frames_survive_arbitrary_splits() -> None:
    stream = (
        encode({"t": "item", "id": 1}, b"abc")
        + encode({"t": "ready"})
        + encode({"n": 2}, b"\x00" * 70000)
    )
    for step in (1, 7, 4096, len(stream)):
        decoder = Decoder()
        messages = []
        for start in range(0, len(stream), step):
            messages += decoder.feed(stream[start : start + step])
        assert messages == [
            ({"t": "item", "id": 1}, b"abc"),
            ({"t": "ready"}, b""),
            ({"n": 2}, b"\x00" * 70000),
        ]


def test_a_header_that_is_not_json_is_refused() -> None:
    bad = struct.pack("!II", 3, 0) + b"{{{"
    with pytest.raises(ProtocolError, match="bad frame header"):
        Decoder().feed(bad)


def test_an_oversized_frame_is_refused_before_buffering_it() -> None:
    with pytest.raises(ProtocolError, match="too large"):
        Decoder().feed(struct.pack("!II", 1 << 30, 0))


def test_channel_buffers_instead_of_blocking_and_reports_eof() -> None:
    ours, theirs = socket.socketpair()
    channel, endpoint = Channel(ours), Endpoint(theirs)
    big = b"x" * (4 << 20)  # far more than the socket buffer: send must not block
    channel.send({"t": "item"}, big)
    assert channel.wants_write
    received: list = []
    reader = threading.Thread(target=lambda: received.append(endpoint.receive()))
    reader.start()
    while channel.wants_write:
        select.select([], [ours], [], 5)
        channel.flush()
    reader.join(5)
    assert received == [({"t": "item"}, big)]
    endpoint.send({"t": "result"})
    select.select([ours], [], [], 5)
    assert channel.receive() == [({"t": "result"}, b"")]
    theirs.close()
    select.select([ours], [], [], 5)
    assert channel.receive() is None
    assert channel.closed
