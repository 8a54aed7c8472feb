"""Handles the supervisor keeps for its children, and the items in its queue.

A handle holds what the supervisor knows about one child: its process, its channel,
its lifecycle state and counters. Handles do no I/O of their own beyond spawning and
signalling; the supervisor loop decides when.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, Iterator, List, Optional, Tuple

from .states import State
from .wire import Channel, encode_header, with_number


@dataclass
class Item:
    """One unit of work between its provider and its result."""

    seq: int  # the supervisor's own number for it
    provider: str
    generation: int  # which run of the provider put it; completions go only to that run
    item_id: int  # the provider's number for it
    header: Dict[str, Any]
    body: bytes
    attempts: int = 0  # workers that died while scanning it
    fail: Optional[str] = None  # set: record this failure instead of scanning
    # The provider's header as it arrived. The supervisor reads a few of its members but
    # changes none, so a worker gets these bytes with only ``seq`` appended, rather than
    # a header decoded and encoded again for every item.
    raw_header: bytes = b""
    # (generation, item id) of a later run's put with the same ``key``: this item's
    # outcome answers that put too (see Supervisor._adopt).
    adopted_by: Optional[Tuple[int, int]] = None

    @property
    def key(self) -> Optional[str]:
        """The source's identity for it (a message id), when the provider gave one."""
        key = self.header.get("key")
        return str(key) if key is not None and self.header.get("cb") else None

    def worker_header(self) -> bytes:
        """The encoded header a worker receives with ``body``."""
        if self.fail is None and self.raw_header:
            return with_number(self.raw_header, "seq", self.seq)
        header = dict(self.header, t="item", seq=self.seq)
        if self.fail is not None:
            header["fail"] = self.fail
        return encode_header(header)


# Descriptors a forkserver start opens at once: its connection and two pipes.
FORKSERVER_START_FDS = 5


def check_descriptor_room(count: int) -> None:
    """OSError (EMFILE) unless ``count`` more descriptors can be opened now.

    multiprocessing's forkserver start connects first and opens its two pipes after; a
    pipe that cannot be opened closes the connection with nothing sent, which ends the
    forkserver, and every child with it (they die with their parent). Failing here
    first leaves them running. (Another thread of this process, the metrics endpoint's,
    may take a descriptor in between: rare, and only ever one at a time.)
    """
    opened: List[int] = []
    try:
        for _ in range(count):
            opened.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
    except OSError as exc:  # as the socketpair's would read: not naming /dev/null
        raise OSError(exc.errno, exc.strerror) from None
    finally:
        for fd in opened:
            os.close(fd)


@contextlib.contextmanager
def _pair_for_child() -> Iterator[Tuple[socket.socket, socket.socket]]:
    """A socketpair (ours, theirs) for a child started in the block. Theirs is closed at
    the end (the child has its own copy); ours too if no child started (out of fds, the
    forkserver gone)."""
    ours, theirs = socket.socketpair()
    try:
        yield ours, theirs
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()


class Child:
    """A process with a private socketpair to the supervisor."""

    def __init__(self) -> None:
        self.process: Any = None
        self.channel: Optional[Channel] = None
        self.started_at = 0.0

    def spawn(self, ctx: Any, target: Callable[..., None], *args: Any) -> Channel:
        with _pair_for_child() as (ours, theirs):
            process = ctx.Process(target=target, args=(*args[:1], theirs, *args[1:]), daemon=False)
            check_descriptor_room(FORKSERVER_START_FDS)
            process.start()
        self.process = process
        self.channel = Channel(ours)
        self.started_at = time.monotonic()
        return self.channel

    @property
    def pid(self) -> Optional[int]:
        return self.process.pid if self.process is not None else None

    def alive(self) -> bool:
        return self.process is not None and self.process.exitcode is None

    def signal(self, signum: int) -> None:
        if self.alive():
            try:
                os.kill(self.process.pid, signum)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        self.signal(signal.SIGKILL)

    def reap(self) -> Optional[int]:
        """Collect the exit status of a dead process; close its channel."""
        self.process.join(timeout=0)
        code = self.process.exitcode
        if self.channel is not None:
            self.channel.close()
        return code  # type: ignore[no-any-return]


@dataclass
class ProviderHandle(Child):
    name: str = ""
    settings: Dict[str, Any] = field(default_factory=dict)
    state: State = State.STOPPED
    generation: int = 0
    failures: int = 0  # failed starts in a row
    restarts: int = 0
    ready_at: Optional[float] = None
    next_retry: Optional[float] = None
    last_error: Optional[str] = None
    put: int = 0
    saved: int = 0
    failed: int = 0
    credits: int = 0  # granted and not yet spent
    queued: int = 0  # its items waiting in the supervisor's queue
    # For a restarted run's redeliveries (see Supervisor._adopt): keyed items of earlier
    # runs still in flight (key -> seq); the keys this run and earlier runs saw saved
    # (key -> scan id, oldest first, bounded), whose acknowledgements may not have gone out.
    orphans: Dict[str, int] = field(default_factory=dict)
    saved_keys: OrderedDict[str, Optional[str]] = field(default_factory=OrderedDict)
    orphans_saved: OrderedDict[str, Optional[str]] = field(default_factory=OrderedDict)
    adopted: int = 0  # puts answered with an earlier run's outcome instead of a scan
    stats: Dict[str, Any] = field(default_factory=dict)
    restart_requested: bool = False
    stop_requested_at: Optional[float] = None  # when SIGTERM was sent (stop, reload, shutdown)

    def __post_init__(self) -> None:
        Child.__init__(self)


@dataclass
class WorkerHandle(Child):
    wid: int = 0
    ready: bool = False
    retiring_since: Optional[float] = None  # monotonic time it was told to exit
    config_generation: int = 0
    assigned: Deque[int] = field(default_factory=deque)  # item seqs, head being scanned
    current_since: float = 0.0
    payloads: int = 0
    rss: int = 0
    killed_for: Optional[str] = None  # why the supervisor killed it, if it did
    # Asked to give back the items waiting behind a slow scan, and not yet answered; and
    # when it last answered.
    asked_back: bool = False
    answered_at: float = 0.0

    def __post_init__(self) -> None:
        Child.__init__(self)
        # The worker reads its items from the channel only between scans, so asking for
        # items back goes over a socket of its own, which a thread in the worker watches.
        self.asks: Optional[socket.socket] = None

    def spawn(self, ctx: Any, target: Callable[..., None], *args: Any) -> Channel:
        with _pair_for_child() as (ours, theirs):
            channel = super().spawn(ctx, target, *args, theirs)
        ours.setblocking(False)
        self.asks = ours
        return channel

    def ask_back(self) -> None:
        """Ask for the items that wait behind its current one (answered ``given_back``)."""
        self.asked_back = True
        if self.asks is not None:
            with contextlib.suppress(OSError):  # a dead worker gives back everything anyway
                self.asks.send(b"?")

    def reap(self) -> Optional[int]:
        if self.asks is not None:
            self.asks.close()
        return super().reap()

    @property
    def retiring(self) -> bool:
        """Told to exit once it has finished what it holds (recycled, or stopping)."""
        return self.retiring_since is not None

    def retire(self) -> None:
        self.retiring_since = time.monotonic()


def describe_exit(code: Optional[int]) -> str:
    if code is None:
        return "running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit {code}"


def rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` from /proc (0 when unknown)."""
    try:
        with open(f"/proc/{pid}/statm", encoding="ascii") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
