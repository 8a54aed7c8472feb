"""watchdog's inotify observer, narrowed to the events that say a file is complete.

Events become ``(kind, path)`` tuples on a queue the provider's loop reads:

- ``closed``: IN_CLOSE_WRITE, a writer closed the file;
- ``moved_in``: renamed into the tree (from inside or outside it);
- ``created``: a new name appeared: a writer creating it (not complete yet) or a file
  inside a directory that was just created or moved in (maybe complete: checked later);
- ``gone``: renamed away;
- ``overflow``: the kernel's event queue overflowed and events were lost: rescan.

The kernel mask is narrowed with ``event_filter`` so that opens, modifies and reads do
not fill the kernel queue (with every event subscribed it overflows at ~17k files/s).
"""

from __future__ import annotations

import logging
import os
import queue as stdlib_queue
from typing import Dict, Optional, Tuple

from watchdog.events import (
    FileClosedEvent,
    FileCreatedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.inotify import InotifyObserver

Event = Tuple[str, str]
EventQueue = "stdlib_queue.SimpleQueue[Event]"

# watchdog logs this (and rebuilds its watches) when the kernel reports IN_Q_OVERFLOW.
_OVERFLOW_LOGGER = "watchdog.observers.inotify_c"
_OVERFLOW_TEXT = "Inotify queue overflowed"


class _Handler(FileSystemEventHandler):
    def __init__(self, events: stdlib_queue.SimpleQueue[Event]) -> None:
        self._put = events.put

    def dispatch(self, event: FileSystemEvent) -> None:
        # Called on watchdog's thread for every event: only translate and hand over.
        kind = type(event)
        if kind is FileClosedEvent:
            self._put(("closed", os.fsdecode(event.src_path)))
        elif kind is FileMovedEvent:
            if event.src_path:
                self._put(("gone", os.fsdecode(event.src_path)))
            if event.dest_path:
                self._put(("moved_in", os.fsdecode(event.dest_path)))
        elif kind is FileCreatedEvent:
            self._put(("created", os.fsdecode(event.src_path)))


class _OverflowHook(logging.Handler):
    """Turns watchdog's overflow warning into an ``overflow`` event."""

    def __init__(self, events: stdlib_queue.SimpleQueue[Event]) -> None:
        super().__init__(logging.WARNING)
        self._events = events

    def emit(self, record: logging.LogRecord) -> None:
        if str(record.msg).startswith(_OVERFLOW_TEXT):
            self._events.put(("overflow", ""))


class _QuietStop(logging.Filter):
    """Drops watchdog's error about reading events while its emitter stops: a benign
    race of ``observer.stop()`` that would otherwise log an error at every shutdown."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("InotifyEmitter.queue_events() called when")


_QUIET_STOP = _QuietStop()
logging.getLogger("watchdog.observers.inotify").addFilter(_QUIET_STOP)


class Watcher:
    """A running inotify observer on ``root``, feeding ``events``."""

    def __init__(self, root: str, recursive: bool, events: stdlib_queue.SimpleQueue[Event]) -> None:
        self.root = root
        self._hook = _OverflowHook(events)
        logger = logging.getLogger(_OVERFLOW_LOGGER)
        logger.addHandler(self._hook)
        if logger.getEffectiveLevel() > logging.WARNING:
            logger.setLevel(logging.WARNING)
        # Full events: a rename from outside the tree arrives as a move with no source
        # instead of as a creation, so "created" always means "someone made a new name".
        self._observer = InotifyObserver(generate_full_events=True)
        self._observer.schedule(
            _Handler(events),
            root,
            recursive=recursive,
            event_filter=[FileClosedEvent, FileMovedEvent, FileCreatedEvent],
        )
        try:
            self._observer.start()  # adds the watches here: ENOSPC/EMFILE raise now
        except BaseException:
            self.stop()
            raise

    def alive(self) -> bool:
        return self._observer.is_alive()

    def stop(self) -> None:
        """Stop and join the observer (inotify instances are a per-user limit)."""
        logging.getLogger(_OVERFLOW_LOGGER).removeHandler(self._hook)
        try:
            if self._observer.is_alive():
                self._observer.stop()
                self._observer.join(10)
        except Exception:  # stopping must not hide the reason we are stopping
            pass


def inotify_limits() -> Dict[str, Optional[int]]:
    """The kernel's inotify limits (``/proc/sys/fs/inotify``)."""
    limits: Dict[str, Optional[int]] = {}
    for name in ("max_queued_events", "max_user_watches", "max_user_instances"):
        try:
            with open(f"/proc/sys/fs/inotify/{name}") as handle:
                limits[name] = int(handle.read())
        except (OSError, ValueError):
            limits[name] = None
    return limits


def inotify_watches() -> Optional[int]:
    """Watches this process holds, from ``/proc/self/fdinfo`` of its inotify descriptors."""
    total = 0
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return None
    for fd in fds:
        try:
            if os.readlink(f"/proc/self/fd/{fd}") != "anon_inode:inotify":
                continue
            with open(f"/proc/self/fdinfo/{fd}") as handle:
                total += sum(1 for line in handle if line.startswith("inotify wd:"))
        except OSError:
            continue
    return total
