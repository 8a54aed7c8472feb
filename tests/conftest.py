"""Shared test fixtures: the stoQ v2 fixture plugin directory, writing plugins, and running
``stoq`` for real. Helpers are offered as fixtures, not imports: several directories here
have a conftest.py, so ``from conftest import ...`` would pick whichever loaded first."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional

import pytest

TESTS = Path(__file__).resolve().parent
V2_PLUGINS = TESTS / "fixtures" / "stoq_v2_plugins"
BIN = Path(sys.executable).parent  # the venv's bin: stoq, stoqd, stoqctl


def _clean_env(**extra: str) -> dict:
    """The environment for a child ``stoq``: no $STOQ_CONFIG leaking in from outside."""
    env = {k: v for k, v in os.environ.items() if k != "STOQ_CONFIG"}
    env.update(extra)
    return env


RunCommand = Callable[..., subprocess.CompletedProcess]


@pytest.fixture
def v2_plugins() -> Path:
    """A plugin directory in stoQ v2's layout: worker, connector, archiver, provider."""
    return V2_PLUGINS


@pytest.fixture
def run_cmd(tmp_path: Path) -> RunCommand:
    """Run ``stoq``/``stoqd``/``stoqctl`` from the venv in ``tmp_path``; text output.

    ``stdin`` is bytes fed to the command (default: empty, never the test's own stdin).
    """

    def run(
        program: str,
        *args: str,
        stdin: bytes = b"",
        env: Optional[dict] = None,
        timeout: float = 60,
    ) -> subprocess.CompletedProcess:
        done = subprocess.run(
            [str(BIN / program), *map(str, args)],
            input=stdin,
            capture_output=True,
            cwd=tmp_path,
            env=env if env is not None else _clean_env(),
            timeout=timeout,
        )
        return subprocess.CompletedProcess(
            done.args,
            done.returncode,
            done.stdout.decode("utf-8", "replace"),
            done.stderr.decode("utf-8", "replace"),
        )

    return run


@pytest.fixture
def stoq_cmd(run_cmd: RunCommand) -> RunCommand:
    """Run the ``stoq`` command: ``stoq_cmd("scan", FILE, "-a", "hash")``."""
    return lambda *args, **kw: run_cmd("stoq", *args, **kw)


def _write_plugin(root: Path, name: str, source: str, options: Optional[dict] = None) -> Path:
    """Write plugin ``name`` into plugin directory ``root`` the stoQ v2 way:
    ``root/NAME/NAME.stoq`` (with ``options`` as its ``[options]``) and ``root/NAME/NAME.py``.

    Plugin modules are imported once per process under their name, so a name must mean the
    same code throughout the test session.
    """
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    lines = [
        "[Core]",
        f"Name = {name}",
        f"Module = {name}",
        "",
        "[Documentation]",
        f"Description = test plugin {name}",
        "",
        "[options]",
    ]
    lines += [f"{key} = {value}" for key, value in (options or {}).items()]
    (folder / f"{name}.stoq").write_text("\n".join(lines) + "\n")
    (folder / f"{name}.py").write_text(source)
    return folder


@pytest.fixture(scope="session")
def write_plugin() -> Callable[..., Path]:
    """``write_plugin(root, name, source, options)``: a stoQ v2-layout plugin on disk."""
    return _write_plugin


@pytest.fixture(scope="session")
def clean_env() -> Callable[..., dict]:
    """``clean_env(STOQ_CONFIG=...)``: os.environ without $STOQ_CONFIG, plus overrides."""
    return _clean_env
