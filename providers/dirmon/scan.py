"""dirscan's single pass over a tree, streaming, with dirmon's filters and actions.

The walk lists one directory at a time (``files.walk``); claims are limited by the
daemon's queue (``put_file`` blocks), so memory holds only the directories still to
list and the files in flight. The ledger makes a run resumable: if stoqd is killed, the
next run skips what was finished and counts the claims that never came back. A run that
ends with every file finished removes its ledger, so the next run scans everything again.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Dict, Optional

from .engine import BUSY, STOPPED, Engine
from .files import DIR_END, WRITING, Pairer, Settings, sidecar_key, walk

REPORT_EVERY = 1.0


class Scan:
    """One run of dirscan's ``ingest``."""

    def __init__(self, settings: Settings, queue: Any, log: logging.Logger) -> None:
        self.settings = settings
        self.queue = queue
        self.log = log
        self.engine = Engine(settings, queue, log, remember=False)
        # Everything is on disk already: a payload and its sidecar meet within the
        # listing of their directory, so no waiting (sidecar_wait) is needed.
        self.pairer = Pairer(0.0) if settings.sidecars == "attach" else None
        self.counts: Dict[str, int] = {"files": 0, "writing": 0, "dirs": 0}
        self._last_report = 0.0
        self._started = time.monotonic()

    def run(self) -> bool:
        """Walk the tree once; True when every file found was finished (a complete run)."""
        self.engine.open()
        complete = False
        try:
            complete = self._walk()
        finally:
            self.engine.wait_idle(tick=lambda: self._report(walking=False))
            # A complete run forgets its ledger: the next run is a fresh scan.
            complete = complete and self.engine.counters["not_done"] == 0
            self.engine.close(remove_ledger=complete)
            self._report(force=True, walking=False)
        return complete

    def _walk(self) -> bool:
        for entry in walk(self.engine.selector, self.settings.recursive, self.counts):
            if self.queue.stopping.is_set():
                return False
            if entry is DIR_END:
                if self.pairer is not None and len(self.pairer):
                    for payload, _ in self.pairer.due(0.0, everything=True):
                        if self._offer(os.path.join(self.settings.source_dir, payload)) == STOPPED:
                            return False
                continue
            self.counts["files"] += 1
            if self._take(entry.path, _is_regular(entry)) == STOPPED:
                return False
            self._report()
        return True

    def _take(self, path: str, regular: bool) -> str:
        if self.pairer is not None:
            rel = self.engine.selector.relative(path)
            key = sidecar_key(rel) if rel is not None else None
            if rel is not None and key is not None and self.engine.selector.wanted(rel):
                pair = self.pairer.add(key, rel, 0.0)
                if pair is None:
                    return "held"
                return self._offer(os.path.join(self.settings.source_dir, pair[0]), pair[1])
        return self._offer(path, regular=regular)

    def _offer(self, path: str, sidecar: Optional[str] = None, regular: bool = False) -> str:
        result = self.engine.offer(
            path, closed=False, sidecar=sidecar, waiting=self._report, regular=regular
        )
        if result == WRITING:
            self.counts["writing"] += 1
            self.engine._skip(
                os.path.relpath(path, self.settings.source_dir),
                f"{self.engine.last_reason} (not scanned by this run)",
            )
        elif result == BUSY:
            pass  # a hard link or a repeated name: one scan is enough
        return result

    def _report(self, force: bool = False, walking: bool = True) -> None:
        now = time.monotonic()
        if not force and now - self._last_report < REPORT_EVERY:
            return
        self._last_report = now
        stats = self.engine.stats()
        stats.update(
            walked_files=self.counts["files"],
            walked_dirs=self.counts.get("dirs", 0),
            walking=walking,
            backlog=len(self.pairer) if self.pairer is not None else 0,
            oldest_age=0,
            elapsed=round(now - self._started, 3),
        )
        self.queue.report(**stats)
        self.engine.ledger.flush(due_only=True)


def _is_regular(entry: Any) -> bool:
    """The listing's own file type (d_type): no syscall unless the filesystem lacks it."""
    try:
        return bool(entry.is_file(follow_symlinks=False))
    except OSError:
        return False
