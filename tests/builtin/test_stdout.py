"""The stdout connector: one JSON line per result, readable by a pipe at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from stoq import StoqResponse
from stoq.data_classes import RequestMeta, new_errors

SCRIPT = """
from stoq import Stoq
stoq = Stoq(always_dispatch=["hash"], connectors=["stdout"])
stoq.scan(b"first")
stoq.scan(b"second")
"""


def test_each_result_is_one_json_line_on_stdout():
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True, timeout=60
    )
    lines = done.stdout.splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["results"][0]["size"] == len(b"first")
    assert second["results"][0]["size"] == len(b"second")
    assert first["scan_id"] != second["scan_id"]


def test_save_writes_compact_json(load, capsys):
    response = StoqResponse(results=[], request_meta=RequestMeta(), errors=new_errors())
    load("stdout").save(response)
    out = capsys.readouterr().out
    assert out.endswith("\n") and out.count("\n") == 1
    assert ", " not in out and ": " not in out
    assert json.loads(out)["scan_id"] == response.scan_id


def test_non_ascii_is_written_as_utf8_even_where_stdout_is_ascii():
    script = (
        "from stoq import RequestMeta, Stoq\n"
        "Stoq(connectors=['stdout']).scan(b'x', request_meta=RequestMeta(source='café'))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, check=True, timeout=60,
        env={**os.environ, "PYTHONIOENCODING": "ascii"},
    )  # fmt: skip
    assert json.loads(done.stdout.decode("utf-8"))["request_meta"]["source"] == "café"
