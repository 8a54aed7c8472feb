"""The claim ledger: what a directory provider handed to stoqd, and what came of it.

One JSON array per line, appended with a single ``write`` so a SIGKILL leaves at most a
torn last line (skipped on reading)::

    ["c", rel, ino, size, mtime_ns]            claimed: handed to stoqd
    ["r", rel]                                 released: stoqd stopped before scanning it
    ["f", rel, status, ino, size, mtime_ns]    finished and left in place (action keep)
    ["g", rel]                                 finished and moved away or deleted

Replaying it after a restart gives, per file, how many claims never came back (the
daemon died while the file was in flight) and which files were finished in place, so
they are not scanned again unless they change. The file is rewritten compactly at start
(and, when ``remember`` is on, whenever it has grown well past what it describes).
Nothing in it is ever evaluated: paths are JSON strings, numbers are checked as ints.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import Dict, List, Optional, Tuple

Identity = Tuple[int, int, int]

log = logging.getLogger("stoq.ledger")

FLUSH_AFTER = 0.05  # seconds a record may wait in the buffer

_quote = json.encoder.encode_basestring_ascii  # type: ignore[attr-defined]


class Ledger:
    """Claim counts and finished files, kept in memory and appended to ``path``."""

    def __init__(self, path: str, remember: bool = True, root: Optional[str] = None) -> None:
        """``remember``: keep finished files in memory (dirmon). dirscan sets it off so
        memory does not grow with the walk; it only needs what a previous run finished.
        ``root``: the directory paths are relative to (finished files gone are pruned)."""
        self.path = path
        self._root = root
        self._remember = remember
        self._lock = threading.Lock()
        self._claims: Dict[str, int] = {}
        self._finished: Dict[str, Identity] = {}
        self._lines = 0
        self._fd = -1
        self._buffer: List[str] = []
        self._first = 0.0
        self.torn = 0

    # -- reading ------------------------------------------------------------------------

    def open(self) -> None:
        """Replay the file (if any), rewrite it compactly, and open it for appending."""
        try:
            with open(self.path, "rb") as handle:
                for raw in handle:
                    self._replay(raw)
        except FileNotFoundError:
            pass
        if self._root is not None:
            # Files finished in place and gone since (deleted by hand, moved away).
            for rel in [
                r for r in self._finished if not os.path.lexists(os.path.join(self._root, r))
            ]:
                del self._finished[rel]
        self._rewrite()

    def _replay(self, raw: bytes) -> None:
        try:
            record = json.loads(raw)
            kind, rel = record[0], record[1]
            if not isinstance(rel, str):
                raise ValueError("path is not a string")
            if kind == "c":
                self._claims[rel] = self._claims.get(rel, 0) + 1
            elif kind == "r":
                self._drop_claim(rel)
            elif kind == "f":
                self._claims.pop(rel, None)
                self._finished[rel] = _identity(record[3:6])
            elif kind == "g":
                self._claims.pop(rel, None)
                self._finished.pop(rel, None)
            else:
                raise ValueError(f"unknown record {kind!r}")
        except (ValueError, IndexError, TypeError):
            self.torn += 1  # a line cut by a kill, or not ours: skip it

    def _drop_claim(self, rel: str) -> None:
        count = self._claims.get(rel, 0) - 1
        if count > 0:
            self._claims[rel] = count
        else:
            self._claims.pop(rel, None)

    def _rewrite(self) -> None:
        self._buffer.clear()  # what it held is in memory, and so in the rewrite
        lines: List[str] = []
        for rel, count in self._claims.items():
            lines.extend(_line(["c", rel, 0, 0, 0]) for _ in range(count))
        for rel, identity in self._finished.items():
            lines.append(_line(["f", rel, "saved", *identity]))
        temp = f"{self.path}.new"
        with open(temp, "w", encoding="utf-8") as handle:
            handle.write("".join(lines))
        os.replace(temp, self.path)
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        self._lines = len(lines)

    # -- queries ------------------------------------------------------------------------

    def claims(self, rel: str) -> int:
        """Claims of ``rel`` that never came back (the daemon died while it was in flight)."""
        return self._claims.get(rel, 0)

    def finished(self, rel: str) -> Optional[Identity]:
        """The identity ``rel`` had when it was finished in place, if it was."""
        return self._finished.get(rel)

    def pending_claims(self) -> Dict[str, int]:
        return dict(self._claims)

    def __len__(self) -> int:
        return len(self._finished)

    # -- writing ------------------------------------------------------------------------

    def claim(self, rel: str, identity: Identity) -> None:
        """Record a claim, on disk before the file is handed over: a claim lost to a
        kill would give a file that kills stoqd one more try than ``max_claims``."""
        with self._lock:
            self._claims[rel] = self._claims.get(rel, 0) + 1
            self._append(["c", rel, *identity])
            self._flush()

    def release(self, rel: str) -> None:
        with self._lock:
            self._drop_claim(rel)
            self._append(["r", rel])

    def finish(self, rel: str, identity: Optional[Identity], status: str) -> None:
        """``rel`` is done: left in place with ``identity``, or gone when it is None."""
        with self._lock:
            self._claims.pop(rel, None)
            if identity is None:
                self._finished.pop(rel, None)
                self._append(["g", rel])
                return
            if self._remember:
                self._finished[rel] = identity
            self._append(["f", rel, status, *identity])
            if self._remember and self._lines > 100_000 + 4 * len(self._finished):
                self._rewrite()

    def _append(self, record: list) -> None:
        # Buffered for a few milliseconds (claims flush at once): one write per batch,
        # not per file. A kill loses at most that batch of outcomes, which costs those
        # files one more scan after the restart: never a file.
        if not self._buffer:
            self._first = time.monotonic()
        self._buffer.append(_line(record))
        self._lines += 1
        if len(self._buffer) >= 256 or time.monotonic() - self._first >= FLUSH_AFTER:
            self._flush()

    def _flush(self) -> None:
        if self._buffer and self._fd >= 0:
            os.write(self._fd, "".join(self._buffer).encode())
        self._buffer.clear()

    def flush(self, due_only: bool = False) -> None:
        """Write what is buffered (``due_only``: only if it has waited long enough)."""
        with self._lock:
            if self._buffer and (not due_only or time.monotonic() - self._first >= FLUSH_AFTER):
                self._flush()

    def close(self, remove: bool = False) -> None:
        """Close the file; ``remove`` deletes it (a dirscan run that finished)."""
        with self._lock:
            self._flush()
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            if remove:
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass


def _line(record: list) -> str:
    # The same JSON json.dumps writes, built by hand: this runs twice per file.
    kind, rel, *rest = record
    fields = "".join("," + (_quote(v) if isinstance(v, str) else str(int(v))) for v in rest)
    return f'["{kind}",{_quote(rel)}{fields}]\n'


def _identity(values: list) -> Identity:
    ino, size, mtime = values
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (ino, size, mtime)):
        raise ValueError("identity is not three integers")
    return (ino, size, mtime)
