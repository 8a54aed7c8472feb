"""dirmon's loop: inotify events and rescans in, claims out, one thread owning the state.

Files wait in ``pending`` (complete, in arrival order) until the daemon's queue takes
them; while ``put_file`` blocks (backpressure) they simply stay on disk and in this
list. New names whose writer has not closed them yet wait in ``writing`` and are
re-checked every quarter second, in case their close event is lost. An overflow of the
kernel's event queue, too many waiting files (``max_backlog``), or ``rescan_interval``
start a rescan of the tree, fed in small batches so memory stays bounded.
"""

from __future__ import annotations

import logging
import os
import queue as stdlib_queue
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, Iterator, Optional

from .engine import BUSY, STOPPED, Engine
from .files import DIR_END, WRITING, Pairer, Settings, sidecar_key, walk
from .watcher import Event, Watcher, inotify_limits, inotify_watches

WRITING_CHECK = 0.25  # seconds between checks of files still open for writing
REPORT_EVERY = 1.0
WALK_BATCH = 512  # files the rescan adds to pending at a time
_WALK_OVER = object()


@dataclass
class _Entry:
    seen: float
    closed: bool
    sidecar: Optional[str] = None
    regular: bool = False  # a directory listing said: regular file


class Monitor:
    """One run of dirmon's ``ingest``: returns when the daemon stops it."""

    def __init__(
        self,
        settings: Settings,
        queue: Any,
        log: logging.Logger,
        process_existing: bool,
        rescan_interval: float,
        max_backlog: int,
    ) -> None:
        self.settings = settings
        self.queue = queue
        self.log = log
        self.root = settings.source_dir
        self.rescan_interval = rescan_interval
        self.max_backlog = max_backlog
        self.events: stdlib_queue.SimpleQueue[Event] = stdlib_queue.SimpleQueue()
        self.engine = Engine(settings, queue, log, remember=True, on_settled=self._settled)
        self.pending: OrderedDict[str, _Entry] = OrderedDict()
        self.writing: Dict[str, float] = {}
        self.deferred: set = set()
        self.pairer = Pairer(settings.sidecar_wait) if settings.sidecars == "attach" else None
        self.walker: Optional[Iterator[Any]] = None
        self.walk_counts: Dict[str, int] = {}
        self.rescan_wanted = process_existing
        self.watcher: Optional[Watcher] = None
        self.counters: Dict[str, int] = dict.fromkeys(
            ("events", "overflows", "rescans", "backlog_overflows"), 0
        )
        self.limits = inotify_limits()
        self.watched_dirs: Optional[int] = None
        self.unwatched_dirs = 0
        self.mode = "inotify"
        self._last_walk_end = time.monotonic()
        self._last_report = 0.0
        self._last_writing_check = 0.0
        self._backlog_dropped = False
        self._root_id = _dir_id(self.root)

    # -- the loop -----------------------------------------------------------------------

    def run(self) -> None:
        self.engine.open()
        self._start_watcher()
        try:
            while not self.queue.stopping.is_set():
                self._step()
        finally:
            if self.watcher is not None:
                self.watcher.stop()
            self._report(force=True)
            # Outcomes of what is in flight still come (saved, or not_done when the
            # daemon stops first): their actions must run before we return.
            self.engine.wait_idle(tick=self._report)
            self.engine.close()
            self._report(force=True)

    def _start_watcher(self) -> None:
        try:
            self.watcher = Watcher(self.root, self.settings.recursive, self.events)
        except OSError as exc:
            # Out of inotify instances or watches: keep working by rescanning.
            self.mode = "rescan"
            self.rescan_interval = self.rescan_interval or 10.0
            self.log.error(
                "%s: cannot watch %s: %s (inotify limits %s); rescanning every %gs instead",
                self.settings.name,
                self.root,
                exc.strerror or exc,
                self.limits,
                self.rescan_interval,
            )
            self.rescan_wanted = True

    def _step(self) -> None:
        now = time.monotonic()
        self.engine.ledger.flush(due_only=True)
        idle = not self.pending and self.walker is None
        self._drain(timeout=0.1 if idle else 0.0)
        self._periodic(now)
        self._feed_walk()
        # A batch of claims, but never so long that reports and checks wait: under
        # backpressure each put may wait a while for room without ever timing out.
        for _ in range(256):
            if not self.pending or self.queue.stopping.is_set():
                break
            path, entry = self.pending.popitem(last=False)
            self._offer(path, entry)
            if not self.events.empty():
                self._drain(0.0)
            if time.monotonic() - now >= WRITING_CHECK:
                break

    def _offer(self, path: str, entry: _Entry) -> None:
        result = self.engine.offer(
            path, entry.closed, entry.sidecar, waiting=self._blocked, regular=entry.regular
        )
        if result == WRITING:
            self._watch(path, time.monotonic())
        elif result == BUSY:
            self.deferred.add(path)
        elif result == STOPPED:
            self.pending[path] = entry

    def _blocked(self) -> None:
        """While the daemon's queue is full: keep reading events and reporting."""
        self._drain(0.0)
        self._report()

    # -- events -------------------------------------------------------------------------

    def _drain(self, timeout: float) -> None:
        try:
            event = self.events.get(timeout=timeout) if timeout else self.events.get_nowait()
        except stdlib_queue.Empty:
            return
        while True:
            self._event(*event)
            try:
                event = self.events.get_nowait()
            except stdlib_queue.Empty:
                return

    def _event(self, kind: str, path: str) -> None:
        self.counters["events"] += 1
        if kind in ("closed", "moved_in"):
            self._ready(path, closed=True, now=time.monotonic())
        elif kind == "created":
            if path not in self.pending:
                self._watch(path, time.monotonic())
        elif kind == "gone":
            self.pending.pop(path, None)
            self.writing.pop(path, None)
            if self.pairer is not None:
                rel = self.engine.selector.relative(path)
                if rel is not None:
                    self.pairer.discard(rel)
        elif kind == "settled":
            if path in self.deferred:
                self.deferred.discard(path)
                self._ready(path, closed=True, now=time.monotonic())
        elif kind == "overflow":
            self.counters["overflows"] += 1
            self.log.warning(
                "%s: inotify queue overflowed (max_queued_events=%s): rescanning %s",
                self.settings.name,
                self.limits.get("max_queued_events"),
                self.root,
            )
            self.walker = None  # start over: the walk so far may predate lost events
            self.rescan_wanted = True

    def _settled(self, rel: str) -> None:
        # On the action thread: hand over to the loop, which owns the state.
        self.events.put(("settled", os.path.join(self.root, rel)))

    def _ready(self, path: str, closed: bool, now: float, regular: bool = False) -> None:
        selector = self.engine.selector
        rel = selector.relative(path)
        if rel is None or not selector.wanted(rel):
            return
        self.writing.pop(path, None)
        if self.pairer is not None:
            key = sidecar_key(rel)
            if key is not None:
                pair = self.pairer.add(key, rel, now)
                if pair is not None:
                    self._pend(os.path.join(self.root, pair[0]), _Entry(now, closed, pair[1]))
                return
        entry = self.pending.get(path)
        if entry is not None:
            entry.closed = entry.closed or closed
            return
        self._pend(path, _Entry(now, closed, regular=regular))

    def _pend(self, path: str, entry: _Entry) -> None:
        if len(self.pending) >= self.max_backlog:
            # Too many files waiting to remember each: forget this one, and find it
            # again with a rescan once the backlog has drained.
            self.counters["backlog_overflows"] += 1
            self._backlog_dropped = True
            return
        self.pending[path] = entry

    def _watch(self, path: str, now: float) -> None:
        if len(self.writing) < self.max_backlog:
            self.writing.setdefault(path, now)

    # -- periodic work ------------------------------------------------------------------

    def _periodic(self, now: float) -> None:
        if self.pairer is not None and len(self.pairer):
            for payload, _ in self.pairer.due(now):
                self._pend(os.path.join(self.root, payload), _Entry(now, True))
        if now - self._last_writing_check >= WRITING_CHECK:
            self._last_writing_check = now
            self._check_writing(now)
            self._check_root()
        if self._backlog_dropped and len(self.pending) < self.max_backlog // 2:
            self._backlog_dropped = False
            self.rescan_wanted = True
        if (
            self.rescan_interval
            and self.walker is None
            and now - self._last_walk_end >= self.rescan_interval
        ):
            self.rescan_wanted = True
        self._report()

    def _check_writing(self, now: float) -> None:
        """Files whose writer had them open: take those closed since (lost close events,
        files inside a directory that was moved in)."""
        due = [p for p, seen in self.writing.items() if now - seen >= WRITING_CHECK]
        for path in due:
            del self.writing[path]
            if path not in self.pending:
                self._ready(path, closed=False, now=now)

    def _check_root(self) -> None:
        if _dir_id(self.root) != self._root_id:
            raise RuntimeError(f"source_dir {self.root} was removed or replaced")
        if self.watcher is not None and not self.watcher.alive():
            raise RuntimeError(f"the inotify observer on {self.root} stopped")

    def _feed_walk(self) -> None:
        if self.rescan_wanted and self.walker is None:
            self.rescan_wanted = False
            self.counters["rescans"] += 1
            self.walk_counts = {}
            self.walker = walk(self.engine.selector, self.settings.recursive, self.walk_counts)
        if self.walker is None:
            return
        now = time.monotonic()
        while len(self.pending) < WALK_BATCH:
            entry: Any = next(self.walker, _WALK_OVER)
            if entry is _WALK_OVER:
                self.walker = None
                self._walk_ended()
                return
            if entry is not DIR_END:
                self._ready(entry.path, closed=False, now=now, regular=_is_regular(entry))

    def _walk_ended(self) -> None:
        self._last_walk_end = time.monotonic()
        if self.watcher is None:
            return
        self.watched_dirs = inotify_watches()
        dirs = self.walk_counts.get("dirs", 0)
        if self.watched_dirs is not None and self.settings.recursive and self.watched_dirs < dirs:
            unwatched = dirs - self.watched_dirs
            if unwatched != self.unwatched_dirs:
                self.log.error(
                    "%s: only %d of %d directories are watched (inotify max_user_watches=%s):"
                    " rescanning every %gs to find files in the others",
                    self.settings.name,
                    self.watched_dirs,
                    dirs,
                    self.limits.get("max_user_watches"),
                    self.rescan_interval or 60.0,
                )
            self.unwatched_dirs = unwatched
            self.rescan_interval = self.rescan_interval or 60.0

    # -- reporting ----------------------------------------------------------------------

    def _report(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_report < REPORT_EVERY:
            return
        self._last_report = now
        oldest = [e.seen for e in list(self.pending.values())[:1]]
        if self.pairer is not None and (held := self.pairer.oldest()) is not None:
            oldest.append(held)
        stats = self.engine.stats()
        stats.update(self.counters)
        stats.update(
            backlog=len(self.pending)
            + (len(self.pairer) if self.pairer else 0)
            + self.engine.blocked,
            oldest_age=round(now - min(oldest), 3) if oldest else 0,
            writing=len(self.writing),
            rescanning=self.walker is not None,
            mode=self.mode,
            watched_dirs=self.watched_dirs,
            unwatched_dirs=self.unwatched_dirs,
            inotify_limits=self.limits,
        )
        self.queue.report(**stats)


def _dir_id(path: str) -> Optional[tuple]:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (info.st_dev, info.st_ino)


def _is_regular(entry: Any) -> bool:
    """The listing's own file type (d_type): no syscall unless the filesystem lacks it."""
    try:
        return bool(entry.is_file(follow_symlinks=False))
    except OSError:
        return False
