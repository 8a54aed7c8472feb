"""The supervisor: one loop that owns every child, the work queue and the control socket.

Each turn of the loop waits on every child's socket and exit sentinel, the control
socket and a signal wake-up fd; then it handles what arrived, restarts providers whose
backoff has elapsed, enforces scan time limits, hands queued items to idle workers and
returns queue credits to providers. Signal handlers only record the signal.

Items flow provider -> supervisor queue -> worker -> supervisor -> provider (outcome).
The supervisor never blocks on a child: child sockets are non-blocking with buffers.
"""

from __future__ import annotations

import itertools
import math
import multiprocessing
import os
import selectors
import shutil
import signal
import socket
import time
from bisect import bisect_left
from collections import OrderedDict, deque
from typing import Any, Callable, Deque, Dict, Iterator, List, Optional, Tuple

from . import backoff, logs
from . import config as configuration
from .childproc import EXIT_BOOT
from .children import Child, Item, ProviderHandle, WorkerHandle, describe_exit, rss_bytes
from .control import server as control_server
from .control.protocol import ControlError
from .framework.core import Stoq
from .preflight import preflight
from .providerproc import provider_main
from .states import LIVE, Event, State, next_state
from .wire import Channel
from .workers import worker_main
from .workqueue import FAILED, NOT_DONE, SAVED, new_spool_dir, spool_prefix

# Bound when the daemon starts; a reload keeps their running values (and says so).
RESTART_ONLY = ("control_socket", "control_group", "spool_dir", "metrics_address")
# Items a worker holds: one scanning, the rest ready, so it never waits on us, not even
# while the loop naps (NAP). Never more than max_queue, though (a small queue says: keep
# little in flight), and never fewer than PREFETCH_MIN.
PREFETCH = 16
PREFETCH_MIN = 4
# While every worker holds at least half of PREFETCH, the loop pauses this long (seconds)
# before it looks at its sockets: the workers have about that much work in hand (8 small
# items), and the results, items and outcomes that gather meanwhile are handled in one
# turn. A busy loop otherwise turned for every two or three items, and its turns and the
# wake-ups they caused in every process cost 25-50 CPU microseconds per message with a
# broker, more than the naps cost in idle moments (the A/B runs in bench/README.md: 16
# with 1 ms beat 8 with 0.5 ms, and 16 or 32 with 2 ms).
NAP = 0.001
# How long the control socket goes unwatched after accepting a connection failed (out of
# descriptors), doubling while it keeps failing: a stoqctl waits in the backlog meanwhile.
CONTROL_PAUSE = 0.5
CONTROL_PAUSE_MAX = 8.0
# The shortest wait before starting a worker again after a start failed (backoff_initial
# may be 0, which suits a provider's startretries-bounded restarts, not an endless retry).
WORKER_RETRY_MIN = 0.1
# A scan running this long is slow: its worker gets nothing more, and gives back what waits
# behind it, for another worker (see _reclaim_behind_slow_scans). Far above the time an
# item takes to reach a worker, which the prefetch hides, so little is lost by waiting.
SLOW_SCAN = 0.1
RSS_CHECK_EVERY = 5.0
# Time limits, restarts, recycling, give-backs and the hooks are checked at most this often
# (seconds). A busy loop turns for every few items, a thousand times a second and more,
# and these checks were about a tenth of its work (py-spy); none needs to act sooner.
HOUSEKEEPING_EVERY = 0.01
# Keys of a provider's saved items kept for its next run's redeliveries (per provider, for
# the running and for earlier runs): a bound on memory, far above a broker's prefetch.
_SAVED_KEYS_KEPT = 10_000
HISTOGRAM_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 300.0)

log = logs.get("stoqd.supervisor")


class Supervisor:
    def __init__(
        self,
        stoq: Stoq,
        request_meta: Optional[Dict[str, Any]] = None,
        add_start_dispatch: Optional[List[str]] = None,
    ) -> None:
        self.stoq = stoq
        self.config = stoq.config
        self.spec = stoq.spec()
        self.request_meta = request_meta
        self.add_start_dispatch = list(add_start_dispatch or [])
        # forkserver: children start from a clean single-threaded server process, so
        # gRPC and pika clients created in a child are safe; Python 3.14 changes the
        # platform default, so it is chosen explicitly.
        self.ctx = multiprocessing.get_context("forkserver")
        self.ctx.set_forkserver_preload(["stoqd.providerproc", "stoqd.workers"])
        self.selector = selectors.DefaultSelector()
        self.providers: Dict[str, ProviderHandle] = {}
        self.workers: Dict[int, WorkerHandle] = {}
        self.queue: Deque[int] = deque()
        self.items: Dict[int, Item] = {}
        self.next_seq = 0
        self.next_wid = 0
        # Provider runs are numbered across all handles: a provider removed and re-added by
        # a reload gets a new handle, and its runs must not share numbers with the old one's.
        self.next_generation = 0
        self.config_generation = 0
        self.signals: Deque[int] = deque()
        self.stopping_since: Optional[float] = None
        self.exit_code = 0
        self.boot_failed: set[str] = set()  # providers FATAL because they could not load
        self.retired: List[ProviderHandle] = []  # removed by a reload, not yet exited
        self.started = time.monotonic()
        self.counters = {
            "worker_recycles": 0,
            "worker_kills": 0,
            "timeouts": 0,
            "quarantined": 0,
            "worker_deaths": 0,
            "items_given_back": 0,
            "worker_spawn_failures": 0,
        }
        # After a worker could not be started: why, how many times in a row, and when
        # the pool is filled again (see _fill_worker_pool).
        self.worker_spawn_error: Optional[str] = None
        self.worker_spawn_failures_in_a_row = 0
        self.next_worker_spawn = 0.0
        # While the control socket is not watched (out of descriptors): until when, and
        # how many accepts in a row failed.
        self.control_paused_until: Optional[float] = None
        self.control_accept_failures = 0
        self.scan_seconds: Dict[str, Dict[str, Any]] = {}  # see _record_timings
        self.last_rss_check = 0.0
        self.hooks: List[Any] = []  # objects with on_ready/on_tick/on_stopping/on_reload
        self.ready_sent = False
        self._housekeeping_at = 0.0  # when _loop's checks of time and hooks run next
        self._housekeeping_skipped = False
        self._apply_settings()

    # -- settings ---------------------------------------------------------------------

    def _apply_settings(self) -> None:
        values = self.config.values
        self.max_queue = max(1, values["core"]["max_queue"])
        self.prefetch = min(PREFETCH, max(PREFETCH_MIN, self.max_queue))
        self.n_workers = self.config.workers()
        self.daemon = dict(values["stoqd"])
        self.spool_dir = getattr(self, "spool_dir", None) or new_spool_dir(self.daemon["spool_dir"])
        self.child_settings = {
            "log_level": values["core"]["log_level"],
            "log_syntax": values["core"]["log_syntax"],
            "inline_max_bytes": self.daemon["inline_max_bytes"],
            "spool_dir": self.spool_dir,
            "request_meta": self.request_meta,
            "add_start_dispatch": self.add_start_dispatch,
        }

    # -- lifecycle --------------------------------------------------------------------

    def run(self) -> int:
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(signum, self._record_signal)
        self.selector.register(wake_r, selectors.EVENT_READ, lambda _: _drain(wake_r))
        path = str(self.config.resolve_path(self.daemon["control_socket"]))
        try:
            self.control = control_server.listen(path, self.daemon["control_group"])
        except BaseException:  # e.g. SocketInUse: _cleanup below never runs
            shutil.rmtree(self.spool_dir, ignore_errors=True)
            raise
        self.control_path = path
        self.selector.register(self.control, selectors.EVENT_READ, self._on_control_accept)
        log.info(
            "starting",
            pid=os.getpid(),
            workers=self.n_workers,
            providers=list(self.stoq.core("providers")),
            control_socket=path,
        )
        try:
            self._fill_worker_pool(time.monotonic())
            for name in self.stoq.core("providers"):
                handle = ProviderHandle(name=name, settings=self.config.supervision(name))
                self.providers[name] = handle
                if handle.settings["autostart"]:
                    self._start_provider(handle)
            self._loop()
        finally:
            self._cleanup(path)
            signal.set_wakeup_fd(-1)
        log.info("exited", exit=self.exit_code)
        return self.exit_code

    def _loop(self) -> None:
        while True:
            if self._workers_well_fed():
                time.sleep(NAP)
            for key, mask in self.selector.select(self._timeout()):
                key.data(mask)
            now = time.monotonic()
            self._handle_signals()
            self._housekeeping_skipped = now < self._housekeeping_at
            if not self._housekeeping_skipped:
                self._housekeeping_at = now + HOUSEKEEPING_EVERY
                self._restart_due(now)
                if self.worker_spawn_error is not None:
                    self._fill_worker_pool(now)
                self._resume_control(now)
                self._enforce_time_limits(now)
                self._recycle_workers(now)
                for hook in self.hooks:
                    hook.on_tick(self)
            self._dispatch(now)
            if not self._housekeeping_skipped:
                # After dispatch: a worker still idle now has nothing in the queue to take.
                self._reclaim_behind_slow_scans(now)
            self._refill_credits()
            self._update_write_interest()
            if not self.ready_sent and self._all_up():
                self.ready_sent = True
                log.info("ready", workers=len(self.workers), providers=len(self.providers))
                for hook in self.hooks:
                    hook.on_ready(self)
            if self._finished(now):
                return

    def _timeout(self) -> float:
        """Seconds until the next deadline the loop acts on, at most one. One pass, as it
        runs every turn: for every few items when busy."""
        now = time.monotonic()
        if self._housekeeping_skipped:
            # What this turn left unchecked (a condition an event made true, a deadline
            # passed meanwhile) is checked at the next housekeeping, and nothing sooner.
            return max(0.0, self._housekeeping_at - now)
        soonest = now + 1.0
        if self.stopping_since is None:  # nothing restarts while stopping
            for handle in self.providers.values():
                if handle.next_retry and handle.next_retry < soonest:
                    soonest = handle.next_retry
            if self.worker_spawn_error is not None and now < self.next_worker_spawn < soonest:
                soonest = self.next_worker_spawn
        if self.control_paused_until is not None and self.control_paused_until < soonest:
            soonest = self.control_paused_until
        soonest = min(soonest, self._next_kill_due(now))
        limit = self.daemon["scan_timeout"]
        for worker in self.workers.values():
            if not worker.assigned or worker.killed_for is not None:
                continue  # a killed worker's deadline has passed: its exit ends the wait
            if limit and worker.current_since + limit < soonest:
                soonest = worker.current_since + limit
            due = self._reclaim_due(worker)
            # One already due waits for a worker free to take its items (an event).
            if due is not None and now < due < soonest:
                soonest = due
        return max(0.0, soonest - now, self._housekeeping_at - now)

    def _next_kill_due(self, now: float) -> float:
        """When the next child out of its ``graceful_timeout`` is due a SIGKILL, so that
        it comes on time rather than up to a second late; ``inf`` when none is ahead."""
        # Just past it, as a deadline counts once passed; one already past is acted on at
        # the next housekeeping and must not wake the loop again and again meanwhile.
        due = (deadline + 0.001 for deadline, _ in self._grace_deadlines())
        return min((d for d in due if d > now), default=math.inf)

    def _grace_deadlines(self) -> Iterator[Tuple[float, Child]]:
        """(deadline, child): each child that is SIGKILLed once its ``graceful_timeout``
        has passed, if it is still there. Both the kill and the loop's wake-up for it
        come from here (``_enforce_time_limits``, ``_next_kill_due``)."""
        grace = self.daemon["graceful_timeout"]
        for handle in self._all_providers():  # SIGTERMed (stop, reload, shutdown)
            asked = handle.stop_requested_at
            if handle.state is State.STOPPING and asked is not None and handle.alive():
                yield asked + grace, handle
        if self.stopping_since is not None:
            # Shutdown: whatever is still running had its grace period.
            for worker in self.workers.values():
                if worker.alive() and worker.killed_for is None:
                    yield self.stopping_since + grace, worker
            for handle in self._all_providers():
                if handle.alive():
                    yield self.stopping_since + grace, handle
            return
        # A recycled worker holding nothing that does not leave (a plugin's thread keeps
        # it alive) would block every later recycling, and with a payload budget the pool
        # with it. (While stopping, the shutdown's grace period above applies.)
        for worker in self.workers.values():
            since = worker.retiring_since
            if since is not None and not worker.assigned and worker.killed_for is None:
                yield since + grace, worker

    def _workers_well_fed(self) -> bool:
        """Whether every worker holds half of PREFETCH or more (see NAP): never when a
        small max_queue lowers the prefetch, nor while stopping, when every turn counts.
        (After a reload lowers it, workers may still hold more until they drain.)"""
        if self.stopping_since is not None or not self.workers or self.prefetch < PREFETCH:
            return False
        held = PREFETCH // 2
        return all(len(worker.assigned) >= held for worker in self.workers.values())

    def _all_up(self) -> bool:
        # (A pool short of workers that could not be started is not up.)
        workers = self.workers.values()
        workers_up = self._pool_size() >= self.n_workers and all(w.ready for w in workers)
        providers_up = all(p.state is not State.STARTING for p in self.providers.values())
        return workers_up and providers_up

    # -- signals ----------------------------------------------------------------------

    def _record_signal(self, signum: int, frame: Any) -> None:
        self.signals.append(signum)  # nothing else here: the loop acts on it

    def _handle_signals(self) -> None:
        while self.signals:
            signum = self.signals.popleft()
            if signum in (signal.SIGTERM, signal.SIGINT):
                self.begin_shutdown(f"signal {signal.Signals(signum).name}")
            elif signum == signal.SIGHUP:
                self.reload()

    # -- providers --------------------------------------------------------------------

    def _start_provider(self, handle: ProviderHandle) -> None:
        self.next_generation += 1
        handle.generation = self.next_generation
        self.boot_failed.discard(handle.name)
        handle.state = next_state(handle.state, Event.START)
        handle.next_retry = None
        handle.ready_at = None
        handle.stop_requested_at = None
        handle.credits = 0
        try:
            channel = handle.spawn(
                self.ctx, provider_main, handle.name, self.spec, self.child_settings
            )
        except SPAWN_ERRORS as exc:
            # Out of descriptors (see _spawn_worker): a failed start, backed off and
            # retried as a crash is (FATAL after startretries), not the end of the daemon.
            handle.last_error = f"cannot start its process: {_spawn_error(exc)}"
            self._provider_crashed(handle, "not started", time.monotonic())
            return
        channel.on_close = self._forget
        self.selector.register(
            channel, selectors.EVENT_READ, lambda _, h=handle: self._on_provider_readable(h)
        )
        self.selector.register(
            handle.process.sentinel,
            selectors.EVENT_READ,
            lambda _, h=handle: self._on_provider_exit(h),
        )
        log.info(
            "spawned", provider=handle.name, child_pid=handle.pid, generation=handle.generation
        )

    def _on_provider_readable(self, handle: ProviderHandle) -> None:
        assert handle.channel is not None
        frames = handle.channel.receive_frames()
        if frames is None:
            self._unregister(handle.channel)
            return
        for header, raw, body in frames:
            self._on_provider_message(handle, header, body, raw)

    def _on_provider_message(
        self, handle: ProviderHandle, header: Dict[str, Any], body: bytes, raw: bytes = b""
    ) -> None:
        kind = header.get("t")
        if kind == "item":
            self._enqueue(handle, header, body, raw)
        elif kind == "ready":
            handle.state = next_state(handle.state, Event.READY)
            handle.ready_at = time.monotonic()
            log.info("running", provider=handle.name, child_pid=handle.pid)
        elif kind == "stats":
            handle.stats = dict(header.get("stats") or {})
        elif kind == "exhausted":
            if handle.state in (State.STARTING, State.RUNNING):
                handle.state = next_state(handle.state, Event.RETURNED)
                log.info("exhausted", provider=handle.name, put=handle.put)
        elif kind in ("boot_failed", "crashed"):
            handle.last_error = str(header.get("error"))

    def _enqueue(
        self, handle: ProviderHandle, header: Dict[str, Any], body: bytes, raw: bytes
    ) -> None:
        item_id = int(header.pop("id"))
        header.pop("t", None)
        if (handle.orphans or handle.orphans_saved) and header.get("cb"):
            key = header.get("key")
            # "first": the source says this is no redelivery (a reused message id).
            if key is not None and not header.get("first"):
                if self._adopt(handle, str(key), item_id):
                    self._drop_spool(header)  # never scanned: its spooled copy goes now
                    return
        self.next_seq += 1
        item = Item(
            self.next_seq, handle.name, handle.generation, item_id, header, body, raw_header=raw
        )
        self.items[item.seq] = item
        self.queue.append(item.seq)
        handle.credits = max(0, handle.credits - 1)
        handle.queued += 1
        handle.put += 1

    def _adopt(self, handle: ProviderHandle, key: str, item_id: int) -> bool:
        """Answer a restarted provider's put with its earlier run's item of the same key.

        A provider killed after handing over a message may not have acknowledged it (its
        results were not saved yet, or the acknowledgement had not gone out), so its
        source delivers the message again to the next run. Scanning it twice would save
        two results for one message; instead the new put gets the outcome of the item
        already saved, or of the one still queued or being scanned when it ends.
        """
        if key in handle.orphans_saved:
            scan_id = handle.orphans_saved.pop(key)
            self._send_done(handle, item_id, SAVED, None, scan_id)
            _remember(handle.saved_keys, key, scan_id)  # in case this run dies before its ack
        elif key in handle.orphans:
            orphan = self.items.get(handle.orphans.pop(key))
            if orphan is None:
                return False
            orphan.adopted_by = (handle.generation, item_id)
        else:
            return False
        handle.credits = max(0, handle.credits - 1)
        handle.adopted += 1  # not in ``put``: it never entered the queue
        log.info("adopted", provider=handle.name, key=key)
        return True

    def _orphan_items(self, handle: ProviderHandle, clean_exit: bool) -> None:
        """Remember the keyed items of a provider run that ended, for its next run.

        Its items still in flight can no longer tell it how they ended, whatever the
        exit. What it saw saved it acknowledged when ``ingest`` returned (a provider
        drains its outcomes first); after a crash, a kill or a stop, some
        acknowledgements may not have gone out, and those messages come back.
        """
        if not clean_exit:
            for key, scan_id in handle.saved_keys.items():
                _remember(handle.orphans_saved, key, scan_id)
        handle.saved_keys.clear()
        for seq, item in self.items.items():
            if item.provider != handle.name or item.key is None:
                continue
            # A handle re-added by a reload under the same name numbers its runs after
            # this one's: its items, and what its runs adopted, are not this handle's.
            if item.generation > handle.generation:
                continue
            if item.adopted_by is not None and item.adopted_by[0] != handle.generation:
                continue
            item.adopted_by = None  # an adoption by the run that just ended is void
            handle.orphans[item.key] = seq

    def _on_provider_exit(self, handle: ProviderHandle) -> None:
        self.selector.unregister(handle.process.sentinel)
        self.retired = [h for h in self.retired if h is not handle]
        if handle.channel is not None and not handle.channel.closed:
            self._on_provider_readable(handle)  # what it said before dying still counts
            self._unregister(handle.channel)
        code = handle.reap()
        self._sweep_spool(handle.pid)
        # A SIGTERM ends a provider with exit 0 too, but before it has acknowledged every
        # outcome sent to it: only an ingest that returned (and drained) is clean.
        self._orphan_items(handle, clean_exit=code == 0 and handle.stop_requested_at is None)
        now = time.monotonic()
        how = describe_exit(code)
        if handle.state is State.STOPPING:
            handle.state = next_state(handle.state, Event.EXITED)
            log.info("stopped", provider=handle.name, exit=how)
            if handle.restart_requested and self.stopping_since is None:
                handle.restart_requested = False
                handle.restarts += 1
                self._start_provider(handle)
        elif handle.state is State.EXHAUSTED:
            log.info("exited", provider=handle.name, exit=how, reason="exhausted")
        elif code == EXIT_BOOT:
            handle.state = next_state(handle.state, Event.BOOT_FAILED)
            self.boot_failed.add(handle.name)
            log.error(
                "fatal",
                provider=handle.name,
                error=handle.last_error,
                reason="cannot load the plugin",
            )
        elif code == 0:
            handle.state = next_state(handle.state, Event.RETURNED)
            log.info("exhausted", provider=handle.name, put=handle.put)
        else:
            self._provider_crashed(handle, how, now)

    def _provider_crashed(self, handle: ProviderHandle, how: str, now: float) -> None:
        settings = handle.settings
        stayed_up = handle.ready_at is not None and now - handle.ready_at >= settings["startsecs"]
        handle.failures = 1 if stayed_up else handle.failures + 1
        handle.last_error = handle.last_error or how
        handle.state = next_state(
            handle.state,
            Event.CRASHED,
            failures=handle.failures,
            startretries=settings["startretries"],
        )
        if handle.state is State.FATAL:
            log.error(
                "fatal",
                provider=handle.name,
                exit=how,
                failures=handle.failures,
                error=handle.last_error,
            )
            return
        handle.next_retry = backoff.retry_at(
            now, handle.failures, settings["backoff_initial"], settings["backoff_max"]
        )
        log.warning(
            "backoff",
            provider=handle.name,
            exit=how,
            error=handle.last_error,
            retry_in=round(handle.next_retry - now, 3),
        )

    def _restart_due(self, now: float) -> None:
        for handle in self.providers.values():
            if handle.state is State.RUNNING and handle.failures and handle.ready_at is not None:
                if now - handle.ready_at >= handle.settings["startsecs"]:
                    handle.failures = 0  # it stayed up: past failures are forgiven
            if handle.state is State.BACKOFF and handle.next_retry is not None:
                if now >= handle.next_retry and self.stopping_since is None:
                    handle.restarts += 1
                    handle.last_error = None
                    self._start_provider(handle)

    def _refill_credits(self) -> None:
        if self.stopping_since is not None:
            return
        share = max(1, self.max_queue // max(1, len(self.providers)))
        for handle in self.providers.values():
            if handle.channel is None or not handle.channel.reachable:
                continue
            if handle.state not in (State.STARTING, State.RUNNING):
                continue
            want = share - handle.queued - handle.credits
            # Credits go back in batches, not one message per item.
            if want >= max(1, share // 4) or (want > 0 and handle.queued + handle.credits == 0):
                handle.credits += want
                handle.channel.send({"t": "credit", "n": want})

    # -- workers ----------------------------------------------------------------------

    def _fill_worker_pool(self, now: float) -> None:
        """Start workers until the pool has ``workers`` that are not retiring; after one
        could not be started, not before the retry is due (backoff_initial, backoff_max)."""
        if self.stopping_since is not None or now < self.next_worker_spawn:
            return
        while self._pool_size() < self.n_workers:
            if self._spawn_worker() is None:
                return
        # Full: an error left by a recycling whose replacement could not start is past,
        # should that recycling no longer be wanted (its backoff stays until one starts).
        self.worker_spawn_error = None

    def _pool_size(self) -> int:
        return len([w for w in self.workers.values() if not w.retiring])

    def _staying(self) -> int:
        """Workers that will stay in the pool: neither retiring nor killed (for its
        scan_timeout; its replacement starts once its exit is handled). Only beyond
        ``workers`` of them is one surplus, to be retired without a replacement."""
        return len([w for w in self.workers.values() if not w.retiring and w.killed_for is None])

    def _spawn_worker(self) -> Optional[WorkerHandle]:
        """A new worker, or None when no process could be started (logged, retried).

        See SPAWN_ERRORS for what a start can run into.
        """
        worker = WorkerHandle(wid=self.next_wid + 1, config_generation=self.config_generation)
        try:
            channel = worker.spawn(
                self.ctx, worker_main, worker.wid, self.spec, self.child_settings
            )
        except SPAWN_ERRORS as exc:
            self._worker_spawn_failed(exc)
            return None
        self.next_wid = worker.wid
        channel.on_close = self._forget
        self.workers[worker.wid] = worker
        self.selector.register(
            channel, selectors.EVENT_READ, lambda _, w=worker: self._on_worker_readable(w)
        )
        self.selector.register(
            worker.process.sentinel,
            selectors.EVENT_READ,
            lambda _, w=worker: self._on_worker_exit(w),
        )
        log.info("spawned", worker=worker.wid, child_pid=worker.pid)
        if self._pool_size() >= self.n_workers:  # the backoff grows until the pool is whole
            self.worker_spawn_error = None
            self.worker_spawn_failures_in_a_row = 0
        return worker

    def _worker_spawn_failed(self, exc: BaseException) -> None:
        now = time.monotonic()
        self.counters["worker_spawn_failures"] += 1
        self.worker_spawn_failures_in_a_row += 1
        self.worker_spawn_error = f"cannot start a worker process: {_spawn_error(exc)}"
        retry = backoff.retry_at(
            now,
            self.worker_spawn_failures_in_a_row,
            self.daemon["backoff_initial"],
            self.daemon["backoff_max"],
        )
        self.next_worker_spawn = max(now + WORKER_RETRY_MIN, retry)
        log.error(
            "spawn_failed",
            error=self.worker_spawn_error,
            workers=self._pool_size(),
            retry_in=round(self.next_worker_spawn - now, 3),
        )

    def _on_worker_readable(self, worker: WorkerHandle) -> None:
        assert worker.channel is not None
        messages = worker.channel.receive()
        if messages is None:
            self._unregister(worker.channel)
            return
        for header, _body in messages:
            self._on_worker_message(worker, header)

    def _on_worker_message(self, worker: WorkerHandle, header: Dict[str, Any]) -> None:
        kind = header.get("t")
        if kind == "ready":
            worker.ready = True
            log.info("running", worker=worker.wid, child_pid=worker.pid)
        elif kind == "result":
            seq = int(header["seq"])
            if worker.assigned and worker.assigned[0] == seq:
                worker.assigned.popleft()
            worker.current_since = time.monotonic()
            # A new scan: it may be asked again (an answer still on its way does no harm:
            # it gives back only what the worker had not started).
            worker.asked_back = False
            worker.payloads += 1
            self._record_timings(header.get("timings") or {})
            item = self.items.pop(seq, None)
            if item is not None:
                self._finish(item, header["status"], header.get("error"), header.get("scan_id"))
        elif kind == "given_back":
            self._take_back(worker, header.get("seqs"))
        elif kind == "boot_failed":
            log.error("fatal", worker=worker.wid, error=header.get("error"))
            self.exit_code = EXIT_BOOT
            self.begin_shutdown("a worker cannot load the scan plugins")

    def _on_worker_exit(self, worker: WorkerHandle) -> None:
        self.selector.unregister(worker.process.sentinel)
        if worker.channel is not None and not worker.channel.closed:
            self._on_worker_readable(worker)  # results it sent before dying still count
            self._unregister(worker.channel)
        code = worker.reap()
        del self.workers[worker.wid]
        expected = worker.retiring or self.stopping_since is not None
        if not expected or worker.assigned:
            self.counters["worker_deaths"] += 1
            log.warning(
                "exited",
                worker=worker.wid,
                exit=describe_exit(code),
                items=len(worker.assigned),
                reason=worker.killed_for,
            )
        else:
            log.info("exited", worker=worker.wid, exit=describe_exit(code))
        self._requeue_from(worker)
        if code != EXIT_BOOT:
            self._fill_worker_pool(time.monotonic())

    def _reclaim_behind_slow_scans(self, now: float) -> None:
        """Ask each worker whose scan has run past SLOW_SCAN for the items behind it, when
        another worker is idle and could take them now.

        Prefetched items would otherwise wait for as long as that scan runs (up to
        scan_timeout), unacknowledged by their source while other workers idle; with a
        broker's small prefetch they can stop its deliveries altogether. Not while
        stopping: items behind a scan then finish with it, or are reported not done.
        """
        if self.stopping_since is not None:
            return
        for worker in self.workers.values():
            due = self._reclaim_due(worker)
            if due is not None and now >= due and self._another_is_idle(worker, now):
                worker.ask_back()

    def _reclaim_due(self, worker: WorkerHandle) -> Optional[float]:
        """When to ask ``worker`` for the items behind its scan; None: not to."""
        if len(worker.assigned) < 2 or worker.asked_back or worker.killed_for is not None:
            return None
        # After an answer, again only as long after it: what was still on its way to the
        # worker then may have arrived since.
        return max(worker.current_since, worker.answered_at) + SLOW_SCAN

    def _another_is_idle(self, worker: WorkerHandle, now: float) -> bool:
        # Idle, not merely with room: a busy worker's own items would come first, and
        # scans near SLOW_SCAN would bounce items between busy workers.
        return any(
            other is not worker and other.ready and not other.assigned
            and self._takes_more(other, now)
            for other in self.workers.values()
        )  # fmt: skip

    def _take_back(self, worker: WorkerHandle, seqs: Any) -> None:
        """Put the items a worker gave back, unscanned, at the front of the queue; or,
        when the answer comes after a shutdown began, back to their sources, as
        ``begin_shutdown`` did with the queue."""
        worker.asked_back = False
        worker.answered_at = time.monotonic()
        given = {seq for seq in seqs if isinstance(seq, int)} if isinstance(seqs, list) else set()
        back = [seq for seq in worker.assigned if seq in given]
        if not back:
            return
        resend: List[int] = []
        if self.stopping_since is None:
            # Never more waiting than max_queue: what has no room goes back to the worker
            # (new puts may have taken the room meanwhile), in its order.
            room = max(0, self.max_queue - len(self.queue))
            back, resend = back[:room], back[room:]
        returned = set(back)
        worker.assigned = deque(seq for seq in worker.assigned if seq not in returned)
        assert worker.channel is not None
        for seq in resend:
            kept = self.items[seq]
            worker.channel.send_raw(kept.worker_header(), kept.body)
        self.counters["items_given_back"] += len(back)
        if self.stopping_since is None:
            self._put_back(back)
            return
        for seq in back:
            item = self.items.pop(seq, None)
            if item is not None:
                self._finish(item, NOT_DONE, "daemon stopped before it was scanned", None)

    def _put_back(self, seqs: List[int]) -> None:
        """Queue ``seqs`` again, in their order, ahead of everything waiting."""
        for seq in reversed(seqs):
            item = self.items.get(seq)
            if item is None:
                continue
            self.queue.appendleft(seq)
            if item.provider in self.providers:
                self.providers[item.provider].queued += 1

    def _requeue_from(self, worker: WorkerHandle) -> None:
        """Put a dead worker's items back at the front of the queue, in order."""
        back: List[int] = []
        for position, seq in enumerate(worker.assigned):
            item = self.items.get(seq)
            if item is None:
                continue
            if position == 0 and worker.killed_for == "timeout":
                item.fail = f"payload timed out after {self.daemon['scan_timeout']:g}s"
                self.counters["timeouts"] += 1
            elif position == 0 and item.fail is None:
                item.attempts += 1  # it was being scanned when the worker died
                if item.attempts >= max(1, self.daemon["max_attempts"]):
                    item.fail = f"quarantined: killed {item.attempts} workers while being scanned"
                    self.counters["quarantined"] += 1
                    log.error(
                        "quarantined", provider=item.provider, seq=item.seq, attempts=item.attempts
                    )
            if self.stopping_since is not None and item.fail is None:
                self._finish(self.items.pop(seq), NOT_DONE, "daemon stopped", None)
                continue
            back.append(seq)
        worker.assigned.clear()
        self._put_back(back)

    def _dispatch(self, now: float) -> None:
        if not self.queue:
            return
        idle = [w for w in self.workers.values() if w.ready and self._takes_more(w, now)]
        while self.queue and idle:
            worker = min(idle, key=lambda w: len(w.assigned))
            seq = self.queue.popleft()
            item = self.items[seq]
            if item.provider in self.providers:
                self.providers[item.provider].queued -= 1
            if not worker.assigned:
                worker.current_since = now
            worker.assigned.append(seq)
            if not self._takes_more(worker, now):
                idle.remove(worker)
            assert worker.channel is not None
            worker.channel.send_raw(item.worker_header(), item.body)

    def _takes_more(self, worker: WorkerHandle, now: float) -> bool:
        """Whether ``worker`` may be handed another item: alive and reachable, not
        retiring, room in its prefetch, no slow scan running or items being given back,
        and (with ``worker_max_payloads``) items left in its budget, so that it never
        scans more than that even while another worker's recycling delays its own. While
        stopping no replacement comes: no budget then."""
        channel = worker.channel
        if worker.retiring or worker.killed_for is not None:
            return False
        if len(worker.assigned) >= self.prefetch:
            return False
        if worker.assigned and (worker.asked_back or now - worker.current_since > SLOW_SCAN):
            return False
        if channel is None or not channel.reachable:
            return False
        budget = self.daemon["worker_max_payloads"]
        return (
            not budget
            or self.stopping_since is not None
            or worker.payloads + len(worker.assigned) < budget
        )

    def _enforce_time_limits(self, now: float) -> None:
        limit = self.daemon["scan_timeout"]
        for worker in self.workers.values():
            if limit and worker.assigned and worker.killed_for is None:
                if now - worker.current_since > limit:
                    worker.killed_for = "timeout"
                    self.counters["worker_kills"] += 1
                    log.error("timeout", worker=worker.wid, child_pid=worker.pid, limit=limit)
                    worker.kill()
        # Listed first: a kill changes what the generator would yield next.
        for deadline, child in list(self._grace_deadlines()):
            if now > deadline:
                if isinstance(child, WorkerHandle):
                    child.killed_for = "graceful_timeout"
                child.kill()
        if self.stopping_since is not None and not self.items:
            if now - self.stopping_since <= self.daemon["graceful_timeout"]:
                self._stop_children()

    def _recycle_workers(self, now: float) -> None:
        if self.stopping_since is not None:
            return
        max_payloads = self.daemon["worker_max_payloads"]
        max_rss = self.daemon["worker_max_rss"]
        check_rss = max_rss and now - self.last_rss_check >= RSS_CHECK_EVERY
        if check_rss:
            self.last_rss_check = now
        for worker in self.workers.values():
            if check_rss and worker.pid:
                worker.rss = rss_bytes(worker.pid)
        if any(w.retiring for w in self.workers.values()):
            return  # one at a time, so the pool never empties
        if now < self.next_worker_spawn:
            return  # a replacement could not be started: not before its retry is due
        for worker in self.workers.values():
            reason = None
            if worker.config_generation != self.config_generation:
                reason = "reload"
            elif max_payloads and worker.payloads >= max_payloads:
                reason = "payloads"
            elif max_rss and worker.rss > max_rss:
                reason = "memory"
            if reason and worker.ready:
                self._retire(worker, reason)
                return

    def _retire(self, worker: WorkerHandle, reason: str) -> None:
        # The replacement starts before the old one leaves; if none can start, the old
        # one keeps working. A pool larger than ``workers`` (a reload lowered it) loses
        # the worker without a replacement, one at a time, and never empties.
        if self._staying() <= self.n_workers and self._spawn_worker() is None:
            return
        worker.retire()
        self.counters["worker_recycles"] += 1
        log.info(
            "recycling", worker=worker.wid, reason=reason, payloads=worker.payloads, rss=worker.rss
        )
        assert worker.channel is not None
        worker.channel.send({"t": "exit"})  # after the items it already holds

    def _record_timings(self, timings: Dict[str, float]) -> None:
        # One count per scan, in the bucket it falls in (the last slot: above every
        # bound); ``scan_histograms`` makes them cumulative when somebody asks.
        for plugin, seconds in timings.items():
            histogram = self.scan_seconds.get(plugin)
            if histogram is None:
                histogram = self.scan_seconds[plugin] = {
                    "counts": [0] * (len(HISTOGRAM_BUCKETS) + 1),
                    "sum": 0.0,
                }
            histogram["sum"] += seconds
            histogram["counts"][bisect_left(HISTOGRAM_BUCKETS, seconds)] += 1

    def scan_histograms(self) -> Dict[str, Dict[str, Any]]:
        """Scan seconds per plugin as Prometheus counts them: ``counts[i]`` scans took at
        most ``buckets[i]``, and ``count`` includes those above the last bound."""
        histograms = {}
        for plugin, histogram in self.scan_seconds.items():
            cumulative = list(itertools.accumulate(histogram["counts"]))
            histograms[plugin] = {
                "buckets": list(HISTOGRAM_BUCKETS),
                "counts": cumulative[:-1],
                "sum": histogram["sum"],
                "count": cumulative[-1],
            }
        return histograms

    # -- outcomes ---------------------------------------------------------------------

    def _finish(
        self, item: Item, status: str, error: Optional[str], scan_id: Optional[str]
    ) -> None:
        handle = self.providers.get(item.provider)
        self._drop_spool(item.header)
        if status == FAILED:
            log.warning("failed", provider=item.provider, seq=item.seq, error=error)
        if handle is None:
            return
        if status == SAVED:
            handle.saved += 1
        elif status == FAILED:
            handle.failed += 1
        if not item.header.get("cb"):
            return  # the provider did not ask to hear how it ended
        # The run that put it may be dead even before a restart bumps the generation.
        channel = handle.channel
        if handle.generation == item.generation and channel is not None and channel.reachable:
            self._send_done(handle, item.item_id, status, error, scan_id)
            if status == SAVED and item.key is not None:
                _remember(handle.saved_keys, item.key, scan_id)
        elif item.key is not None:
            self._finish_orphan(handle, item, status, error, scan_id)

    def _drop_spool(self, header: Dict[str, Any]) -> None:
        if header.get("kind") == "spool":
            path = str(header.get("path", ""))
            # Only ever delete inside our own spool, whatever a provider's header says.
            if os.path.dirname(os.path.abspath(path)) == self.spool_dir:
                _unlink(path)

    def _sweep_spool(self, pid: Optional[int]) -> None:
        """Remove the payloads a provider process that ended spooled but never handed
        over: puts it held back (``queue.batched``) when it died, or a copy it was still
        writing. Those it did hand over are items, and go when they end."""
        if pid is None:
            return
        prefix = spool_prefix(pid)
        in_use = {
            os.path.abspath(str(item.header.get("path")))
            for item in self.items.values()
            if item.header.get("kind") == "spool"
        }
        try:
            with os.scandir(self.spool_dir) as entries:
                left = [e.path for e in entries if e.name.startswith(prefix)]
        except OSError:
            return
        for path in left:
            if path not in in_use:
                _unlink(path)

    def _finish_orphan(
        self, handle: ProviderHandle, item: Item, status: str, error: Optional[str],
        scan_id: Optional[str],
    ) -> None:  # fmt: skip
        """An earlier run's item ended: answer its adopter, or keep a saved key."""
        key = item.key
        assert key is not None
        if handle.orphans.get(key) == item.seq:
            del handle.orphans[key]
        adopter = item.adopted_by
        if adopter is not None and adopter[0] != handle.generation:
            adopter = None  # adopted by a run that has ended since, or by another handle's
        if adopter is not None:
            self._send_done(handle, adopter[1], status, error, scan_id)
        if status == SAVED:
            _remember(handle.saved_keys if adopter else handle.orphans_saved, key, scan_id)

    @staticmethod
    def _send_done(
        handle: ProviderHandle, item_id: int, status: str, error: Optional[str],
        scan_id: Optional[str],
    ) -> None:  # fmt: skip
        channel = handle.channel
        if channel is not None and not channel.closed:
            # The outcomes of one turn travel as one frame (see ProviderQueue.on_message).
            channel.send_in_batch("done", [item_id, status, error, scan_id])

    # -- shutdown ---------------------------------------------------------------------

    def begin_shutdown(self, reason: str) -> None:
        if self.stopping_since is not None:
            return
        self.stopping_since = time.monotonic()
        log.info(
            "stopping",
            reason=reason,
            queued=len(self.queue),
            in_flight=len(self.items) - len(self.queue),
        )
        for hook in self.hooks:
            hook.on_stopping(self)
        for handle in self.providers.values():
            if handle.channel is not None:
                handle.channel.send({"t": "stop"})
            if handle.state is State.BACKOFF:
                handle.state = next_state(handle.state, Event.STOP)
                handle.next_retry = None
        while self.queue:  # not started: back to the source, which redelivers
            item = self.items.pop(self.queue.popleft())
            if item.provider in self.providers:
                self.providers[item.provider].queued -= 1
            self._finish(item, NOT_DONE, "daemon stopped before it was scanned", None)
        if not self.items:
            self._stop_children()

    def _stop_children(self) -> None:
        """Nothing in flight: ask workers to exit and providers to stop."""
        for worker in self.workers.values():
            if worker.channel is not None and not worker.retiring:
                worker.retire()
                worker.channel.send({"t": "exit"})
        for handle in self.providers.values():
            if handle.state in (State.STARTING, State.RUNNING):
                handle.state = next_state(handle.state, Event.STOP)
            if handle.stop_requested_at is None and handle.alive():
                self._terminate(handle)  # once: a second SIGTERM could cut short its clean-up

    def _finished(self, now: float) -> bool:
        if self.stopping_since is None:
            if self.items:  # first: the one check while busy
                return False
            if not self.providers or not all(
                p.state in (State.EXHAUSTED, State.FATAL) and not p.alive()
                for p in self.providers.values()
            ):
                return False
            fatal = [p.name for p in self.providers.values() if p.state is State.FATAL]
            # A provider that could not even load or rejected its options is a
            # configuration problem: 78, which systemd and supervisord do not restart.
            boot = [name for name in fatal if name in self.boot_failed]
            self.exit_code = (configuration.EX_CONFIG if boot else 1) if fatal else 0
            self.begin_shutdown(
                "every provider is finished" + (f"; fatal: {fatal}" if fatal else "")
            )
            self._update_write_interest()  # the workers' exit frames leave now, not next turn
        # A child counts until its exit has been handled (and logged), not merely reaped.
        watched = self.selector.get_map()
        alive = [
            c
            for c in [*self.workers.values(), *self._all_providers()]
            if c.alive() or (c.process is not None and c.process.sentinel in watched)
        ]
        return not alive

    def _cleanup(self, path: str) -> None:
        for child in [*self.workers.values(), *self._all_providers()]:
            child.kill()
            if child.process is not None:
                child.process.join(timeout=5)
        try:
            os.unlink(path)
        except OSError:
            pass
        shutil.rmtree(self.spool_dir, ignore_errors=True)

    # -- control ----------------------------------------------------------------------

    def _on_control_accept(self, _: int) -> None:
        try:
            connection = control_server.accept(self.control)
        except OSError as exc:  # out of descriptors (EMFILE) or memory
            self._pause_control(exc)
            return
        if connection is None:
            return
        self.control_accept_failures = 0

        def on_readable(_: int, c: control_server.Connection = connection) -> None:
            if c.read(self.handle_command):
                self.selector.unregister(c)
                c.close()

        self.selector.register(connection, selectors.EVENT_READ, on_readable)

    def _pause_control(self, exc: OSError) -> None:
        """Stop watching the control socket for a while: the connection waits in its
        backlog, and a socket still readable would wake the loop again at once."""
        self.selector.unregister(self.control)
        self.control_accept_failures += 1
        pause = backoff.doubled(self.control_accept_failures, CONTROL_PAUSE, CONTROL_PAUSE_MAX)
        self.control_paused_until = time.monotonic() + pause
        log.error("control_accept_failed", error=str(exc), retry_in=pause)

    def _resume_control(self, now: float) -> None:
        if self.control_paused_until is not None and now >= self.control_paused_until:
            self.control_paused_until = None
            self.selector.register(self.control, selectors.EVENT_READ, self._on_control_accept)

    def handle_command(self, request: Dict[str, Any]) -> Dict[str, Any]:
        from .control.commands import dispatch

        return dispatch(self, request)

    def provider(self, name: str) -> ProviderHandle:
        try:
            return self.providers[name]
        except KeyError:
            known = ", ".join(sorted(self.providers)) or "none"
            raise ControlError(f"no provider named {name} (providers: {known})") from None

    def stop_provider(self, handle: ProviderHandle) -> None:
        handle.state = next_state(handle.state, Event.STOP)
        handle.next_retry = None
        if handle.alive() and handle.stop_requested_at is None:  # one SIGTERM only
            self._terminate(handle)

    def _terminate(self, handle: ProviderHandle) -> None:
        """SIGTERM a provider, after the outcomes already sent to it.

        A running provider gets a ``terminate`` frame: it queues behind the ``done`` frames
        on its socket, and its completion thread SIGTERMs its own main thread only once
        every one of them went to its callback (acknowledged, moved). A SIGTERM sent
        straight away could start its clean-up with outcomes still unread, and messages
        saved but not acknowledged would come back to be scanned again. A provider still
        loading its plugin has no completion thread yet and no outcomes: it is signalled.
        """
        handle.stop_requested_at = time.monotonic()
        channel = handle.channel
        if handle.ready_at is not None and channel is not None and channel.reachable:
            channel.send({"t": "terminate"})
        else:
            handle.signal(signal.SIGTERM)

    def start_provider(self, handle: ProviderHandle) -> None:
        if handle.state in (State.STARTING, State.RUNNING, State.STOPPING):
            raise ControlError(f"provider {handle.name} is already {handle.state.value}")
        if self.stopping_since is not None:
            raise ControlError("stoqd is shutting down")
        _refuse_while_finishing(handle)
        handle.failures = 0
        self._start_provider(handle)

    def restart_provider(self, handle: ProviderHandle) -> None:
        if self.stopping_since is not None:
            raise ControlError("stoqd is shutting down")
        # Stopping one whose ingest returned would cut its acknowledgements short, and
        # EXHAUSTED is never restarted on exit: "restarting" would be untrue.
        _refuse_while_finishing(handle)
        if handle.alive():
            handle.restart_requested = True  # started again once the old process exits
            self.stop_provider(handle)
        else:
            self.start_provider(handle)

    def reload(self) -> None:
        """SIGHUP: re-read the file; apply it, or keep running as before and say why."""
        path = self.config.path
        if path is None:
            log.error("reload_failed", error="no configuration file to reload")
            return
        if self.stopping_since is not None:
            log.error("reload_failed", error="stoqd is shutting down")
            return
        for hook in self.hooks:
            hook.on_reload(self)
        try:
            fresh = Stoq(config_file=str(path))
            fresh.check()
            # The workers will be rebuilt on it: a scan plugin that cannot load must not
            # take down the running pool, so it is built here first.
            problems, warnings = preflight(fresh, providers=False)
            if problems:
                raise configuration.ConfigError(problems)
        except (configuration.ConfigError, Exception) as exc:
            problems = getattr(exc, "problems", [str(exc)])
            log.error("reload_failed", error="; ".join(problems), kept="previous configuration")
            return
        for line in warnings:
            log.warning("config_unread_option", detail=line)
        old_opts, old_daemon = self.stoq.plugin_opts, self.daemon
        self.stoq, self.config, self.spec = fresh, fresh.config, fresh.spec()
        self._apply_settings()
        self._keep_restart_only_settings(old_daemon)
        self.config_generation += 1  # workers are recycled one by one onto the new config
        self._fill_worker_pool(time.monotonic())  # a larger ``workers``: at once
        wanted = list(fresh.core("providers"))
        for name in wanted:
            handle = self.providers.get(name)
            if handle is None:
                handle = self.providers[name] = ProviderHandle(name=name)
                handle.settings = self.config.supervision(name)
                self._start_provider(handle)
            else:
                handle.settings = self.config.supervision(name)
                # (Not one EXHAUSTED still finishing its items: it is never started again,
                # and restart_provider would refuse it.)
                changed = old_opts.get(name) != fresh.plugin_opts.get(name)
                if changed and handle.alive() and handle.state in LIVE:
                    self.restart_provider(handle)  # picks up its new options
        for name in [n for n in self.providers if n not in wanted]:
            handle = self.providers.pop(name)
            if handle.alive() or handle.state is State.BACKOFF:
                self.stop_provider(handle)  # STOPPING: its exit is logged as stopped
            if handle.alive():  # still escalated to SIGKILL, and waited for at exit
                self.retired.append(handle)
        log.info("reloaded", providers=wanted, workers=self.n_workers)

    def _keep_restart_only_settings(self, old: Dict[str, Any]) -> None:
        """Settings bound at start (the control socket, the spool, the metrics endpoint)
        keep their running values until a restart; a reload says so instead of
        pretending to apply them."""
        changed = [key for key in RESTART_ONLY if self.daemon[key] != old[key]]
        for key in changed:
            self.daemon[key] = old[key]
        if changed:
            log.warning(
                "reload_partial",
                keys=changed,
                detail="these take effect at the next start; running values kept",
            )

    # -- plumbing ---------------------------------------------------------------------

    def _all_providers(self) -> List[ProviderHandle]:
        return [*self.providers.values(), *self.retired]

    def _forget(self, channel: Channel) -> None:
        """A channel is closing: leave the selector while its fd number is still valid."""
        try:
            self.selector.unregister(channel)
        except (KeyError, ValueError):
            pass

    def _unregister(self, channel: Channel) -> None:
        try:
            self.selector.unregister(channel)
        except (KeyError, ValueError):
            pass
        channel.close()

    def _update_write_interest(self) -> None:
        # Outcomes alone wait for the next housekeeping (at most HOUSEKEEPING_EVERY), so a
        # provider gets them dozens at a time: every frame wakes its completion thread
        # and then its source's thread, which cost a busy RabbitMQ provider about a fifth
        # of its CPU when they came every turn. Anything else sent to a provider (credits,
        # stop) goes at once and takes the waiting outcomes with it, in order.
        outcomes_wait = self._housekeeping_skipped and self.stopping_since is None
        # Providers removed by a reload (``retired``) too: their ``terminate`` frame waits
        # here, and without it they would be SIGKILLed after graceful_timeout instead.
        for children in (self._all_providers(), self.workers.values()):
            for child in children:
                channel = child.channel
                if channel is None or channel.closed:
                    continue
                # (Not when the selector watches it for writing: it would report it
                # writable every turn until then.)
                if outcomes_wait and channel.holds_only_a_batch and not channel.write_interest:
                    continue  # _timeout wakes the loop for the next housekeeping
                channel.flush()
                # Closed by an error, or unwritable because the child died (peer_gone):
                # its sentinel or end-of-file brings it to _on_*_exit.
                if channel.closed:
                    continue
                # Runs every turn for every child: the selector is consulted only when
                # the channel's need to write differs from what it last registered.
                wants = channel.wants_write
                if wants == channel.write_interest:
                    continue
                channel.write_interest = wants
                events = selectors.EVENT_READ | (selectors.EVENT_WRITE if wants else 0)
                key = self.selector.get_map().get(channel.fileno())
                if key is not None and key.events != events:
                    callback = key.data
                    self.selector.modify(channel, events, _with_flush(channel, callback))

    def snapshot(self) -> Dict[str, Any]:
        from .control.commands import status

        return status(self)


def _refuse_while_finishing(handle: ProviderHandle) -> None:
    """Refuse a second process on a handle whose process is still there, in a state that
    has none (EXHAUSTED: waiting for its items' outcomes, to acknowledge them, before it
    exits): its exit would be handled as the new one's (sentinel, channel, spool files)."""
    if handle.alive() and handle.state not in LIVE:
        raise ControlError(
            f"provider {handle.name} is {handle.state.value} and still finishing its items "
            f"(pid {handle.pid}); start it again once it has exited"
        )


def _with_flush(channel: Channel, callback: Callable[[int], None]) -> Callable[[int], None]:
    inner = getattr(callback, "__wrapped__", callback)

    def on_event(mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            channel.flush()
        if mask & selectors.EVENT_READ:
            inner(mask)

    on_event.__wrapped__ = inner  # type: ignore[attr-defined]
    return on_event


def _drain(sock: socket.socket) -> None:
    try:
        while sock.recv(4096):
            pass
    except (BlockingIOError, InterruptedError):
        pass


def _remember(keys: OrderedDict[str, Optional[str]], key: str, scan_id: Optional[str]) -> None:
    """Record a saved key, forgetting the oldest beyond the bound."""
    keys[key] = scan_id
    keys.move_to_end(key)
    if len(keys) > _SAVED_KEYS_KEPT:
        keys.popitem(last=False)


# What starting a child can run into that is no bug of ours. OSError: out of descriptors
# (EMFILE) for the socketpairs, or for what asks the forkserver for a process (checked
# before it is asked: see children.check_descriptor_room). EOFError (or a BrokenPipeError):
# the forkserver died (a fork failing inside it, out of processes or memory; killed), and
# every child with it (PR_SET_PDEATHSIG); they are started again through a new one.
SPAWN_ERRORS = (OSError, EOFError)


def _spawn_error(exc: BaseException) -> str:
    if isinstance(exc, EOFError):
        return "multiprocessing's forkserver died while starting it (out of processes or memory?)"
    return str(exc)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
