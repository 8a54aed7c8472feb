"""Frames between supervisor and children: split anywhere, refused when malformed."""

import contextlib
import math
import select
import signal
import socket
import struct
import threading
import time

import pytest

from stoqd.wire import (
    Channel,
    Decoder,
    Endpoint,
    ProtocolError,
    decode_header,
    encode,
    encode_header,
    with_members,
    with_number,
)


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


def test_batched_entries_travel_as_one_frame_ahead_of_what_is_sent_after_them() -> None:
    ours, theirs = socket.socketpair()
    channel, endpoint = Channel(ours), Endpoint(theirs)
    channel.send_in_batch("done", [1, "saved"])
    channel.send_in_batch("done", [2, "failed"])
    assert channel.wants_write  # nothing framed yet, but the loop must flush it
    channel.send({"t": "terminate"})  # never overtakes the outcomes queued before it
    channel.send_in_batch("done", [3, "saved"])
    channel.flush()
    assert [endpoint.receive() for _ in range(3)] == [
        ({"t": "done", "items": [[1, "saved"], [2, "failed"]]}, b""),
        ({"t": "terminate"}, b""),
        ({"t": "done", "items": [[3, "saved"]]}, b""),
    ]
    assert not channel.wants_write


def test_a_channel_tells_when_all_it_holds_is_a_batch_not_yet_framed() -> None:
    ours, theirs = socket.socketpair()
    channel, endpoint = Channel(ours), Endpoint(theirs)
    assert not channel.holds_only_a_batch
    channel.send_in_batch("done", 1)
    assert channel.holds_only_a_batch and channel.wants_write
    channel.send({"t": "credit", "n": 4})  # frames the batch ahead of itself
    assert not channel.holds_only_a_batch
    channel.flush()
    assert [endpoint.receive(), endpoint.receive()] == [
        ({"t": "done", "items": [1]}, b""),
        ({"t": "credit", "n": 4}, b""),
    ]


def test_a_batch_frame_carries_at_most_128_entries() -> None:
    ours, theirs = socket.socketpair()
    channel, endpoint = Channel(ours), Endpoint(theirs)
    for number in range(130):
        channel.send_in_batch("done", number)
    channel.flush()
    first, second = endpoint.receive(), endpoint.receive()
    assert first is not None and first[0]["items"] == list(range(128))
    assert second is not None and second[0]["items"] == [128, 129]


def test_what_a_dead_peer_sent_is_still_read_after_a_send_to_it_fails() -> None:
    # A worker sends a result, then dies; the supervisor, not knowing yet, sends it the
    # next item. The failed send must not drop the result still waiting to be read, or
    # the item it reports saved would be scanned again.
    ours, theirs = socket.socketpair()
    channel, endpoint = Channel(ours), Endpoint(theirs)
    endpoint.send({"t": "result", "seq": 7})
    theirs.close()
    channel.send({"t": "item"}, b"next")
    channel.flush()
    assert not channel.closed and not channel.wants_write and not channel.reachable
    channel.send({"t": "item"}, b"one more")  # dropped: the peer is gone
    assert not channel.wants_write
    assert channel.receive() == [({"t": "result", "seq": 7}, b"")]
    assert channel.receive() is None
    assert channel.closed


def test_a_forwarded_header_gets_members_appended_and_they_win() -> None:
    raw = encode_header({"t": "item", "seq": 99, "meta": {"x": [1]}})
    assert decode_header(with_number(raw, "seq", 5)) == {"t": "item", "seq": 5, "meta": {"x": [1]}}
    assert decode_header(with_members(b"{ }", {"id": 3, "cb": True})) == {"id": 3, "cb": True}


def test_feed_frames_gives_each_header_as_it_arrived() -> None:
    [(header, raw, body)] = Decoder().feed_frames(encode({"t": "item", "id": 1}, b"abc"))
    assert (header, raw, body) == ({"t": "item", "id": 1}, b'{"t":"item","id":1}', b"abc")


def test_a_header_with_bytes_after_its_object_is_refused() -> None:
    with pytest.raises(ProtocolError, match="bad frame header"):
        Decoder().feed(struct.pack("!II", 4, 0) + b"{}{}")


def test_a_header_arrives_exactly_as_it_left_even_where_orjson_cannot_encode_it() -> None:
    # orjson encodes and decodes headers, but an integer beyond 64 bits is encoded by the
    # json module (with NaN as NaN) and decoded by it too, so it stays an integer.
    header = {"t": "item", "meta": {"extra_data": {"big": 2**70 + 1, "small": -1, "é": "ü"}}}
    assert decode_header(encode_header(header)) == header
    odd = decode_header(encode_header({"big": -(2**64), "nan": float("nan")}))
    assert odd["big"] == -(2**64) and math.isnan(odd["nan"])
    assert decode_header(b'{"id":18446744073709551615,"n":1e400}') == {
        "id": 2**64 - 1,
        "n": float("inf"),
    }
    with pytest.raises(TypeError):
        encode_header({"t": "item", "body": b"bytes are not JSON"})


def test_a_header_nested_too_deep_is_refused_not_raised() -> None:
    with pytest.raises(ProtocolError, match="bad frame header"):
        decode_header(b"[" * 100_000 + b"]" * 100_000)


class _Interrupted(Exception):
    pass


def test_after_a_send_cut_short_nothing_more_is_written() -> None:
    # A signal's exception in the middle of sendall leaves part of a frame written; a frame
    # sent after it would be read as the rest of that one. Nothing more goes out, and the
    # peer reads the end of the stream.
    ours, theirs = socket.socketpair()
    endpoint = Endpoint(ours)

    def interrupt(signum: int, frame: object) -> None:
        raise _Interrupted()

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        with pytest.raises(_Interrupted):
            endpoint.send_raw(b'{"t":"item"}', b"x" * (8 << 20))  # far beyond the buffers
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    received = bytearray()
    ended = threading.Event()

    def read_to_the_end() -> None:
        theirs.settimeout(10)
        with contextlib.suppress(TimeoutError):
            while chunk := theirs.recv(1 << 20):
                received.extend(chunk)
            ended.set()

    reader = threading.Thread(target=read_to_the_end, daemon=True)
    reader.start()
    endpoint.send({"t": "stats"})  # dropped
    reader.join(timeout=30)
    assert ended.is_set(), "the stream did not end"
    assert 0 < len(received) < (8 << 20)
    assert Decoder().feed(bytes(received)) == []  # the cut frame, and nothing after it
    theirs.close()
    ours.close()


def _is_item(header: object) -> bool:
    return isinstance(header, dict) and header.get("t") == "item"


def _take_waiting(endpoint: Endpoint) -> list:
    answers: list = []
    endpoint.take_waiting(_is_item, lambda _, taken: answers.append(taken))
    assert len(answers) == 1  # answered once, whatever was there
    return answers[0]


def test_take_waiting_takes_the_arrived_items_and_leaves_the_rest_in_order() -> None:
    ours, theirs = socket.socketpair()
    endpoint = Endpoint(ours)
    third = encode({"t": "item", "seq": 3}, b"c" * 100)
    theirs.sendall(
        encode({"t": "item", "seq": 1}, b"a")
        + encode({"t": "exit"})
        + encode({"t": "item", "seq": 2}, b"b")
        + third[:20]  # a frame not wholly arrived stays
    )
    taken = []
    for _ in range(100):  # the bytes may take a moment to be readable
        taken += _take_waiting(endpoint)
        if len(taken) == 2:
            break
        time.sleep(0.01)
    assert taken == [({"t": "item", "seq": 1}, b"a"), ({"t": "item", "seq": 2}, b"b")]
    theirs.sendall(third[20:])
    assert endpoint.receive() == ({"t": "exit"}, b"")
    assert endpoint.receive() == ({"t": "item", "seq": 3}, b"c" * 100)
    theirs.close()
    assert _take_waiting(endpoint) == []  # the end of the stream is not taken:
    assert endpoint.receive() is None  # receive still finds it
    ours.close()


def test_take_waiting_takes_nothing_while_receive_is_taking_the_next_frame() -> None:
    # The worker's main thread in receive is between scans: what has arrived is its own.
    ours, theirs = socket.socketpair()
    endpoint = Endpoint(ours)
    theirs.sendall(encode({"t": "item", "seq": 1}, b"a"))
    with endpoint._receive_lock:  # as receive holds it
        assert _take_waiting(endpoint) == []
    assert endpoint.receive() == ({"t": "item", "seq": 1}, b"a")
    theirs.close()
    ours.close()


def test_the_answer_goes_out_before_receive_can_go_on() -> None:
    # Otherwise a worker could receive the exit frame behind the items it gave back, and
    # end before saying so: the supervisor would count them as lost with a dead worker.
    ours, theirs = socket.socketpair()
    endpoint = Endpoint(ours)
    theirs.sendall(encode({"t": "item", "seq": 1}, b"a") + encode({"t": "exit"}))
    events: list = []
    receiver = threading.Thread(target=lambda: events.append(endpoint.receive()))

    def answer(_: Endpoint, taken: list) -> None:
        receiver.start()
        receiver.join(timeout=0.3)  # it cannot take the exit frame yet
        events.append(taken)

    endpoint.take_waiting(_is_item, answer)  # a socketpair's bytes are readable at once
    receiver.join(timeout=10)
    assert events == [[({"t": "item", "seq": 1}, b"a")], ({"t": "exit"}, b"")]
    theirs.close()
    ours.close()
