"""Connector ``stdout``: each result as one compact JSON line on standard output."""

from __future__ import annotations

import sys

from stoqd.framework.data import StoqResponse
from stoqd.framework.helpers import dumps
from stoqd.framework.plugins import ConnectorPlugin


class StdoutConnector(ConnectorPlugin):
    """One line per result, flushed at once so a pipe reader sees it without delay."""

    def save(self, response: StoqResponse) -> None:
        # Looked up on every call, not bound at load, so a redirected sys.stdout is honoured.
        stream = sys.stdout
        stream.write(dumps(response, compactly=True) + "\n")
        stream.flush()
