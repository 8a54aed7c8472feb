"""What dirmon and dirscan share about files: options, which files to take, when a file is
complete, and walking a tree without holding it in memory.

A file is taken only when it is a regular file inside ``source_dir`` that passes the
include/exclude patterns and that nobody has open for writing. "Nobody writes it" is
checked with a Linux read lease (``F_SETLEASE``/``F_RDLCK``), which the kernel refuses
while any process holds the file open for writing; where leases are not permitted (not
the file's owner and no CAP_LEASE), a file found without a close event must have been
left unchanged for ``settle`` seconds instead.
"""

from __future__ import annotations

import errno
import fcntl
import fnmatch
import os
import re
import signal
import stat
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from stoqd.builtin._options import positive_int
from stoqd.builtin._options import size as size_option
from stoqd.framework.exceptions import StoqPluginException
from stoqd.framework.plugins import ProviderPlugin

Identity = Tuple[int, int, int]
"""(inode, size, mtime in ns): a file's content is taken as unchanged while these are."""

ACTIONS = ("keep", "delete", "move")
SIDECAR_MODES = ("attach", "scan", "skip")
DEFAULT_EXCLUDE = [".*", "*.tmp", "*.part", "*~", "*.swp"]
DEFAULT_EXCLUDE_DIRS = [".*", "tmp"]

# Suricata file-store v2: filestore/ab/<sha256> and its fileinfo sidecar
# filestore/ab/<sha256>.<timestamp>.<id>.json written after the file is in place.
_SHA256_NAME = re.compile(r"[0-9a-f]{64}")
_SIDECAR_NAME = re.compile(r"([0-9a-f]{64})\.[0-9]+(?:\.[0-9]+)*\.json")


@dataclass
class Settings:
    """The options of dirmon and dirscan, checked once when the plugin is built."""

    name: str
    source_dir: str
    recursive: bool
    include: List[str]
    exclude: List[str]
    exclude_dirs: List[str]
    max_size: int
    skip_empty: bool
    action: str
    done_dir: Optional[str]
    failed_dir: Optional[str]
    state_dir: str
    max_claims: int
    sidecars: str
    sidecar_wait: float
    settle: float

    @classmethod
    def from_plugin(cls, plugin: ProviderPlugin) -> Settings:
        """Read and check every shared option of ``plugin``; bad ones raise with their name."""
        name = plugin.plugin_name
        source = plugin.option("source_dir", "", str).strip()
        if not source:
            raise StoqPluginException(f"plugin {name}: option source_dir is required")
        source_dir = os.path.realpath(os.path.expanduser(source))
        if not os.path.isdir(source_dir):
            raise StoqPluginException(
                f"plugin {name}: option source_dir: {source_dir} is not a directory"
            )
        action = plugin.option("action", "keep", str).strip().lower()
        if action not in ACTIONS:
            raise StoqPluginException(
                f"plugin {name}: option action={action!r} must be keep, delete or move"
            )
        sidecars = plugin.option("suricata_sidecars", "attach", str).strip().lower()
        if sidecars not in SIDECAR_MODES:
            raise StoqPluginException(
                f"plugin {name}: option suricata_sidecars={sidecars!r} must be attach, scan or skip"
            )
        done_dir = _directory(plugin, "done_dir")
        if action == "move" and done_dir is None:
            raise StoqPluginException(f"plugin {name}: option done_dir is required by action=move")
        for option, path in (("done_dir", done_dir), ("failed_dir", _peek(plugin, "failed_dir"))):
            if path is not None and path == source_dir:
                raise StoqPluginException(
                    f"plugin {name}: option {option} must not be source_dir itself"
                )
        state_dir = _directory(plugin, "state_dir") or _default_state_dir(plugin, source_dir)
        settings = cls(
            name=name,
            source_dir=source_dir,
            recursive=plugin.option("recursive", True, bool),
            include=plugin.option("include", ["*"], list),
            exclude=plugin.option("exclude", DEFAULT_EXCLUDE, list),
            exclude_dirs=plugin.option("exclude_dirs", DEFAULT_EXCLUDE_DIRS, list),
            max_size=plugin.option("max_size", 0, size_option),
            skip_empty=plugin.option("skip_empty", True, bool),
            action=action,
            done_dir=done_dir,
            failed_dir=_directory(plugin, "failed_dir"),
            state_dir=state_dir,
            max_claims=plugin.option("max_claims", 3, positive_int),
            sidecars=sidecars,
            sidecar_wait=plugin.option("sidecar_wait", 2.0, seconds),
            settle=plugin.option("settle", 1.0, seconds),
        )
        return settings


def seconds(value: Any) -> float:
    """A number of seconds, 0 or more (an option converter)."""
    number = float(value)
    if number < 0:
        raise ValueError("must be 0 or more")
    return number


def _peek(plugin: ProviderPlugin, option: str) -> Optional[str]:
    value = plugin.option(option, "", str).strip()
    return os.path.realpath(os.path.expanduser(value)) if value else None


def _directory(plugin: ProviderPlugin, option: str) -> Optional[str]:
    """An optional directory option, created if missing; None when empty."""
    path = _peek(plugin, option)
    if path is None:
        return None
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise StoqPluginException(
            f"plugin {plugin.plugin_name}: option {option}: cannot create directory {path}: "
            f"{exc.strerror}"
        ) from None
    return path


def _default_state_dir(plugin: ProviderPlugin, source_dir: str) -> str:
    # Inside source_dir (a dot directory, so never scanned): the one place we know is
    # ours and writable when actions move or delete files anyway.
    path = os.path.join(source_dir, ".stoqd")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise StoqPluginException(
            f"plugin {plugin.plugin_name}: option state_dir: cannot create {path} "
            f"({exc.strerror}); set state_dir to a writable directory"
        ) from None
    return path


# -- selection ---------------------------------------------------------------------------


class Selector:
    """Include/exclude patterns, and the directories stoqd itself writes to."""

    def __init__(self, settings: Settings) -> None:
        self.root = settings.source_dir
        self._include = _any_of(settings.include)
        self._exclude = _any_of(settings.exclude)
        self._exclude_dirs = _any_of(settings.exclude_dirs)
        own = (settings.done_dir, settings.failed_dir, settings.state_dir)
        self.own_dirs = {p for p in own if p and _inside(p, self.root)}
        self.sidecars = settings.sidecars

    def relative(self, path: str) -> Optional[str]:
        """``path`` relative to the root, or None when it is not strictly inside."""
        if not path.startswith(self.root + os.sep):
            return None
        return path[len(self.root) + 1 :]

    def dir_wanted(self, path: str) -> bool:
        """Whether the walk descends into directory ``path``."""
        if path in self.own_dirs:
            return False
        return not self._exclude_dirs(os.path.basename(path))

    def wanted(self, rel: str) -> bool:
        """Whether the file at ``rel`` (relative to the root) passes every filter."""
        parts = rel.split(os.sep)
        name = parts[-1]
        for index in range(len(parts) - 1):
            if self._exclude_dirs(parts[index]):
                return False
            if self.own_dirs and os.path.join(self.root, *parts[: index + 1]) in self.own_dirs:
                return False
        if self.sidecars == "skip" and is_sidecar(name):
            return False
        return bool(self._include(name)) and not self._exclude(name)


def _any_of(patterns: List[str]) -> Callable[[str], Any]:
    """One compiled matcher for shell patterns (fnmatch's case-sensitive rules)."""
    if not patterns:
        return lambda name: None
    return re.compile("|".join(fnmatch.translate(p) for p in patterns)).match


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root + os.sep)


def is_sidecar(name: str) -> bool:
    """A Suricata fileinfo sidecar: ``<sha256>.<timestamp>.<id>.json``."""
    return _SIDECAR_NAME.fullmatch(name) is not None


def sidecar_key(rel: str) -> Optional[str]:
    """For a Suricata payload or sidecar, ``dir/<sha256>``; None for any other file."""
    directory, name = os.path.split(rel)
    match = _SIDECAR_NAME.fullmatch(name)
    if match:
        return os.path.join(directory, match.group(1))
    if _SHA256_NAME.fullmatch(name) and os.path.basename(directory) == name[:2]:
        return rel
    return None


# -- examining one file ------------------------------------------------------------------

READY = "ready"  # complete and wanted: claim it
WRITING = "writing"  # someone still has it open for writing: wait for its close
VANISHED = "vanished"  # gone (or became a directory) before we looked
UNCHANGED = "unchanged"  # the same file was finished before
SKIP = "skip"  # not a file we take; left alone, with a reason
REJECT = "reject"  # a file we cannot scan: handled like a failed scan, with a reason


@dataclass(frozen=True)
class Verdict:
    """What ``examine`` decided about one path."""

    kind: str
    identity: Optional[Identity] = None
    reason: str = ""


def examine(
    path: str,
    root: str,
    settings: Settings,
    finished: Optional[Identity] = None,
    closed: bool = False,
    regular: bool = False,
) -> Verdict:
    """Decide whether the file at ``path`` can be claimed now.

    ``closed`` says an event already told us its writer closed it (or it was renamed
    into place): then a file whose lease cannot be checked is taken at once; otherwise
    it must have been unchanged for ``settle`` seconds. ``regular`` says a directory
    listing already reported a regular file (its d_type), which saves an ``lstat``.
    """
    expected_ino = None
    known: Optional[Identity] = None
    if not regular:
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            return Verdict(VANISHED)
        except OSError as exc:
            return Verdict(SKIP, reason=f"cannot stat: {exc.strerror}")
        kind = _not_regular(path, root, info.st_mode)
        if kind is not None:
            return Verdict(VANISHED) if kind == "directory" else Verdict(SKIP, reason=kind)
        expected_ino = info.st_ino
        known = (info.st_ino, info.st_size, info.st_mtime_ns)
        early = _size_verdict(known, settings, finished)
        if early is not None:
            return early
    try:
        # O_NOFOLLOW: a symlink swapped in since we looked is refused; O_NONBLOCK: a
        # FIFO swapped in cannot block us.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return Verdict(VANISHED)
    except OSError as exc:
        if regular:  # not what the listing said any more: look properly
            return examine(path, root, settings, finished, closed)
        if exc.errno in (errno.EACCES, errno.EPERM):
            return Verdict(REJECT, known, f"cannot open: {exc.strerror}")
        return Verdict(SKIP, known, f"cannot open: {exc.strerror}")
    try:
        opened = os.fstat(fd)
        if not stat.S_ISREG(opened.st_mode) or (
            expected_ino is not None and opened.st_ino != expected_ino
        ):
            if regular:
                return examine(path, root, settings, finished, closed)
            return Verdict(VANISHED)  # replaced while we looked: its own event follows
        identity = (opened.st_ino, opened.st_size, opened.st_mtime_ns)
        verdict = _size_verdict(identity, settings, finished)
        if verdict is not None:
            return verdict
        writers = writers_open(fd)
    finally:
        os.close(fd)
    if writers:
        return Verdict(WRITING, identity, "still open for writing")
    if writers is None and not closed:
        if time.time_ns() - identity[2] < settings.settle * 1e9:
            return Verdict(
                WRITING, identity, f"modified less than {settings.settle:g}s ago (no lease)"
            )
    return Verdict(READY, identity)


def _size_verdict(
    identity: Identity, settings: Settings, finished: Optional[Identity]
) -> Optional[Verdict]:
    """Unchanged since finished, empty, or too large: decided without reading."""
    if finished == identity:
        return Verdict(UNCHANGED, identity)
    size = identity[1]
    if size == 0 and settings.skip_empty:
        return Verdict(SKIP, identity, "empty file (0 bytes)")
    if settings.max_size and size > settings.max_size:
        return Verdict(REJECT, identity, f"{size} bytes is more than max_size {settings.max_size}")
    return None


def _not_regular(path: str, root: str, mode: int) -> Optional[str]:
    """A one-line reason when ``mode`` is not a regular file; None when it is."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISLNK(mode):
        target = os.path.realpath(path)
        if not os.path.exists(target):
            return "dangling symbolic link"
        if not _inside(target, root):
            return f"symbolic link leading outside source_dir (to {target})"
        return "symbolic link (links are not followed)"
    if stat.S_ISFIFO(mode):
        return "FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device file"
    return "not a regular file"


_sigio_ignored = False


def ignore_sigio() -> None:
    """Ignore SIGIO process-wide (lease breaks), saving a syscall per file; only the
    main thread may set signal dispositions, elsewhere each lease names SIGURG instead."""
    global _sigio_ignored
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGIO, signal.SIG_IGN)
        _sigio_ignored = True


def writers_open(fd: int) -> Optional[bool]:
    """True when some process has the file open for writing, False when none has,
    None when this process may not take a lease on it (not its owner, no CAP_LEASE)."""
    try:
        # Should a writer open the file in the microseconds we hold the lease, the
        # kernel signals us: SIGIO would kill us unless ignored, SIGURG is harmless.
        if not _sigio_ignored:
            fcntl.fcntl(fd, fcntl.F_SETSIG, signal.SIGURG)
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EBUSY):
            return True
        return None
    fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
    return False


class RootCheck:
    """Whether a path resolves (symlinks followed) to itself, strictly inside the root:
    no directory on the way is a symlink. The file itself is opened with O_NOFOLLOW; its
    directory's answer is kept for a second, as resolving costs a syscall per level."""

    def __init__(self, root: str) -> None:
        self.root = root
        self._dirs: Dict[str, bool] = {}
        self._since = time.monotonic()

    def __call__(self, path: str) -> bool:
        if not path.startswith(self.root + os.sep):
            return False
        now = time.monotonic()
        if now - self._since > 1.0:
            self._dirs.clear()
            self._since = now
        directory = os.path.dirname(path)
        ok = self._dirs.get(directory)
        if ok is None:
            ok = self._dirs[directory] = os.path.realpath(directory) == directory
        return ok


# -- walking -----------------------------------------------------------------------------

DIR_END = None
"""Yielded by ``walk`` after the last entry of each directory."""


def walk(selector: Selector, recursive: bool, counters: Dict[str, int]) -> Iterator[Any]:
    """Every non-directory entry below the root, streaming, then ``DIR_END`` per directory.

    One directory is open at a time and only directory paths wait on the stack, so
    memory does not grow with the number of files. Symlinked directories are not
    followed. ``counters["dirs"]`` counts the directories listed.
    """
    stack = [selector.root]
    while stack:
        directory = stack.pop()
        try:
            listing = os.scandir(directory)
        except OSError:
            continue  # vanished or unreadable: its files are not ours to see
        counters["dirs"] = counters.get("dirs", 0) + 1
        with listing:
            for entry in listing:
                try:
                    is_dir = entry.is_dir(follow_symlinks=False)
                except OSError:
                    continue
                if is_dir:
                    if recursive and selector.dir_wanted(entry.path):
                        stack.append(entry.path)
                    continue
                yield entry
        yield DIR_END


# -- Suricata sidecars -------------------------------------------------------------------


@dataclass
class _Pair:
    payload: Optional[str] = None
    sidecar: Optional[str] = None
    deadline: float = 0.0


class Pairer:
    """Holds Suricata payloads and fileinfo sidecars until the other half shows up.

    Suricata renames the payload into ``ab/<sha256>`` and then writes the sidecar; a
    walk may list either first. Each waits up to ``wait`` seconds for its partner;
    what is left alone after that goes on as an ordinary file.
    """

    def __init__(self, wait: float) -> None:
        self.wait = wait
        self._pairs: Dict[str, _Pair] = {}

    def __len__(self) -> int:
        return len(self._pairs)

    def add(self, key: str, rel: str, now: float) -> Optional[Tuple[str, Optional[str]]]:
        """Hold ``rel``; returns (payload, sidecar) at once when this completes a pair."""
        pair = self._pairs.get(key)
        if pair is None:
            pair = self._pairs[key] = _Pair(deadline=now + self.wait)
        if rel == key:
            pair.payload = rel
        elif pair.sidecar is None:
            pair.sidecar = rel
        else:  # a second sidecar for the same sha256: it goes on alone
            return (rel, None)
        if pair.payload is not None and pair.sidecar is not None:
            del self._pairs[key]
            return (pair.payload, pair.sidecar)
        return None

    def discard(self, rel: str) -> None:
        """Forget ``rel`` (it was moved away or deleted)."""
        key = sidecar_key(rel)
        pair = self._pairs.get(key) if key else None
        if pair is None:
            return
        if pair.payload == rel:
            pair.payload = None
        if pair.sidecar == rel:
            pair.sidecar = None
        if pair.payload is None and pair.sidecar is None:
            del self._pairs[key]  # type: ignore[arg-type]

    def due(self, now: float, everything: bool = False) -> List[Tuple[str, Optional[str]]]:
        """What has waited long enough: (payload, None) or (sidecar alone, None)."""
        out: List[Tuple[str, Optional[str]]] = []
        for key in [k for k, p in self._pairs.items() if everything or p.deadline <= now]:
            pair = self._pairs.pop(key)
            for rel in (pair.payload, pair.sidecar):
                if rel is not None:
                    out.append((rel, None))
        return out

    def oldest(self) -> Optional[float]:
        """The deadline-less age reference: when the oldest held file was first seen."""
        if not self._pairs:
            return None
        return min(p.deadline for p in self._pairs.values()) - self.wait
