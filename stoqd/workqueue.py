"""The work queue as each side sees it: what a provider puts, and what a worker gets.

Provider side: ``ProviderQueue`` is the ``queue`` a provider's ``ingest`` receives. Each
``put`` spends one credit; the supervisor hands credits back as the shared queue drains,
so a provider blocks exactly when its share of ``max_queue`` is full (backpressure).
Completions come back on the same socket and are delivered to ``done`` callbacks on a
single reader thread.

Worker side: ``Item`` is one unit of work as it crosses to a worker, and ``load_payload``
turns it back into a ``Payload``. Large payloads are spooled to a file rather than
pushed through the socket, so memory is bounded by configuration, not by file sizes.
"""

from __future__ import annotations

import fcntl
import itertools
import os
import queue as stdlib_queue
import shutil
import stat
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Dict, List, NoReturn, Optional, Union

from . import childproc, logs
from .framework.data import Payload, PayloadMeta, RequestMeta
from .framework.helpers import compact_json
from .wire import Endpoint

SAVED = "saved"
FAILED = "failed"
NOT_DONE = "not_done"


@dataclass(frozen=True)
class Outcome:
    """How one item ended, as reported back to the provider that put it."""

    status: str  # saved | failed | not_done
    error: Optional[str] = None
    scan_id: Optional[str] = None

    @property
    def saved(self) -> bool:
        return self.status == SAVED


DoneCallback = Callable[[Outcome], None]


def _meta_dict(meta: PayloadMeta) -> Dict[str, Any]:
    return {
        "should_archive": meta.should_archive,
        "extra_data": meta.extra_data,
        "dispatch_to": meta.dispatch_to,
    }


def _encode(header: Dict[str, Any]) -> bytes:
    # stoqd's JSON encoder makes odd extra_data (bytes, sets, objects) JSON here, where
    # the provider sees any error, not in the supervisor; one pass, nothing decoded.
    return compact_json(header)


class ProviderQueue:
    """The queue stoqd hands to ``ProviderPlugin.ingest`` (see docs/providers.md)."""

    def __init__(self, endpoint: Endpoint, inline_max_bytes: int, spool_dir: str) -> None:
        self._endpoint = endpoint
        self._inline_max = inline_max_bytes
        self._spool_dir = spool_dir
        # What put() and the reader thread share, under one lock: one acquisition per
        # put, as providers put thousands of items a second.
        self._lock = threading.Condition()  # reentrant, as the locks it replaced
        self._credits = 0  # items this process may still put (the supervisor grants them)
        self._callbacks: Dict[int, DoneCallback] = {}
        self._pending = 0  # items put with a ``done`` callback, outcome not yet delivered
        self._ids = itertools.count(1)  # next() on it is atomic: no lock needed
        self.stopping = threading.Event()
        self.put_count = 0

    # -- what providers call --------------------------------------------------------

    def put(
        self,
        item: Union[Payload, bytes, str, Dict[str, Any]],
        block: bool = True,
        timeout: Optional[float] = None,
        *,
        done: Optional[DoneCallback] = None,
        request_meta: Optional[RequestMeta] = None,
        key: Optional[str] = None,
        redelivered: bool = True,
    ) -> None:
        """Queue a payload or a reference; blocks while the daemon's queue is full.

        ``key``, with ``done``: the message's identity in its source (a message id). When
        this provider process dies and a later run puts the same key again, stoqd answers
        with the outcome of the earlier run's item, when it was saved or is still in
        flight, instead of scanning the message twice. ``redelivered=False`` says the
        source knows this delivery is a first one (a reused id is a new message): it is
        scanned, never answered from an earlier run. See docs/providers.md.
        """
        if isinstance(item, (bytes, bytearray, memoryview)):
            # Not wrapped in a Payload: its id would be thrown away, the worker makes its own.
            header, body = self._content_frame(bytes(item), None)
        elif isinstance(item, Payload):
            header, body = self._content_frame(item.content, item.payload_meta)
        elif isinstance(item, (str, dict)):
            header, body = {"kind": "ref", "ref": item}, b""
        else:
            raise TypeError(
                f"queue.put takes a Payload, bytes, str or dict, not {type(item).__name__}"
            )
        self._send(header, body, block, timeout, done, request_meta, key, redelivered)

    def put_file(
        self,
        path: Union[str, os.PathLike[str]],
        payload_meta: Optional[PayloadMeta] = None,
        *,
        done: Optional[DoneCallback] = None,
        request_meta: Optional[RequestMeta] = None,
        block: bool = True,
        timeout: Optional[float] = None,
        key: Optional[str] = None,
        redelivered: bool = True,
    ) -> None:
        """Queue a local file by reference: the worker reads it, not this process.

        ``done``, ``request_meta``, ``key`` and ``redelivered`` are as for ``put``.
        """
        header = {
            "kind": "file",
            "path": os.fspath(path),
            "meta": _meta_dict(payload_meta or PayloadMeta()),
        }
        self._send(header, b"", block, timeout, done, request_meta, key, redelivered)

    def batched(self) -> ContextManager[None]:
        """A block whose puts reach stoqd together, at its end: for a provider that
        receives messages in bursts (one system call and one wake-up of the supervisor
        per burst, not per message). Only the calling thread's puts are held, at most 16
        of them, and a put that has to wait for room in the queue first sends what is
        held, so no item waits in the provider while stoqd could be scanning it."""
        return self._endpoint.holding()

    def report(self, **stats: Any) -> None:
        """Publish provider statistics (JSON values) to ``stoqctl status``."""
        self._endpoint.send_raw(_encode({"t": "stats", "stats": stats}))

    def qsize(self) -> int:
        """Items put with a ``done`` callback and not yet reported back."""
        return self._pending

    def empty(self) -> bool:
        return self._pending == 0

    def full(self) -> bool:
        return False

    # -- internals ------------------------------------------------------------------

    def _content_frame(
        self, content: bytes, meta: Optional[PayloadMeta]
    ) -> tuple[Dict[str, Any], bytes]:
        header: Dict[str, Any] = {"meta": _meta_dict(meta or PayloadMeta())}
        if len(content) <= self._inline_max:
            header["kind"] = "bytes"
            return header, bytes(content)
        header["kind"] = "spool"
        header["path"] = self._spool(content)
        return header, b""

    def _spool(self, content: bytes) -> str:
        # Named after this process: what it spooled and never handed over (it died with
        # puts held by ``batched``) is found and removed by the supervisor when it ends.
        fd, path = tempfile.mkstemp(prefix=spool_prefix(os.getpid()), dir=self._spool_dir)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(content)
        except BaseException:  # the spool full: no half-written copy is left behind
            _unlink_quietly(path)
            raise
        return path

    def _send(
        self,
        header: Dict[str, Any],
        body: bytes,
        block: bool,
        timeout: Optional[float],
        done: Optional[DoneCallback],
        request_meta: Optional[RequestMeta],
        key: Optional[str] = None,
        redelivered: bool = True,
    ) -> None:
        if request_meta is not None:
            header["request"] = request_meta
        if key is not None and done is not None:  # without an outcome a key means nothing
            header["key"] = str(key)
            if not redelivered:
                header["first"] = True
        item_id = next(self._ids)  # an id a refused item leaves unused is never missed
        header["t"] = "item"
        header["id"] = item_id
        if done is not None:
            header["cb"] = True  # only then is the outcome sent back
        try:
            # Encoded before a credit is taken: an item that cannot be encoded costs none.
            raw = _encode(header)
        except BaseException:
            self._drop_spool(header)
            raise
        if self.stopping.is_set():
            # No new work during shutdown: the item stays with its source. A blocking put
            # waits for the SIGTERM that follows; a bounded one reports the queue full.
            self._endpoint.release_held()  # what was put before the stop still goes
            while block and timeout is None:
                time.sleep(3600)  # a plain put() never raises Full; the SIGTERM ends it
            if block:
                time.sleep(timeout or 0)
            self._refuse(header)
        if not self._take_credit(item_id, done):
            # Before waiting for room, the puts held back by ``batched`` go to stoqd: they
            # hold credits, and may be what it would scan while we wait.
            self._endpoint.release_held()
            if not self._wait_for_credit(item_id, done, block, timeout):
                self._refuse(header)
        self._endpoint.send_raw(raw, body)
        self.put_count += 1

    def _take_credit(self, item_id: int, done: Optional[DoneCallback]) -> bool:
        with self._lock:
            return self._spend_credit(item_id, done)

    def _wait_for_credit(
        self, item_id: int, done: Optional[DoneCallback], block: bool, timeout: Optional[float]
    ) -> bool:
        with self._lock:
            if block:
                self._lock.wait_for(lambda: self._credits > 0, timeout)
            return self._spend_credit(item_id, done)

    def _spend_credit(self, item_id: int, done: Optional[DoneCallback]) -> bool:
        """Under the lock: spend a credit on ``item_id`` if one is left, and register its
        ``done`` (before the item is sent: its outcome may come back at once)."""
        if self._credits <= 0:
            return False
        self._credits -= 1
        if done is not None:
            self._callbacks[item_id] = done
            self._pending += 1
        return True

    def _refuse(self, header: Dict[str, Any]) -> NoReturn:
        """The item does not enter the queue: drop its spool copy, tell the caller."""
        self._drop_spool(header)
        raise stdlib_queue.Full

    @staticmethod
    def _drop_spool(header: Dict[str, Any]) -> None:
        if header.get("kind") == "spool":
            _unlink_quietly(header["path"])

    def on_message(self, header: Dict[str, Any]) -> None:
        """Called by the reader thread for each message from the supervisor."""
        kind = header.get("t")
        if kind == "credit":
            count = int(header["n"])
            if count > 0:  # one wake-up for the whole batch, not one per credit
                with self._lock:
                    self._credits += count
                    self._lock.notify_all()
        elif kind == "done":
            self._complete(header["items"])
        elif kind == "stop":
            self.stopping.set()

    def _complete(self, outcomes: List[List[Any]]) -> None:
        """Deliver a batch of outcomes (``[id, status, error, scan_id]`` each) to the
        callbacks registered by ``put``; one failing callback does not stop the rest."""
        with self._lock:
            callbacks = [self._callbacks.pop(int(entry[0]), None) for entry in outcomes]
        delivered = 0
        try:
            for entry, callback in zip(outcomes, callbacks, strict=True):
                if callback is not None:
                    try:
                        callback(Outcome(entry[1], entry[2], entry[3]))
                    except Exception as exc:  # the provider's code
                        logs.get().error("done_callback_failed", error=childproc.one_line(exc))
                delivered += 1
        finally:
            # Only those delivered: after a SystemExit from a callback the rest stay
            # owed, so wait_idle does not report idle with outcomes never delivered.
            with self._lock:
                self._pending -= delivered
                if self._pending <= 0:
                    self._lock.notify_all()  # wait_idle

    def wait_idle(self) -> None:
        """Block until every item put has been reported back."""
        self._endpoint.release_held()
        with self._lock:
            while self._pending > 0:
                self._lock.wait(1.0)


def spool_prefix(pid: int) -> str:
    """How the names of the payloads process ``pid`` spools begin."""
    return f"payload-{pid}-"


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


# -- the worker side --------------------------------------------------------------------


class ItemError(Exception):
    """An item that cannot become a payload (unreadable file, bad reference)."""


def _payload_meta(header: Dict[str, Any]) -> PayloadMeta:
    meta = header.get("meta") or {}
    return PayloadMeta(
        should_archive=bool(meta.get("should_archive", True)),
        extra_data=dict(meta.get("extra_data") or {}),
        dispatch_to=list(meta.get("dispatch_to") or []),
    )


def read_file(path: str, max_size: int) -> bytes:
    """Read a regular file, refusing FIFOs, devices and files over ``max_size``."""
    try:
        # NOFOLLOW: a symlink swapped in after the provider checked the path is refused.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as exc:
        raise ItemError(f"cannot read {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ItemError(f"cannot read {path}: not a regular file")
        if max_size and info.st_size > max_size:
            raise ItemError(
                f"cannot read {path}: {info.st_size} bytes exceeds max_payload_size {max_size}"
            )
        with os.fdopen(fd, "rb", closefd=False) as handle:
            return handle.read()
    except OSError as exc:
        raise ItemError(f"cannot read {path}: {exc.strerror}") from None
    finally:
        os.close(fd)


def load_payload(
    header: Dict[str, Any],
    body: bytes,
    max_size: int,
    resolve: Callable[[Any], Payload],
) -> Payload:
    """Turn an item back into a payload: inline bytes, a spooled or local file, a reference."""
    kind = header.get("kind")
    if kind == "bytes":
        return Payload(body, _payload_meta(header))
    if kind in ("spool", "file"):
        # A spooled payload is stoqd's own copy: the scan applies max_payload_size to it
        # as to an inline one, rather than failing it with the spool file's name.
        content = read_file(header["path"], max_size if kind == "file" else 0)
        meta = _payload_meta(header)
        if kind == "file":
            meta.extra_data.setdefault("filename", os.path.basename(header["path"]))
            meta.extra_data.setdefault("path", header["path"])
        return Payload(content, meta)
    if kind == "ref":
        try:
            return resolve(header["ref"])
        except Exception as exc:  # archiver code, or a malformed reference
            raise ItemError(f"cannot resolve reference: {type(exc).__name__}: {exc}") from None
    raise ItemError(f"unknown item kind {kind!r}")


def request_meta_of(header: Dict[str, Any], default: Optional[RequestMeta]) -> RequestMeta:
    request = header.get("request")
    if not request:
        return default or RequestMeta()
    return RequestMeta(
        archive_payloads=bool(request.get("archive_payloads", True)),
        source=request.get("source"),
        extra_data=dict(request.get("extra_data") or {}),
    )


_SPOOL_LOCKS: List[int] = []  # held open (and flock'ed) for the supervisor's lifetime


def new_spool_dir(configured: str) -> str:
    """A private spool directory, on tmpfs when there is one.

    The supervisor holds a lock on it while it lives, so the next start can tell the
    spool of a daemon that was SIGKILLed (its payloads would otherwise sit in RAM until
    reboot) from the spool of one that is running, and removes the former.
    """
    parent = configured or ("/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir())
    os.makedirs(parent, exist_ok=True)
    _remove_stale_spools(parent)
    name = f"stoqd-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    path = os.path.abspath(os.path.join(parent, name))
    # Locked under a name no other start looks at, then renamed: another stoqd sharing
    # this directory from another PID namespace never sees it unlocked.
    hidden = os.path.join(parent, f".{name}")
    os.mkdir(hidden, 0o700)
    lock = os.open(hidden, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.rename(hidden, path)
    _SPOOL_LOCKS.append(lock)
    return path


def _remove_stale_spools(parent: str) -> None:
    """Remove our spools whose daemon is gone: unlocked, and its pid not running."""
    with os.scandir(parent) as entries:
        for entry in entries:
            parts = entry.name.split("-")
            if len(parts) != 3 or parts[0] != "stoqd" or not parts[1].isdigit():
                continue
            if not entry.is_dir(follow_symlinks=False) or _pid_alive(int(parts[1])):
                continue
            if entry.stat(follow_symlinks=False).st_uid != os.geteuid():
                continue
            try:
                fd = os.open(entry.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held: a live daemon's
            except OSError:
                continue
            finally:
                os.close(fd)
            shutil.rmtree(entry.path, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
