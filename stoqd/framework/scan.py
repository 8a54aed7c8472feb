"""The scan of one request: dispatch, workers, extracted payloads, archivers, decorators.

Every plugin call goes through ``_guarded``: whatever a plugin raises or returns wrongly
lands in the response's ``errors`` under the plugin's name and the scan goes on. This
module knows nothing about processes or configuration files; ``Stoq`` (core.py) and the
daemon's workers both drive it.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, DefaultDict, Dict, List, Optional, Set, Tuple, TypeVar

from .data import (
    ArchiverResponse,
    DecoratorResponse,
    DispatcherResponse,
    Payload,
    PayloadMeta,
    PayloadResults,
    RequestMeta,
    StoqResponse,
    WorkerResponse,
    new_errors,
)
from .exceptions import StoqPluginException
from .plugins import (
    ArchiverPlugin,
    BasePlugin,
    ConnectorPlugin,
    DecoratorPlugin,
    DispatcherPlugin,
    WorkerPlugin,
)

log = logging.getLogger("stoqd.scan")
R = TypeVar("R")


@dataclass
class ScanPolicy:
    """The knobs of a scan, from ``[core]`` or the command line."""

    always_dispatch: List[str] = field(default_factory=list)
    max_recursion: int = 3
    max_dispatch_passes: int = 1
    max_payload_size: int = 0  # bytes; 0: no limit


class PluginSource:
    """What the scan needs from whoever owns the plugins: a loaded plugin by name."""

    def get(self, name: str) -> BasePlugin:  # pragma: no cover - interface
        raise NotImplementedError


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


class Scan:
    """One request being scanned; holds its errors and the payloads seen so far."""

    def __init__(
        self,
        plugins: PluginSource,
        policy: ScanPolicy,
        dispatchers: List[str],
        dest_archivers: List[str],
        decorators: List[str],
        request_meta: RequestMeta,
    ) -> None:
        self.plugins = plugins
        self.policy = policy
        self.dispatchers = dispatchers
        self.dest_archivers = dest_archivers
        self.decorators = decorators
        self.request_meta = request_meta
        self.errors: DefaultDict[str, List[str]] = new_errors()
        self.timings: Dict[str, float] = {}  # plugin name -> seconds spent in it
        self._seen: Set[str] = set()  # sha256 of every payload scanned in this request
        # The root's digest is only needed once something is extracted: most payloads
        # extract nothing, and hashing a large one costs more than scanning it may.
        self._unhashed_root: Optional[bytes] = None

    # -- plumbing -------------------------------------------------------------------

    def _guarded(
        self, name: str, call: Callable[[], Any], expected: Tuple[type, ...]
    ) -> Optional[Any]:
        """Run one plugin call; an exception or a wrong return type becomes an error."""
        started = time.perf_counter()
        try:
            result = call()
        except Exception as exc:  # plugin code: anything may come out of it
            log.debug("plugin %s raised", name, exc_info=True)
            self.errors[name].append(_one_line(exc))
            return None
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - started
        if result is not None and not isinstance(result, expected):
            wanted = " or ".join(t.__name__ for t in expected)
            self.errors[name].append(f"returned {type(result).__name__}, expected {wanted} or None")
            return None
        return result

    def _plugin(self, name: str, kind: type) -> Optional[Any]:
        try:
            plugin = self.plugins.get(name)
        except StoqPluginException as exc:
            self.errors[name].append(str(exc))
            return None
        if not isinstance(plugin, kind):
            self.errors[name].append(f"plugin {name} is not a {kind.__name__}")
            return None
        return plugin

    # -- the scan -------------------------------------------------------------------

    def run(self, root: Payload, start_dispatch: List[str]) -> StoqResponse:
        """Scan ``root`` and everything extracted from it, breadth first."""
        todo: deque[Tuple[Payload, int]] = deque([(root, 0)])
        results: List[PayloadResults] = []
        self._unhashed_root = root.content
        try:
            self._scan_all(todo, results, start_dispatch)
        finally:
            # A Scan may outlive its request (until the cyclic GC finds it, should a
            # plugin have tied it into a cycle): never with a large payload inside.
            self._unhashed_root = None
        response = StoqResponse(results=results, request_meta=self.request_meta, errors=self.errors)
        self._decorate(response)
        return response

    def _scan_all(
        self,
        todo: deque[Tuple[Payload, int]],
        results: List[PayloadResults],
        start_dispatch: List[str],
    ) -> None:
        while todo:
            payload, depth = todo.popleft()
            extracted = self._scan_payload(payload, start_dispatch if depth == 0 else [])
            self._archive(payload)
            results.append(PayloadResults.from_payload(payload))
            for child in extracted:
                if depth + 1 > self.policy.max_recursion:
                    self.errors["stoq"].append(
                        f"payload {child.payload_id} extracted by {child.extracted_by} not "
                        f"scanned: max_recursion {self.policy.max_recursion} reached"
                    )
                    continue
                todo.append((child, depth + 1))

    def _scan_payload(self, payload: Payload, start_dispatch: List[str]) -> List[Payload]:
        limit = self.policy.max_payload_size
        if limit and len(payload.content) > limit:
            self.errors["stoq"].append(
                f"payload {payload.payload_id} not scanned: {len(payload.content)} bytes "
                f"exceeds max_payload_size {limit}"
            )
            return []
        extracted: List[Payload] = []
        already_run: Set[str] = set()
        wanted = list(start_dispatch) + list(payload.payload_meta.dispatch_to)
        wanted += self.policy.always_dispatch
        for dispatch_pass in range(max(1, self.policy.max_dispatch_passes)):
            names = self._dispatch(payload, wanted if dispatch_pass == 0 else [])
            names = [n for n in dict.fromkeys(names) if n not in already_run]
            if not names:
                break
            if dispatch_pass > 0:
                payload.plugins_run["workers"].append([])
                payload.worker_results.append({})
            for name in self._with_required(names, already_run):
                already_run.add(name)
                extracted += self._run_worker(name, payload, dispatch_pass)
        return extracted

    def _dispatch(self, payload: Payload, wanted: List[str]) -> List[str]:
        names = list(wanted)
        for name in self.dispatchers:
            dispatcher = self._plugin(name, DispatcherPlugin)
            if dispatcher is None:
                continue
            response = self._guarded(
                name,
                functools.partial(dispatcher.get_dispatches, payload, self.request_meta),
                (DispatcherResponse,),
            )
            if response is not None:
                names += response.plugin_names
                for error in response.errors:
                    self.errors[name].append(str(error))
        return names

    def _with_required(self, names: List[str], already_run: Set[str]) -> List[str]:
        """Order workers so each one's ``required_workers`` run before it."""
        ordered: List[str] = []
        for name in names:
            self._visit_required(name, (), ordered, already_run)
        return ordered

    def _visit_required(
        self, name: str, trail: Tuple[str, ...], ordered: List[str], already_run: Set[str]
    ) -> None:
        # A method, not a closure that calls itself: such a closure is a reference cycle
        # holding the Scan, which only the cyclic GC would then free.
        if name in ordered or name in already_run or name in trail:
            return
        try:
            plugin: Any = self.plugins.get(name)
        except StoqPluginException:
            plugin = None  # _run_worker records the error, once
        for required in sorted(getattr(plugin, "required_workers", ())):
            self._visit_required(required, (*trail, name), ordered, already_run)
        ordered.append(name)

    def _run_worker(self, name: str, payload: Payload, dispatch_pass: int) -> List[Payload]:
        worker = self._plugin(name, WorkerPlugin)
        if worker is None:
            return []
        payload.plugins_run["workers"][dispatch_pass].append(name)
        response = self._guarded(
            name, lambda: worker.scan(payload, self.request_meta), (WorkerResponse,)
        )
        if response is None:
            return []
        for error in response.errors:
            self.errors[name].append(str(error))
        if response.results is not None:
            payload.worker_results[dispatch_pass][name] = response.results
        children = []
        for item in response.extracted or []:
            content = getattr(item, "content", None)
            if not isinstance(content, (bytes, bytearray)):
                self.errors[name].append(
                    f"extracted {type(item).__name__} without bytes content; skipped"
                )
                continue
            seen = self._seen_digests()
            digest = hashlib.sha256(content).hexdigest()
            if digest in seen:
                continue  # already scanned in this request
            seen.add(digest)
            meta = getattr(item, "payload_meta", None) or PayloadMeta()
            children.append(
                Payload(
                    bytes(content),
                    payload_meta=meta,
                    extracted_by=name,
                    extracted_from=payload.payload_id,
                )
            )
        return children

    def _seen_digests(self) -> Set[str]:
        """The digests of the payloads already scanned, the root's included."""
        if self._unhashed_root is not None:
            self._seen.add(hashlib.sha256(self._unhashed_root).hexdigest())
            self._unhashed_root = None
        return self._seen

    def _archive(self, payload: Payload) -> None:
        if not (self.request_meta.archive_payloads and payload.payload_meta.should_archive):
            return
        for name in self.dest_archivers:
            archiver = self._plugin(name, ArchiverPlugin)
            if archiver is None:
                continue
            response = self._guarded(
                name,
                functools.partial(archiver.archive, payload, self.request_meta),
                (ArchiverResponse,),
            )
            payload.plugins_run["archivers"].append(name)
            if response is not None:
                payload.archiver_results[name] = response.results
                for error in response.errors:
                    self.errors[name].append(str(error))

    def _decorate(self, response: StoqResponse) -> None:
        for name in self.decorators:
            decorator = self._plugin(name, DecoratorPlugin)
            if decorator is None:
                continue
            result = self._guarded(
                name, functools.partial(decorator.decorate, response), (DecoratorResponse,)
            )
            if result is not None:
                response.decorators[name] = result.results
                for error in result.errors:
                    self.errors[name].append(str(error))


def save(plugins: PluginSource, connectors: List[str], response: StoqResponse) -> List[str]:
    """Hand ``response`` to every connector; return one line per connector that failed.

    A failed save is never silent: the caller logs it, and the daemon reports the item
    as failed so an acknowledging source gets it again.
    """
    failures: List[str] = []
    for name in connectors:
        try:
            connector = plugins.get(name)
            if not isinstance(connector, ConnectorPlugin):
                raise StoqPluginException(f"plugin {name} is not a ConnectorPlugin")
            connector.save(response)
        except Exception as exc:  # connector code: anything may come out of it
            failures.append(f"connector {name} failed: {_one_line(exc)}")
    return failures
