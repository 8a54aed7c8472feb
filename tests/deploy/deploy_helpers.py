"""Helpers for the deployment tests: a provider that holds the daemon up, and its config.

Imported by name (``tests/deploy`` is on ``sys.path`` under pytest's default import mode).
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Dict

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"

_HELD_STOQ = """\
[Core]
Name = heldprov
Module = heldprov

[Documentation]
Description = puts COUNT payloads, then holds until stoqd stops

[options]
count = 3
"""

_HELD_PY = """\
from stoq import Payload
from stoq.plugins import ProviderPlugin


class HeldProvider(ProviderPlugin):
    def ingest(self, queue):
        count = int(self.config.get("options", "count", fallback="3"))
        for number in range(count):
            queue.put(Payload(f"payload {number}".encode()))
        queue.stopping.wait()  # stay RUNNING: a daemon that is up, idle, and stoppable
"""


def held_config(directory: Path, **stoqd: str) -> Path:
    """A stoq.cfg running ``heldprov`` (3 payloads, hashed, saved to results.jsonl)."""
    plugin = directory / "plugins" / "heldprov"
    plugin.mkdir(parents=True)
    (plugin / "heldprov.stoq").write_text(_HELD_STOQ)
    (plugin / "heldprov.py").write_text(_HELD_PY)
    settings: Dict[str, str] = {"workers": "1", "control_socket": "run/stoqd.sock", **stoqd}
    lines = [
        "[core]",
        "providers = heldprov",
        "connectors = jsonl",
        "always_dispatch = hash",
        "plugin_dir_list = plugins",
        "log_syntax = json",
        "",
        "[stoqd]",
        *(f"{key} = {value}" for key, value in settings.items()),
        "",
        "[jsonl]",
        "output_file = ${here}/results.jsonl",
        "",
    ]
    path = directory / "stoq.cfg"
    path.write_text("\n".join(lines))
    return path


def free_port() -> int:
    """A loopback TCP port nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
