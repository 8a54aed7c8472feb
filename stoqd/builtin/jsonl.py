"""Connector ``jsonl``: one result per line appended to ``output_file``.

Several worker processes append to the same file at once, so each line must land whole.
The file is opened with ``O_APPEND`` and each line (the JSON and its newline) is handed to
the kernel in a single ``write`` call. On a local filesystem (ext4, xfs, btrfs, tmpfs)
Linux holds the file's lock for the whole of one ``write`` and moves to the end of the
file under that lock, so two appending writers never interleave inside a line, whatever
its size. Network filesystems (NFS) do not give that guarantee. A short write happens
only when something has gone wrong (disk full, file size limit); the rest is then written
in a loop and the next call usually raises, which the daemon reports as "not saved".
"""

from __future__ import annotations

import os
from configparser import ConfigParser
from typing import Any, Dict, Optional

from stoqd.framework.data import StoqResponse
from stoqd.framework.exceptions import StoqPluginException
from stoqd.framework.helpers import compact_json
from stoqd.framework.plugins import ConnectorPlugin

_OPEN_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC


class JsonlConnector(ConnectorPlugin):
    """Appends ``helpers.compact_json(response)`` plus a newline per result."""

    def __init__(self, config: ConfigParser, plugin_opts: Optional[Dict[str, Any]] = None) -> None:
        super().__init__(config, plugin_opts)
        output_file = self.option("output_file", "", str).strip()
        if not output_file:
            raise StoqPluginException(f"plugin {self.plugin_name}: option output_file is required")
        self.output_file = os.path.abspath(os.path.expanduser(output_file))
        self.fsync = self.option("fsync", False, bool)
        if os.path.isdir(self.output_file):
            raise StoqPluginException(
                f"plugin {self.plugin_name}: option output_file {self.output_file} is a directory"
            )
        parent = os.path.dirname(self.output_file)
        try:
            # exist_ok: many worker processes build this plugin at the same moment.
            os.makedirs(parent, exist_ok=True)
        except OSError as exc:
            raise StoqPluginException(
                f"plugin {self.plugin_name}: option output_file: cannot create directory "
                f"{parent}: {exc.strerror}"
            ) from None

    def save(self, response: StoqResponse) -> None:
        line = compact_json(response, newline=True)
        # Opened per result rather than once, so a rotated (renamed) file is followed
        # and no descriptor is shared across a fork.
        fd = os.open(self.output_file, _OPEN_FLAGS, 0o644)
        try:
            _write_all(fd, line)
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    """Write ``data`` with one ``os.write`` call; loop only if the kernel wrote less."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written == 0:  # never expected from a regular file; avoid spinning forever
            raise OSError(f"write to fd {fd} made no progress")
        view = view[written:]
