"""Connector ``stdout``: each result as one compact JSON line on standard output.

Meant for ``stoq scan`` and pipelines with one writer. Several daemon worker processes
sharing one stdout pipe may interleave lines longer than the pipe's atomic size (4 KiB on
Linux); for concurrent writers use the ``jsonl`` connector, which never does.
"""

from __future__ import annotations

import sys

from stoqd.framework.data import StoqResponse
from stoqd.framework.helpers import compact_json
from stoqd.framework.plugins import ConnectorPlugin


class StdoutConnector(ConnectorPlugin):
    """One line per result, flushed at once so a pipe reader sees it without delay."""

    def save(self, response: StoqResponse) -> None:
        # Looked up on every call, not bound at load, so a redirected sys.stdout is honoured.
        stream = sys.stdout
        line = compact_json(response, newline=True)
        binary = getattr(stream, "buffer", None)
        if binary is None:  # a text-only stream (a StringIO): it takes str
            stream.write(line.decode("utf-8"))
            stream.flush()
            return
        # UTF-8 bytes, as JSON is exchanged, whatever the locale's encoding of the text
        # layer (non-ASCII is written as it is, not escaped). Its buffered text first.
        stream.flush()
        binary.write(line)
        binary.flush()
