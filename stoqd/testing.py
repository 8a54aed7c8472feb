"""Helpers for testing plugins and deployments against stoqd, shipped for users too.

- ``run_provider``: run a provider's ``ingest`` in-process against a queue that records
  every item and answers each completion callback at once, with the outcome you choose.
- ``Daemon``: a real ``stoqd`` process from a configuration, with its status read the
  way an operator reads it (``stoqctl status --json``) and real signals to stop it.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue as stdlib_queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Dict, List, Optional, Union

from .framework.data import Payload, PayloadMeta, RequestMeta
from .framework.plugins import ProviderPlugin
from .workqueue import SAVED, DoneCallback, Outcome


@dataclass
class Put:
    """One item a provider put, as ``run_provider`` recorded it."""

    item: Any
    path: Optional[str] = None
    done: Optional[DoneCallback] = None
    request_meta: Optional[RequestMeta] = None
    key: Optional[str] = None
    redelivered: bool = True


@dataclass
class RecordingQueue:
    """Stands in for the daemon's queue in-process: same methods, no processes."""

    outcome: Callable[[Put], Outcome] = lambda put: Outcome(SAVED, scan_id="test")
    max_items: Optional[int] = None
    puts: List[Put] = field(default_factory=list)
    stats: Dict[str, Any] = field(default_factory=dict)
    stopping: threading.Event = field(default_factory=threading.Event)

    def put(
        self,
        item: Any,
        block: bool = True,
        timeout: Optional[float] = None,
        *,
        done: Optional[DoneCallback] = None,
        request_meta: Optional[RequestMeta] = None,
        key: Optional[str] = None,
        redelivered: bool = True,
    ) -> None:
        if isinstance(item, (bytes, bytearray)):
            item = Payload(bytes(item))
        self._record(Put(item, done=done, request_meta=request_meta, key=key,
                         redelivered=redelivered))  # fmt: skip

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
        self._record(Put(payload_meta, path=os.fspath(path), done=done,
                         request_meta=request_meta, key=key, redelivered=redelivered))  # fmt: skip

    def _record(self, put: Put) -> None:
        if self.stopping.is_set():
            raise stdlib_queue.Full  # the harness has seen enough
        self.puts.append(put)
        if put.done is not None:
            put.done(self.outcome(put))
        if self.max_items is not None and len(self.puts) >= self.max_items:
            self.stopping.set()

    def batched(self) -> ContextManager[None]:
        return contextlib.nullcontext()  # nothing is sent anywhere to hold back

    def report(self, **stats: Any) -> None:
        self.stats.update(json.loads(json.dumps(stats, default=str)))

    def qsize(self) -> int:
        return 0

    def empty(self) -> bool:
        return True

    def full(self) -> bool:
        return False


def wait_until(
    predicate: Callable[[], Any],
    timeout: float = 30.0,
    what: str = "condition",
    detail: Optional[Callable[[], str]] = None,
) -> Any:
    """Poll ``predicate`` until it returns something true, and return that; fail naming
    ``what``, and what ``detail()`` says about the state then, if it never does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    message = f"timed out after {timeout}s waiting for {what}"
    raise AssertionError(f"{message}\n{detail()}" if detail else message)


def complete_lines(path: Union[str, os.PathLike[str]]) -> List[str]:
    """The lines of a file another process appends to, without one still being written.

    A reader can see part of a line whose single ``write`` has not finished (the kernel
    copies it into the page cache piece by piece), so only text up to the last newline
    is complete. A missing file has no lines. Split on "\n" only (``splitlines`` would
    also split on "\r" and other separators a line may hold).
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    return data[: data.rfind(b"\n") + 1].decode().split("\n")[:-1]


def read_jsonl(path: Union[str, os.PathLike[str]]) -> List[Dict[str, Any]]:
    """The complete, non-blank lines of a JSON-lines file, parsed (see ``complete_lines``).

    A line glued to the part of one that a writer killed mid-write left behind is skipped
    when the next line is its copy, as the jsonl connector writes it (see
    stoqd/builtin/jsonl.py); any other line that is not JSON raises, as before.
    """
    lines = [line for line in complete_lines(path) if line.strip()]
    results = []
    for index, line in enumerate(lines):
        try:
            results.append(json.loads(line))
        except ValueError:
            following = lines[index + 1] if index + 1 < len(lines) else ""
            if not (following and line.endswith(following)):
                raise
    return results


def record_outcome(path: str, item_id: str, outcome: Outcome) -> None:
    """Append ``ID STATUS ERROR`` (``-`` for no error) to ``path``: a provider running in a
    real daemon reports its outcomes to a test this way. One ``O_APPEND`` write per line,
    so the lines of concurrent writers never interleave."""
    error = (outcome.error or "-").replace("\n", " ")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{item_id} {outcome.status} {error}\n".encode())
    finally:
        os.close(fd)


def run_provider(
    plugin: ProviderPlugin,
    outcome: Callable[[Put], Outcome] = lambda put: Outcome(SAVED, scan_id="test"),
    max_items: Optional[int] = None,
    timeout: float = 10.0,
) -> RecordingQueue:
    """Run ``plugin.ingest`` until it returns, ``max_items`` were put, or ``timeout``."""
    queue = RecordingQueue(outcome=outcome, max_items=max_items)
    errors: List[BaseException] = []

    def target() -> None:
        try:
            plugin.ingest(queue)
        except stdlib_queue.Full:
            pass
        except BaseException as exc:  # reported to the test below
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    queue.stopping.set()
    if errors:
        raise errors[0]
    return queue


# -- a real daemon ----------------------------------------------------------------------


def write_config(directory: Path, sections: Dict[str, Dict[str, Any]]) -> Path:
    """Write a stoq.cfg into ``directory``; its control socket defaults to ``run/stoqd.sock``."""
    sections = {name: dict(values) for name, values in sections.items()}
    sections.setdefault("stoqd", {}).setdefault("control_socket", "run/stoqd.sock")
    sections.setdefault("core", {}).setdefault("log_syntax", "json")
    lines: List[str] = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        for key, value in values.items():
            if isinstance(value, (list, tuple)):
                value = ", ".join(str(v) for v in value)
            lines.append(f"{key} = {value}")
        lines.append("")
    path = directory / "stoq.cfg"
    path.write_text("\n".join(lines))
    return path


class Daemon:
    """``stoqd -c CONFIG`` as a child process of the test."""

    def __init__(self, config: Path, env: Optional[Dict[str, str]] = None) -> None:
        self.config = config
        self.socket = config.parent / "run" / "stoqd.sock"
        self.log_path = config.parent / f"stoqd-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "stoqd", "-c", str(config)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "stoqd.ctl", "-s", str(self.socket), *args],
            capture_output=True,
            text=True,
            timeout=30,
        )

    def status(self) -> Dict[str, Any]:
        result = self.ctl("status", "--json")
        if result.returncode not in (0, 3):
            raise RuntimeError(f"stoqctl status failed ({result.returncode}): {result.stderr}")
        return json.loads(result.stdout)  # type: ignore[no-any-return]

    def provider(self, name: str) -> Dict[str, Any]:
        return next(p for p in self.status()["providers"] if p["name"] == name)

    def wait_for(
        self,
        predicate: Callable[[Dict[str, Any]], bool],
        timeout: float = 30.0,
        what: str = "condition",
    ) -> Dict[str, Any]:
        """Poll the status until ``predicate(status)`` holds."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"stoqd exited ({self.process.returncode}):\n{self.log()}")
            if self.socket.exists():
                try:
                    last = self.status()
                    if predicate(last):
                        return last  # type: ignore[no-any-return]
                except (RuntimeError, ValueError):
                    pass
            time.sleep(0.1)
        raise TimeoutError(f"timed out waiting for {what}; last status: {last}\n{self.log()}")

    def wait_exit(self, timeout: float = 60.0) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"stoqd did not exit in {timeout}s:\n{self.log()}") from None

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def events(self) -> List[Dict[str, Any]]:
        """The daemon's JSON log lines, parsed."""
        out = []
        for line in self.log().splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
        return out

    def close(self) -> None:
        """Stop the daemon and every child it left behind."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                pass
        try:  # the whole session: children too, should anything be left
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.process.wait()
        self._log.close()


def temp_dir(prefix: str = "stoqd-") -> Path:
    """A short temporary directory (Unix socket paths are limited to 107 characters)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
