"""Fixtures for the provider tests.

Directory providers (dirmon, dirscan): fixtures prefixed ``dir_``. Queue providers:
fixtures prefixed ``mq_``.
"""

from __future__ import annotations

import json
import os
import queue as stdlib_queue
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import pytest
from services import mq_pubsub, mq_rabbitmq  # noqa: F401  (queue brokers: tests/services.py)

from stoqd.framework.data import PayloadMeta
from stoqd.framework.loader import PluginRegistry
from stoqd.testing import read_jsonl
from stoqd.workqueue import Outcome

# -- directory providers -----------------------------------------------------------------


@dataclass
class DirPut:
    """One file a directory provider handed over, with the bytes a worker would read."""

    path: str
    content: Optional[bytes]
    meta: PayloadMeta
    done: Optional[Callable[[Outcome], None]]
    answered: bool = False


class DirQueue:
    """Stands in for stoqd's ProviderQueue in-process, for unit-level provider tests.

    ``put_file`` reads the file at once, as a worker would shortly after, and answers
    with ``outcome`` (``"saved"``, ``"failed"``, or ``"hold"`` to answer later with
    ``answer``). With ``capacity``, at most that many held items fit: further puts
    block and time out with ``queue.Full``, like the daemon's full queue.
    """

    def __init__(self, outcome: Any = "saved", capacity: Optional[int] = None) -> None:
        self.outcome = outcome
        self.capacity = capacity
        self.puts: List[DirPut] = []
        self.stats: Dict[str, Any] = {}
        self.stopping = threading.Event()
        self._cond = threading.Condition()

    def put_file(self, path: Any, payload_meta: Optional[PayloadMeta] = None, *,
                 done: Any = None, request_meta: Any = None, block: bool = True,
                 timeout: Optional[float] = None) -> None:  # fmt: skip
        with self._cond:
            if self.capacity is not None:
                ok = self._cond.wait_for(lambda: self.held() < self.capacity, timeout)
                if not ok:
                    raise stdlib_queue.Full
            try:
                with open(path, "rb") as handle:
                    content: Optional[bytes] = handle.read()
            except OSError:
                content = None
            put = DirPut(os.fspath(path), content, payload_meta or PayloadMeta(), done)
            self.puts.append(put)
            self._cond.notify_all()
        status = self.outcome(put) if callable(self.outcome) else self.outcome
        if status != "hold":
            self._answer(put, status)

    def put(self, *args: Any, **kwargs: Any) -> None:
        raise AssertionError("directory providers hand over files with put_file")

    def held(self) -> int:
        return sum(1 for p in self.puts if not p.answered)

    def _answer(self, put: DirPut, status: str, error: Optional[str] = None) -> None:
        put.answered = True
        if put.done is not None:
            put.done(Outcome(status, error or (None if status == "saved" else "test failure")))
        with self._cond:
            self._cond.notify_all()

    def answer(self, status: str = "saved", error: Optional[str] = None) -> int:
        """Answer every held item; returns how many."""
        with self._cond:
            held = [p for p in self.puts if not p.answered]
        for put in held:
            self._answer(put, status, error)
        return len(held)

    def report(self, **stats: Any) -> None:
        self.stats = json.loads(json.dumps(stats))

    def paths(self) -> List[str]:
        return [p.path for p in self.puts]

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0,
                 what: str = "condition") -> None:  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.02)
        raise AssertionError(
            f"timed out waiting for {what}; puts={self.paths()} stats={self.stats}"
        )


class DirRunner:
    """A provider's ``ingest`` running on a thread against a ``DirQueue``."""

    def __init__(self, plugin: Any, queue: DirQueue) -> None:
        self.plugin = plugin
        self.queue = queue
        self.error: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.plugin.ingest(self.queue)
        except BaseException as exc:  # handed to the test
            self.error = exc

    def running(self) -> bool:
        return self.thread.is_alive()

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the provider like the daemon does: ``stopping``, then unanswered items
        are reported not done."""
        self.queue.stopping.set()
        deadline = time.monotonic() + timeout
        while self.thread.is_alive() and time.monotonic() < deadline:
            self.queue.answer("not_done")
            self.thread.join(0.05)
        assert not self.thread.is_alive(), "provider did not stop"

    def join(self, timeout: float = 20.0) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "provider did not return"


@pytest.fixture
def dir_tree(tmp_path: Path) -> Dict[str, Path]:
    """``src`` (watched), ``done`` and ``failed`` directories, and ``outside`` the tree."""
    tree = {name: tmp_path / name for name in ("src", "done", "failed", "outside")}
    for path in tree.values():
        path.mkdir()
    return tree


@pytest.fixture
def dir_plugin() -> Callable[..., Any]:
    """Build provider ``name`` the way stoqd does: its .stoq defaults under ``opts``."""
    registry = PluginRegistry()

    def build(name: str, **opts: Any) -> Any:
        return registry.load(name, {k: str(v) for k, v in opts.items()})

    return build


@pytest.fixture
def dir_run() -> Iterator[Callable[..., DirRunner]]:
    """Start ``plugin.ingest(queue)`` on a thread; stopped (and checked) at teardown."""
    runners: List[DirRunner] = []

    def start(plugin: Any, queue: DirQueue) -> DirRunner:
        runner = DirRunner(plugin, queue)
        runners.append(runner)
        return runner

    yield start
    for runner in runners:
        if runner.running():
            runner.stop()


@pytest.fixture
def dir_queue() -> Callable[..., DirQueue]:
    """``dir_queue(outcome="saved", capacity=None)``: a fresh ``DirQueue``."""
    return DirQueue


# A worker that takes its time, so that a test can act while files are being scanned.
DIR_SLOW_WORKER = """
import time
from stoq import WorkerResponse
from stoq.plugins import WorkerPlugin


class SlowPlugin(WorkerPlugin):
    def scan(self, payload, request_meta):
        time.sleep(float(self.config.get("options", "delay", fallback="0.3")))
        return WorkerResponse({"size": len(payload.content)})
"""


@pytest.fixture
def dir_workdir() -> Iterator[Path]:
    """A short directory under /tmp (control socket paths are limited to 107 bytes),
    holding ``src``, ``done``, ``failed`` and a plugin directory with the ``slow`` worker."""
    from stoqd.testing import temp_dir

    directory = temp_dir("stoqd-dir-")
    for name in ("src", "done", "failed"):
        (directory / name).mkdir()
    plugin = directory / "plugins" / "slow"
    plugin.mkdir(parents=True)
    (plugin / "slow.py").write_text(DIR_SLOW_WORKER)
    (plugin / "slow.stoq").write_text(
        "[Core]\nName = slow\nModule = slow\n\n[Documentation]\nDescription = sleeps\n\n"
        "[options]\ndelay = 0.3\n"
    )
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def dir_daemon(dir_workdir: Path) -> Iterator[Callable[..., Any]]:
    """``dir_daemon(provider_section_name, {options}, core={...}, stoqd={...})``: write
    ``stoq.cfg`` in ``dir_workdir`` (results to ``results.jsonl``) and start ``stoqd``;
    every daemon started is closed at teardown."""
    from stoqd.testing import Daemon, write_config

    daemons: List[Any] = []

    def start(provider: str, options: Dict[str, Any], **sections: Dict[str, Any]) -> Any:
        config = {
            "core": {
                "providers": provider,
                "connectors": "jsonl",
                "always_dispatch": "hash",
                "plugin_dir_list": str(dir_workdir / "plugins"),
                **sections.get("core", {}),
            },
            "stoqd": {"workers": 2, "graceful_timeout": 10, **sections.get("stoqd", {})},
            provider: {"source_dir": str(dir_workdir / "src"), **options},
            "jsonl": {"output_file": str(dir_workdir / "results.jsonl")},
        }
        daemon = Daemon(write_config(dir_workdir, config))
        daemons.append(daemon)
        return daemon

    yield start
    for daemon in daemons:
        daemon.close()


def dir_results(workdir: Path) -> Dict[str, List[Dict[str, Any]]]:
    """The saved results in ``workdir/results.jsonl``, by the file path they came from."""
    by_path: Dict[str, List[Dict[str, Any]]] = {}
    for response in read_jsonl(workdir / "results.jsonl"):
        payload = response["results"][0]
        by_path.setdefault(payload["payload_meta"]["extra_data"]["path"], []).append(payload)
    return by_path
