"""Claiming files and acting on their outcome, shared by dirmon and dirscan.

``Engine.offer`` examines a path and, when it is ready, records the claim in the
ledger and hands the file to stoqd by reference (``queue.put_file``), blocking while
the daemon's queue is full: files then simply wait on disk. Outcomes come back on a
stoqd thread, which (or an action thread, for moves to another filesystem) keeps,
deletes or moves the file (saved) or moves it to ``failed_dir`` or keeps it (failed;
never deleted), then writes the ledger. A file claimed ``max_claims`` times without an
outcome (stoqd was killed each time it was in flight) is moved to ``failed_dir`` (or
kept) with that reason.
"""

from __future__ import annotations

import json
import logging
import os
import queue as stdlib_queue
import shutil
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Callable, Dict, Optional, Tuple

from stoqd.framework.data import PayloadMeta
from stoqd.framework.exceptions import StoqPluginException
from stoqd.framework.helpers import write_atomically

from .files import (
    REJECT,
    SKIP,
    UNCHANGED,
    VANISHED,
    WRITING,
    Identity,
    RootCheck,
    Selector,
    Settings,
    examine,
    ignore_sigio,
)
from .ledger import Ledger

SIDECAR_MAX_BYTES = 1 << 20

# What offer() did with a path.
CLAIMED = "claimed"
BUSY = "busy"  # already in flight: offer it again once its outcome is in
STOPPED = "stopped"  # the daemon is stopping: the file stays for the next run


@dataclass
class Claim:
    """A file handed to stoqd and not yet reported back."""

    rel: str
    identity: Identity
    sidecar: Optional[str] = None
    sidecar_identity: Optional[Identity] = None
    since: float = field(default_factory=time.monotonic)


class Engine:
    """Claims files for one provider and carries out what happens after their scan."""

    def __init__(
        self,
        settings: Settings,
        queue: Any,
        log: logging.Logger,
        remember: bool = True,
        on_settled: Optional[Callable[[str], None]] = None,
    ) -> None:
        self.settings = settings
        self.selector = Selector(settings)
        self.root = settings.source_dir
        self.queue = queue
        self.log = log
        self._inside = RootCheck(self.root)
        self.ledger = Ledger(
            os.path.join(settings.state_dir, f"{settings.name}.ledger"), remember, self.root
        )
        self.in_flight: Dict[str, Claim] = {}
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._actions: stdlib_queue.SimpleQueue[Optional[Tuple[Claim, Any]]] = (
            stdlib_queue.SimpleQueue()
        )
        self._thread: Optional[threading.Thread] = None
        self._on_settled = on_settled
        # Actions run on stoqd's completion thread (renames and unlinks are quick); a
        # move to another filesystem copies, so it gets a thread of its own.
        source_dev = os.stat(self.root).st_dev
        self._threaded = any(
            d is not None and os.stat(d).st_dev != source_dev
            for d in (settings.done_dir, settings.failed_dir)
        )
        self._logged: Dict[str, str] = {}
        self.counters: Dict[str, int] = dict.fromkeys(
            ("claimed", "saved", "failed", "not_done", "rejected", "skipped", "reclaimed"), 0
        )
        self.skipped: Dict[str, int] = {}
        self.blocked = 0  # 1 while a claimed file waits for room in the daemon's queue
        self.queue_full = False  # the last claim had to wait for room
        self.last_reason = ""  # why the last offer was not claimed, when it says

    # -- lifecycle ----------------------------------------------------------------------

    def open(self) -> None:
        """Replay the ledger and start the action thread if moves need one."""
        try:
            self.ledger.open()
        except OSError as exc:
            raise StoqPluginException(
                f"plugin {self.settings.name}: option state_dir: cannot write the ledger "
                f"{self.ledger.path}: {exc.strerror}"
            ) from None
        if self.ledger.torn:
            self.log.warning(
                "%s: ledger %s: skipped %d unreadable lines",
                self.settings.name,
                self.ledger.path,
                self.ledger.torn,
            )
        pending = self.ledger.pending_claims()
        if pending:
            self.log.warning(
                "%s: %d files were in flight when stoqd last stopped; they are scanned again",
                self.settings.name,
                len(pending),
            )
        ignore_sigio()
        if self._threaded:
            self._thread = threading.Thread(target=self._act, name="dir-actions", daemon=True)
            self._thread.start()

    def wait_idle(self, tick: Optional[Callable[[], None]] = None) -> None:
        """Block until every claim has its outcome and its action has run; ``tick`` is
        called every fifth of a second meanwhile (to keep reporting)."""
        while True:
            with self._idle:
                if not self.in_flight:
                    return
                self._idle.wait(0.2)
            if tick is not None:
                tick()

    def close(self, remove_ledger: bool = False) -> None:
        """Stop the action thread, if any (after what it has queued); close the ledger."""
        if self._thread is not None:
            self._actions.put(None)
            self._thread.join()
            self._thread = None
        self.ledger.close(remove=remove_ledger)

    # -- claiming -----------------------------------------------------------------------

    def offer(
        self,
        path: str,
        closed: bool = False,
        sidecar: Optional[str] = None,
        waiting: Optional[Callable[[], None]] = None,
        regular: bool = False,
    ) -> str:
        """Examine ``path`` and hand it to stoqd if it is ready.

        Returns CLAIMED, BUSY, STOPPED or the examine verdict (WRITING, VANISHED, ...).
        ``waiting`` is called every half second while the daemon's queue is full;
        ``regular``: a directory listing said it is a regular file.
        """
        rel = self.selector.relative(path)
        if rel is None or not self.selector.wanted(rel):
            return SKIP
        if rel in self.in_flight:
            return BUSY
        finished = self.ledger.finished(rel)
        verdict = examine(path, self.root, self.settings, finished, closed, regular)
        if verdict.kind == SKIP:
            self._skip(rel, verdict.reason)
            return SKIP
        if verdict.kind in (WRITING, VANISHED, UNCHANGED):
            self.last_reason = verdict.reason
            return verdict.kind
        if not self._inside(path):
            self._skip(rel, "path leads through a symbolic link")
            return SKIP
        claim = Claim(rel, verdict.identity or (0, 0, 0))
        if verdict.kind == REJECT:
            self._reject(claim, verdict.reason)
            return REJECT
        tries = self.ledger.claims(rel)
        if tries >= self.settings.max_claims:
            self._reject(
                claim,
                f"claimed {tries} times without a result: stoqd stopped or died each time "
                "it was being scanned",
            )
            return REJECT
        if tries:
            self.counters["reclaimed"] += 1
        meta = PayloadMeta(extra_data={"filename": os.path.basename(rel), "path": path})
        if sidecar is not None:
            claim.sidecar, claim.sidecar_identity, info = self._read_sidecar(sidecar)
            meta.extra_data["suricata"] = info
        return self._put(claim, path, meta, waiting)

    def _put(
        self, claim: Claim, path: str, meta: PayloadMeta, waiting: Optional[Callable[[], None]]
    ) -> str:
        with self._lock:
            self.in_flight[claim.rel] = claim
        self.ledger.claim(claim.rel, claim.identity)
        done = lambda outcome, claim=claim: self._done(claim, outcome)  # noqa: E731
        started = time.monotonic()
        try:
            while True:
                if self.queue.stopping.is_set():
                    self._unclaim(claim)
                    return STOPPED
                try:
                    self.queue.put_file(path, meta, done=done, timeout=0.5)
                except stdlib_queue.Full:
                    self.blocked = 1
                    self.queue_full = True
                    if waiting is not None:
                        waiting()
                    continue
                except BaseException:
                    self._unclaim(claim)
                    raise
                # A put that had to wait for room means the daemon's queue is full.
                self.queue_full = time.monotonic() - started > 0.005
                self.counters["claimed"] += 1
                return CLAIMED
        finally:
            self.blocked = 0

    def _unclaim(self, claim: Claim) -> None:
        self.ledger.release(claim.rel)
        with self._idle:
            self.in_flight.pop(claim.rel, None)
            self._idle.notify_all()

    def _read_sidecar(self, sidecar: str) -> Tuple[Optional[str], Optional[Identity], Any]:
        """The sidecar's JSON for the payload's metadata, and the sidecar to act on."""
        path = os.path.join(self.root, sidecar)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            return None, None, {"sidecar": sidecar, "error": exc.strerror}
        with os.fdopen(fd, "rb") as handle:
            info = os.fstat(handle.fileno())
            identity = (info.st_ino, info.st_size, info.st_mtime_ns)
            data = handle.read(SIDECAR_MAX_BYTES + 1)
        if len(data) > SIDECAR_MAX_BYTES:
            return sidecar, identity, {"sidecar": sidecar, "error": "larger than 1 MiB"}
        try:
            parsed = json.loads(data)
        except ValueError as exc:
            return sidecar, identity, {"sidecar": sidecar, "error": f"not JSON: {exc}"}
        return sidecar, identity, {"sidecar": sidecar, "fileinfo": parsed}

    def _skip(self, rel: str, reason: str) -> None:
        self.counters["skipped"] += 1
        label = reason.split(" (")[0]
        self.skipped[label] = self.skipped.get(label, 0) + 1
        # Once per path and reason: rescans must not flood the log with the same line.
        if self._logged.get(rel) != reason:
            if len(self._logged) > 10_000:
                self._logged.clear()
            self._logged[rel] = reason
            # An empty file is ordinary (a writer about to write, a marker file); the
            # rest deserve a look.
            level = logging.DEBUG if reason.startswith("empty") else logging.WARNING
            self.log.log(level, "%s: skipped %s: %s", self.settings.name, rel, reason)

    def _reject(self, claim: Claim, reason: str) -> None:
        self.counters["rejected"] += 1
        self.log.warning("%s: cannot scan %s: %s", self.settings.name, claim.rel, reason)
        self._fail(claim, reason)

    # -- after the scan -----------------------------------------------------------------

    def _done(self, claim: Claim, outcome: Any) -> None:
        if self._threaded:
            self._actions.put((claim, outcome))
        else:
            self._settle(claim, outcome)

    def _act(self) -> None:
        while True:
            job = self._actions.get()
            if job is None:
                return
            self._settle(*job)

    def _settle(self, claim: Claim, outcome: Any) -> None:
        try:
            self._finish(claim, outcome)
        except Exception:  # a full disk or odd permissions must not end the provider
            self.log.exception("%s: action for %s failed", self.settings.name, claim.rel)
        finally:
            with self._idle:
                self.in_flight.pop(claim.rel, None)
                self._idle.notify_all()
        if self._on_settled is not None:
            self._on_settled(claim.rel)

    def _finish(self, claim: Claim, outcome: Any) -> None:
        status = outcome.status
        if status == "saved":
            self.counters["saved"] += 1
            self._saved(claim)
        elif status == "failed":
            self.counters["failed"] += 1
            self.log.warning(
                "%s: scan of %s failed: %s", self.settings.name, claim.rel, outcome.error
            )
            self._fail(claim, outcome.error or "scan failed")
        else:  # not_done: stoqd stopped first; the file stays for the next run
            self.counters["not_done"] += 1
            self.ledger.release(claim.rel)

    def _saved(self, claim: Claim) -> None:
        action = self.settings.action
        for rel, identity in self._files(claim):
            source = os.path.join(self.root, rel)
            if action == "delete":
                gone = _delete(source, self.log)
            elif action == "move":
                assert self.settings.done_dir is not None
                gone = _move(source, self.settings.done_dir, rel, self.log) is not None
            else:
                gone = False  # kept; one that vanished since is pruned at the next start
            self.ledger.finish(rel, None if gone else identity, "saved")

    def _fail(self, claim: Claim, reason: str) -> None:
        """Move to failed_dir with a reason file, or keep; a failed file is never deleted."""
        for rel, identity in self._files(claim):
            source = os.path.join(self.root, rel)
            target = None
            if self.settings.failed_dir is not None:
                target = _move(source, self.settings.failed_dir, rel, self.log)
                if target is not None and rel == claim.rel:
                    _write_reason(target, rel, reason, self.settings.name, self.log)
            gone = target is not None or not os.path.lexists(source)
            self.ledger.finish(rel, None if gone else identity, "failed")

    @staticmethod
    def _files(claim: Claim) -> list:
        files = [(claim.rel, claim.identity)]
        if claim.sidecar is not None and claim.sidecar_identity is not None:
            files.append((claim.sidecar, claim.sidecar_identity))
        return files

    # -- reporting ----------------------------------------------------------------------

    def stats(self) -> Dict[str, Any]:
        """Counters for ``queue.report``."""
        oldest = min((c.since for c in list(self.in_flight.values())), default=None)
        stats: Dict[str, Any] = dict(self.counters)
        stats["in_flight"] = len(self.in_flight) - self.blocked
        stats["queue_full"] = self.queue_full
        stats["oldest_in_flight_age"] = (
            round(time.monotonic() - oldest, 3) if oldest is not None else 0
        )
        stats["skipped_by_reason"] = dict(self.skipped)
        stats["source_dir"] = self.root
        return stats


def _delete(path: str, log: logging.Logger) -> bool:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.error("cannot delete %s: %s; it stays", path, exc.strerror)
        return False
    return True


def _move(source: str, target_dir: str, rel: str, log: logging.Logger) -> Optional[str]:
    """Move ``source`` to ``target_dir/rel`` (a free name beside it if that is taken).

    Returns where it went, or None when it stayed (gone already, or cannot be moved)."""
    target = os.path.join(target_dir, rel)
    try:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        target = _free_name(target)
        try:
            os.rename(source, target)
        except OSError as exc:
            if exc.errno != 18:  # EXDEV: another filesystem, copy then delete
                raise
            shutil.move(source, target)
    except FileNotFoundError:
        log.warning("cannot move %s: it is gone", source)
        return None
    except OSError as exc:
        log.error("cannot move %s to %s: %s; it stays", source, target, exc.strerror)
        return None
    return target


def _free_name(target: str) -> str:
    if not os.path.lexists(target):
        return target
    for number in range(1, 10_000):
        candidate = f"{target}.{number}"
        if not os.path.lexists(candidate):
            return candidate
    raise FileExistsError(target)


def _write_reason(target: str, rel: str, reason: str, provider: str, log: logging.Logger) -> None:
    record = {
        "file": rel,
        "provider": provider,
        "error": reason,
        "time": datetime.now(UTC).isoformat(),
    }
    path = f"{target}.error.json"
    try:  # whoever reads failed_dir never sees half a reason
        write_atomically(path, (json.dumps(record) + "\n").encode())
    except OSError as exc:
        log.error("cannot write %s: %s", path, exc.strerror)
