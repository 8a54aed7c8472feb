"""Benchmark provider ``memprovider``: ``count`` payloads of ``size`` bytes, then exhausted.

The payloads are built in memory so the benchmark measures stoqd, not a disk or a broker.
Each payload starts with its own sequence number, so every hash in the output differs.
"""

from __future__ import annotations

import os
from configparser import ConfigParser
from typing import Any, Dict, Optional

from stoqd.framework.data import Payload, PayloadMeta
from stoqd.framework.exceptions import StoqPluginException
from stoqd.framework.plugins import ProviderPlugin

_SEQ_BYTES = 8


class MemProvider(ProviderPlugin):
    """Puts ``count`` distinct payloads of ``size`` bytes each, then returns."""

    def __init__(self, config: ConfigParser, plugin_opts: Optional[Dict[str, Any]] = None) -> None:
        super().__init__(config, plugin_opts)
        self.count = self.option("count", 1000, int)
        self.size = self.option("size", 4096, int)
        if self.count < 0:
            raise StoqPluginException(f"plugin {self.plugin_name}: option count must be >= 0")
        if self.size < _SEQ_BYTES:
            raise StoqPluginException(
                f"plugin {self.plugin_name}: option size must be >= {_SEQ_BYTES}"
            )

    def ingest(self, queue: Any) -> None:
        # One random body shared by all payloads; only the leading sequence number
        # changes, so building a payload costs a copy, not a fresh random draw.
        body = os.urandom(self.size - _SEQ_BYTES)
        for seq in range(self.count):
            content = seq.to_bytes(_SEQ_BYTES, "big") + body
            queue.put(Payload(content, PayloadMeta(extra_data={"seq": seq})))
