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
next page) leaves part of a line without its newline, and the next line appended is glued
to it. So after each write the byte before the new line is read: when it is not a
newline, the line is written again, on a line of its own. The glued line stays, as a
line that is not JSON (readers that stop at one, such as ``jq``, can skip it: ``jq -R
'fromjson? // empty'``); the killed writer's result was never reported saved, so its
item is scanned again. Nothing written is ever changed or lost, no lock is taken, and a
live writer cannot be mistaken for a killed one: its ``write`` ended before this one began.
Only regular files are checked; a FIFO or a device is opened write-only, as before.
"""

from __future__ import annotations

import os
import stat
from configparser import ConfigParser
from typing import Any, Dict, Optional, Tuple

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
        fd, regular = _open_appending(self.output_file)
        try:
            if _write_all(fd, line) and regular and _follows_part_of_a_line(fd, len(line)):
                _write_all(fd, line)  # after the glued line's newline: on its own
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)


def _open_appending(path: str) -> Tuple[int, bool]:
    """A descriptor appending to ``path``, and whether it is a regular file it can read.

    Anything else is reopened write-only: a readable descriptor of a FIFO would count as
    its reader, and the lines would vanish into the pipe when no other reader is there.
    """
    try:
        fd = os.open(path, os.O_RDWR | _OPEN_FLAGS, 0o644)
    except PermissionError:  # a file we may only write to: appended, not checked
        return os.open(path, os.O_WRONLY | _OPEN_FLAGS, 0o644), False
    try:
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
    except BaseException:
        os.close(fd)
        raise
    if regular:
        return fd, True
    os.close(fd)
    return os.open(path, os.O_WRONLY | _OPEN_FLAGS, 0o644), False


def _follows_part_of_a_line(fd: int, size: int) -> bool:
    """Whether the ``size`` bytes ``fd`` has just appended follow a byte that is not a
    newline (a file truncated meanwhile reads as empty there: no)."""
    try:
        start = os.lseek(fd, 0, os.SEEK_CUR) - size  # O_APPEND: where the line began
        return start > 0 and os.pread(fd, 1, start - 1) not in (b"\n", b"")
    except OSError:
        return False


def _write_all(fd: int, data: bytes) -> bool:
    """Write ``data`` with one ``os.write`` call; loop only if the kernel wrote less.
    True if one call took it all (other writers' lines may lie between the pieces)."""
    view = memoryview(data)
    view = view[os.write(fd, view) :]
    whole = not view
    while view:
        written = os.write(fd, view)
        if written == 0:  # never expected from a regular file; avoid spinning forever
            raise OSError(f"write to fd {fd} made no progress")
        view = view[written:]
    return whole
