"""Benchmark provider: puts nothing and never returns, like a source with no traffic.

Several ``.stoq`` files in this directory name it under different plugin names, so one
daemon can run several idle providers at once (the memory benchmark runs five).
"""

from __future__ import annotations

from typing import Any

from stoqd.framework.plugins import ProviderPlugin


class IdleProvider(ProviderPlugin):
    """Waits until the daemon stops; ``ingest`` returning then is not an exhaustion."""

    def ingest(self, queue: Any) -> None:
        while not queue.stopping.wait(1.0):
            pass
