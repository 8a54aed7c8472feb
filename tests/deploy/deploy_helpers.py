"""Helpers for the deployment tests: a provider that holds the daemon up, and its config.

Imported by name (``tests/deploy`` is on ``sys.path`` under pytest's default import mode).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Dict, Optional

import pytest

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
import os
import time

from stoq import Payload
from stoq.plugins import ProviderPlugin


class HeldProvider(ProviderPlugin):
    def ingest(self, queue):
        count = int(self.config.get("options", "count", fallback="3"))
        trigger = self.config.get("options", "trigger", fallback="")
        while trigger and not os.path.exists(trigger) and not queue.stopping.is_set():
            time.sleep(0.05)  # the test says when to put
        for number in range(count):
            queue.put(Payload(f"payload {number}".encode()))
        queue.stopping.wait()  # stay RUNNING: a daemon that is up, idle, and stoppable
"""


_SLOW_STOQ = """\
[Core]
Name = slowpoke
Module = slowpoke

[Documentation]
Description = takes SECONDS over every payload

[options]
seconds = 3
"""

_SLOW_PY = """\
import time

from stoq import WorkerResponse
from stoq.plugins import WorkerPlugin


class SlowPoke(WorkerPlugin):
    def scan(self, payload, request_meta):
        time.sleep(float(self.config.get("options", "seconds")))
        return WorkerResponse({"slept": True})
"""


def held_config(
    directory: Path, count: int = 3, slow: bool = False, trigger: str = "", **stoqd: str
) -> Path:
    """A stoq.cfg running ``heldprov``: ``count`` payloads (once the file ``trigger``
    exists, if given), hashed (and, with ``slow``, 3 s in ``slowpoke`` each), saved to
    ``results.jsonl``; the provider then stays up until stoqd stops."""
    plugin = directory / "plugins" / "heldprov"
    plugin.mkdir(parents=True)
    options = f"count = {count}\ntrigger = {trigger}"
    (plugin / "heldprov.stoq").write_text(_HELD_STOQ.replace("count = 3", options))
    (plugin / "heldprov.py").write_text(_HELD_PY)
    if slow:
        worker = directory / "plugins" / "slowpoke"
        worker.mkdir()
        (worker / "slowpoke.stoq").write_text(_SLOW_STOQ)
        (worker / "slowpoke.py").write_text(_SLOW_PY)
    settings: Dict[str, str] = {"workers": "1", "control_socket": "run/stoqd.sock", **stoqd}
    lines = [
        "[core]",
        "providers = heldprov",
        "connectors = jsonl",
        "always_dispatch = hash" + (", slowpoke" if slow else ""),
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


# Runs as "PID 1" of a new PID namespace, in a private mount namespace: lays out what the
# image has (/etc/stoqd with the config, /var/lib/stoqd, /run/stoqd), binds the two
# volumes, then execs the given command (the ENTRYPOINT), which thereby stays PID 1.
CONTAINER_SETUP = r"""
set -eu
work=$1 config_dir=$2; shift 2
mkdir -p "$work/etc-upper" "$work/etc-work"
mount -t overlay overlay -o "lowerdir=/etc,upperdir=$work/etc-upper,workdir=$work/etc-work" /etc
mount -t tmpfs tmpfs /var/lib
mount -t tmpfs tmpfs /run
mkdir -p /etc/stoqd /run/stoqd
cp -r "$config_dir/." /etc/stoqd/
for d in incoming done failed results archive; do mkdir -p "/var/lib/stoqd/$d"; done
mount --bind "$work/incoming" /var/lib/stoqd/incoming
mount --bind "$work/results" /var/lib/stoqd/results
exec "$@"
"""


def _can_make_containers() -> Optional[str]:
    """Why namespaces cannot be used here, or None when they can."""
    if not shutil.which("unshare") or not shutil.which("nsenter"):
        return "unshare/nsenter (util-linux) are not installed"
    probe = subprocess.run(
        ["unshare", "--mount", "--pid", "--fork", "--mount-proc", "true"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    if probe.returncode != 0:
        return f"cannot create mount and PID namespaces here (root needed): {probe.stderr.strip()}"
    return None


needs_namespaces = pytest.mark.skipif(
    sys.platform != "linux" or _can_make_containers() is not None,
    reason=str(_can_make_containers() if sys.platform == "linux" else "Linux only"),
)
