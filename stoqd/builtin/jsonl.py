"""Connector ``jsonl``: one result per line appended to ``output_file``.

Several worker processes append to the same file at once, so each line must land whole.
The file is opened with ``O_APPEND`` and each line (the JSON and its newline) is handed to
the kernel in a single ``write`` call. On a local filesystem (ext4, xfs, btrfs, tmpfs)
Linux holds the file's lock for the whole of one ``write`` and moves to the end of the
file under that lock, so two appending writers never interleave inside a line, whatever
its size. Network filesystems (NFS) do not give that guarantee. A short write happens
only when something has gone wrong (disk full, file size limit); the rest is then written
in a loop and the next call usually raises, which the daemon reports as "not saved".

A writer killed in the middle of its ``write`` (SIGKILL: the kernel stops copying at the
next page) leaves the start of a line without its newline, and the next line appended
would be glued to it. So after each write the byte before the new line is checked; a
fragment found there is overwritten with spaces (a blank line, which JSON readers skip),
and the new line stands on its own. The fragment's result was never reported saved, so
its item is scanned again: nothing is lost.
"""

from __future__ import annotations

import json
import os
from configparser import ConfigParser
from typing import Any, Dict, Optional

from stoqd.framework.data import StoqResponse
from stoqd.framework.exceptions import StoqPluginException
from stoqd.framework.helpers import compact_json
from stoqd.framework.plugins import ConnectorPlugin

_OPEN_FLAGS = os.O_APPEND | os.O_CREAT | os.O_CLOEXEC


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
        try:
            # Readable too, to check what precedes the line (_blank_fragment_before).
            fd = os.open(self.output_file, os.O_RDWR | _OPEN_FLAGS, 0o644)
        except PermissionError:  # a file we may only write to: appended, not checked
            fd = os.open(self.output_file, os.O_WRONLY | _OPEN_FLAGS, 0o644)
        try:
            _write_all(fd, line)
            _blank_fragment_before(fd, len(line))
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


def _blank_fragment_before(fd: int, size: int) -> None:
    """Blank a line cut short just before the ``size`` bytes ``fd`` last appended.

    A fragment is a line another writer began and never finished (see the module
    docstring); text that parses as JSON is somebody's line without its newline, and is
    left as it is. Costs two system calls when there is nothing to mend.
    """
    try:
        start = os.lseek(fd, 0, os.SEEK_CUR) - size  # where this line began (O_APPEND)
        if start <= 0 or os.pread(fd, 1, start - 1) == b"\n":
            return
        fragment_start = _line_start(fd, start)
        fragment = os.pread(fd, start - fragment_start, fragment_start)
    except OSError:  # not a regular file (a pipe, a device), or not readable: left
        return
    try:
        json.loads(fragment)
        return
    except ValueError:
        pass
    # Written through a descriptor of its own: on Linux a pwrite to an O_APPEND one
    # appends, whatever the offset. /proc/self/fd reaches the same file even if the path
    # has been renamed or replaced since.
    repair = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.pwrite(repair, b" " * (len(fragment) - 1) + b"\n", fragment_start)
    finally:
        os.close(repair)


def _line_start(fd: int, end: int) -> int:
    """The offset just after the last newline before ``end`` (0 if there is none)."""
    position = end
    while position > 0:
        step = min(position, 64 << 10)
        chunk = os.pread(fd, step, position - step)
        newline = chunk.rfind(b"\n")
        if newline >= 0:
            return position - step + newline + 1
        position -= step
    return 0
