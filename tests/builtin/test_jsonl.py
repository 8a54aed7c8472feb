"""The jsonl connector: whole lines even with several writer processes on one file."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest

from stoq import RequestMeta, Stoq, StoqPluginException, StoqResponse
from stoq.data_classes import new_errors
from stoqd.framework.loader import PluginRegistry

WRITERS = 4
LINES = 1000
FILLER = 100 * 1024  # bytes of padding per line: far above any pipe or page size


def _response(writer: int, seq: int) -> StoqResponse:
    # The filler repeats the line's own identity, so a line spliced from two writes
    # would not only fail to parse but also disagree with itself.
    tag = f"{writer}:{seq};"
    filler = tag * (FILLER // len(tag))
    meta = RequestMeta(extra_data={"writer": writer, "seq": seq, "filler": filler})
    return StoqResponse(results=[], request_meta=meta, errors=new_errors())


def _write_lines(output_file: str, writer: int) -> None:
    """One writer process: its own plugin instance, built as a daemon worker builds it."""
    connector = PluginRegistry().load("jsonl", {"output_file": output_file})
    for seq in range(LINES):
        connector.save(_response(writer, seq))  # type: ignore[attr-defined]


def test_concurrent_writer_processes_never_interleave_lines(tmp_path):
    output = tmp_path / "deep" / "er" / "results.jsonl"
    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=_write_lines, args=(str(output), n)) for n in range(WRITERS)]
    for process in writers:
        process.start()
    for process in writers:
        process.join(timeout=240)
    assert [process.exitcode for process in writers] == [0] * WRITERS

    seen: dict[int, list[int]] = {n: [] for n in range(WRITERS)}
    with open(output, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            assert raw.endswith(b"\n"), f"line {number} is cut short"
            line = json.loads(raw)
            extra = line["request_meta"]["extra_data"]
            tag = f"{extra['writer']}:{extra['seq']};"
            assert extra["filler"] == tag * (FILLER // len(tag)), f"line {number} is mixed"
            seen[extra["writer"]].append(extra["seq"])
    # Each writer's lines are all there, once each, in the order that writer wrote them.
    assert seen == {n: list(range(LINES)) for n in range(WRITERS)}


def test_results_are_appended_through_stoq(tmp_path):
    output = tmp_path / "results.jsonl"
    output.write_text('{"earlier": "line"}\n')
    stoq = Stoq(
        always_dispatch=["hash"],
        connectors=["jsonl"],
        plugin_opts={"jsonl": {"output_file": str(output)}},
    )
    first = stoq.scan(b"one")
    second = stoq.scan(b"two")
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert [line.get("scan_id") for line in lines] == [None, first.scan_id, second.scan_id]
    assert lines[1] == json.loads(str(first))


def test_output_file_is_required(load):
    with pytest.raises(StoqPluginException) as info:
        load("jsonl")
    assert str(info.value) == "plugin jsonl: option output_file is required"


def test_unusable_output_directory_is_rejected_at_load(load, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StoqPluginException) as info:
        load("jsonl", output_file=str(blocker / "results.jsonl"))
    assert str(info.value) == (
        f"plugin jsonl: option output_file: cannot create directory {blocker}: File exists"
    )


def test_a_full_disk_is_reported_as_not_saved():
    # /dev/full answers every write with ENOSPC, as a full filesystem does.
    stoq = Stoq(connectors=["jsonl"], plugin_opts={"jsonl": {"output_file": "/dev/full"}})
    response = stoq.scan(b"payload")
    assert response.errors["stoq"] == [
        "connector jsonl failed: OSError: [Errno 28] No space left on device"
    ]


def test_a_failed_write_raises_from_save(load, tmp_path):
    connector = load("jsonl", output_file=str(tmp_path / "results.jsonl"))
    os.mkdir(tmp_path / "results.jsonl")  # the path turned into a directory after load
    response = StoqResponse(results=[], request_meta=RequestMeta(), errors=new_errors())
    with pytest.raises(IsADirectoryError):
        connector.save(response)


def test_fsync_option_still_writes_the_line(load, tmp_path):
    output = tmp_path / "synced.jsonl"
    connector = load("jsonl", output_file=str(output), fsync="true")
    assert connector.fsync is True
    response = StoqResponse(results=[], request_meta=RequestMeta(), errors=new_errors())
    connector.save(response)
    assert json.loads(Path(output).read_text())["scan_id"] == response.scan_id


def test_a_line_glued_to_one_cut_short_by_a_killed_writer_is_written_again(load, tmp_path):
    output = tmp_path / "results.jsonl"
    # What a writer SIGKILLed in the middle of its write leaves: a line without its end.
    cut = b'{"time":"2026-11-25T10:57:15.32","resu'
    output.write_bytes(b'{"scan_id":"whole"}\n' + cut)
    connector = load("jsonl", output_file=str(output))
    response = StoqResponse(results=[], request_meta=RequestMeta(), errors=new_errors())
    connector.save(response)
    first, glued, again, rest = output.read_bytes().split(b"\n")
    assert first == b'{"scan_id":"whole"}'  # nothing written is changed
    assert glued.startswith(cut + b'{"time":')
    assert glued[len(cut) :] == again
    assert json.loads(again)["scan_id"] == response.scan_id
    assert rest == b""


def test_lines_that_follow_whole_lines_are_written_once(load, tmp_path):
    output = tmp_path / "results.jsonl"
    connector = load("jsonl", output_file=str(output))
    responses = [
        StoqResponse(results=[], request_meta=RequestMeta(), errors=new_errors()) for _ in range(3)
    ]
    for response in responses:
        connector.save(response)
    lines = output.read_bytes().split(b"\n")
    assert [json.loads(line)["scan_id"] for line in lines[:-1]] == [r.scan_id for r in responses]


def test_a_fifo_is_written_to_as_before_not_read(load, tmp_path):
    fifo = tmp_path / "results.fifo"
    os.mkfifo(fifo)
    connector = load("jsonl", output_file=str(fifo))
    response = StoqResponse(results=[], request_meta=RequestMeta(), errors=new_errors())
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a reader, as a pipeline has
    try:
        connector.save(response)
        line = os.read(reader, 1 << 16)
    finally:
        os.close(reader)
    assert json.loads(line)["scan_id"] == response.scan_id


def _write_big_lines_forever(output_file: str) -> None:
    connector = PluginRegistry().load("jsonl", {"output_file": output_file})
    meta = RequestMeta(extra_data={"filler": "x" * (1 << 20)})  # a write of many pages
    response = StoqResponse(results=[], request_meta=meta, errors=new_errors())
    while True:
        connector.save(response)  # type: ignore[attr-defined]


def _ends_mid_line(path: Path) -> bool:
    if not path.exists():
        return False  # the writer was killed before its first line
    with open(path, "rb") as handle:
        size = handle.seek(0, os.SEEK_END)
        return size > 0 and os.pread(handle.fileno(), 1, size - 1) != b"\n"


def test_writers_killed_mid_write_leave_no_line_glued_to_the_next(load, tmp_path):
    output = tmp_path / "results.jsonl"
    survivor = load("jsonl", output_file=str(output))
    context = multiprocessing.get_context("spawn")
    cut_short, kills = 0, 0
    # Killed at varying moments until three writes were cut short (most kills land in
    # one): each leaves part of a line, which the survivor's next line must not join.
    while cut_short < 3 and kills < 60:
        writer = context.Process(target=_write_big_lines_forever, args=(str(output),))
        writer.start()
        time.sleep(0.3 + kills * 0.013 % 0.1)
        os.kill(writer.pid, signal.SIGKILL)
        writer.join()
        kills += 1
        cut_short += _ends_mid_line(output)
        survivor.save(StoqResponse(results=[], request_meta=RequestMeta(), errors=new_errors()))
    assert cut_short >= 3, f"{kills} kills cut no write short"
    lines = output.read_bytes().split(b"\n")
    assert lines[-1] == b""
    whole, parts = [], []
    for line in lines[:-1]:
        try:
            whole.append(json.loads(line))
        except ValueError:
            parts.append(line)
    # Each part is glued to the survivor's next line, which then stands again on its own.
    assert len(parts) == cut_short
    assert all(part.startswith(b'{"time":') for part in parts)
    assert sum(1 for line in whole if "filler" not in line["request_meta"]["extra_data"]) == kills


def _empty_response() -> StoqResponse:
    return StoqResponse(results=[], request_meta=RequestMeta(), errors=new_errors())


def test_a_file_renamed_by_log_rotation_is_followed_by_the_next_result(load, tmp_path):
    output = tmp_path / "results.jsonl"
    connector = load("jsonl", output_file=str(output))
    before, after = _empty_response(), _empty_response()
    connector.save(before)
    output.rename(tmp_path / "results.jsonl.1")  # what logrotate does, without copytruncate
    connector.save(after)
    assert json.loads((tmp_path / "results.jsonl.1").read_text())["scan_id"] == before.scan_id
    assert json.loads(output.read_text())["scan_id"] == after.scan_id


def test_a_removed_file_is_created_again_by_the_next_result(load, tmp_path):
    output = tmp_path / "results.jsonl"
    connector = load("jsonl", output_file=str(output))
    connector.save(_empty_response())
    output.unlink()
    response = _empty_response()
    connector.save(response)
    assert json.loads(output.read_text())["scan_id"] == response.scan_id
