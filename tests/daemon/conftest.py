"""Fixtures for the real-process daemon tests: stoqd on a config of fixture plugins.

Every test gets a short directory under /tmp (Unix socket paths are limited to 107
characters) holding its ``stoq.cfg``, the control socket, the ``jsonl`` results and the
files fixture providers record their outcomes in. Every daemon a test starts is closed
(SIGTERM, then SIGKILL to its whole session) when the test ends, pass or fail.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import pytest

from stoqd.testing import temp_dir

from .helpers import Run


@pytest.fixture
def workdir() -> Iterator[Path]:
    directory = temp_dir("stoqd-t-")
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def make_run(workdir: Path) -> Iterator[Callable[..., Run]]:
    """``make_run({"core": {"providers": "source"}, "source": {...}})``: a configured Run
    (not started; ``run.start()`` starts a daemon, closed when the test ends)."""
    runs: List[Run] = []

    def make(sections: Dict[str, Dict[str, Any]], name: Optional[str] = None) -> Run:
        directory = workdir / name if name else workdir
        directory.mkdir(exist_ok=True)
        run = Run(directory, sections)
        runs.append(run)
        return run

    yield make
    for run in runs:
        run.close()
