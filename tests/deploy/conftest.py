"""Fixtures for the deployment tests."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterator

import pytest

from stoqd.testing import temp_dir


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A temp dir short enough for Unix socket paths (pytest's tmp_path may not be)."""
    directory = temp_dir("stoqd-deploy-")
    yield directory
    shutil.rmtree(directory, ignore_errors=True)
