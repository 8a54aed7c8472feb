"""The test helpers that read files a running daemon is still appending to."""

from __future__ import annotations

from pathlib import Path

import pytest

from stoqd.testing import complete_lines, read_jsonl


def test_a_line_still_being_written_is_not_read(tmp_path: Path) -> None:
    # What a reader saw while the jsonl connector's write of the third line was under way.
    path = tmp_path / "results.jsonl"
    path.write_bytes(b'{"n": 1}\n\n{"n": 2}\n{"n": 3, "resu')
    assert complete_lines(path) == ['{"n": 1}', "", '{"n": 2}']
    assert read_jsonl(path) == [{"n": 1}, {"n": 2}]


def test_a_line_is_ended_by_a_newline_only(tmp_path: Path) -> None:
    # An outcome's error text may hold a carriage return; it stays inside its line.
    path = tmp_path / "outcomes"
    path.write_bytes(b"id-1 failed disk\rfull\nid-2 sav")
    assert complete_lines(path) == ["id-1 failed disk\rfull"]


def test_a_missing_file_or_one_without_a_whole_line_has_none(tmp_path: Path) -> None:
    assert read_jsonl(tmp_path / "absent.jsonl") == []
    (tmp_path / "half.jsonl").write_bytes(b'{"n"')
    assert complete_lines(tmp_path / "half.jsonl") == []


def test_a_line_glued_to_a_killed_writers_part_is_skipped_only_before_its_copy(
    tmp_path: Path,
) -> None:
    path = tmp_path / "results.jsonl"
    path.write_text('{"a": 1}\n{"ti{"b": 2}\n{"b": 2}\n')  # what jsonl writes after a kill
    assert read_jsonl(path) == [{"a": 1}, {"b": 2}]
    path.write_text('{"a": 1}\n{"ti\n{"b": 2}\n')  # not JSON, and no copy after it
    with pytest.raises(ValueError):
        read_jsonl(path)
