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

A regular file's descriptor is kept between results: opening, checking and closing it
per result was 3-4% of a worker's time for a 4 KiB payload. Before each write the path is
looked up (``stat``): when it names another file than the one held (renamed or removed
by log rotation, replaced), that one is opened instead, so rotation is followed from the
next result on. A process forked from one holding it opens its own, as the check above
reads the offset where this process's own write ended, which a shared one would not be.
"""

from __future__ import annotations

import os
import stat
import weakref
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
        self._held: Optional[_HeldFile] = None  # the regular file written to last
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
        held = self._held
        if held is not None and not held.still_names(self.output_file):
            held.close()
            held = self._held = None
        identity: Optional[Tuple[int, int]]  # None: not a regular file, not checked
        if held is not None:
            fd, identity = held.fd, held.identity
        else:
            fd, identity = _open_appending(self.output_file)
        regular = identity is not None
        try:
            if _write_all(fd, line) and regular and _follows_part_of_a_line(fd, len(line)):
                _write_all(fd, line)  # after the glued line's newline: on its own
            if self.fsync:
                os.fsync(fd)
        except BaseException:
            # Whatever went wrong (a full disk, an I/O error), the next result opens
            # the file afresh rather than trust this descriptor.
            if held is not None:
                held.close()
                self._held = None
            else:
                os.close(fd)
            raise
        if held is None:
            if identity is not None:
                self._held = _HeldFile(self, fd, identity)
            else:  # a FIFO or device: opened per result, as a reader may come and go
                os.close(fd)


class _HeldFile:
    """The descriptor of the regular file ``output_file`` named when it was opened."""

    def __init__(self, owner: JsonlConnector, fd: int, identity: Tuple[int, int]) -> None:
        self.fd = fd
        self.identity = identity
        self.pid = os.getpid()
        # Closed with its connector (a library user may build many), not at exit only.
        self._closer = weakref.finalize(owner, _close_if_ours, fd, self.pid)

    def still_names(self, path: str) -> bool:
        """Whether ``path`` still names this file, and this process opened it."""
        if self.pid != os.getpid():
            return False
        try:
            info = os.stat(path)
        except OSError:  # removed: opened (created) again
            return False
        return (info.st_dev, info.st_ino) == self.identity

    def close(self) -> None:
        self._closer()


def _close_if_ours(fd: int, pid: int) -> None:
    # A forked child holds a copy of the number; only the process that opened it closes it.
    if os.getpid() == pid:
        os.close(fd)


def _open_appending(path: str) -> Tuple[int, Optional[Tuple[int, int]]]:
    """A descriptor appending to ``path`` and, when it is a regular file it can read,
    that file's identity (device, inode); None for anything else.

    Anything else is reopened write-only: a readable descriptor of a FIFO would count as
    its reader, and the lines would vanish into the pipe when no other reader is there.
    """
    try:
        fd = os.open(path, os.O_RDWR | _OPEN_FLAGS, 0o644)
    except PermissionError:  # a file we may only write to: appended, not checked
        return os.open(path, os.O_WRONLY | _OPEN_FLAGS, 0o644), None
    try:
        info = os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise
    if stat.S_ISREG(info.st_mode):
        return fd, (info.st_dev, info.st_ino)
    os.close(fd)
    return os.open(path, os.O_WRONLY | _OPEN_FLAGS, 0o644), None


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
