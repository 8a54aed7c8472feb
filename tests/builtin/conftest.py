"""Fixtures for the built-in plugin tests: plugins built the way stoqd builds them."""

from __future__ import annotations

from typing import Any, Callable

import pytest

from stoqd.framework.loader import PluginRegistry
from stoqd.framework.plugins import BasePlugin


@pytest.fixture(scope="session")
def registry() -> PluginRegistry:
    """The installed plugins, found through their entry points and .stoq files."""
    return PluginRegistry()


@pytest.fixture
def load(registry: PluginRegistry) -> Callable[..., Any]:
    """``load("hash", algorithms="md5")``: a plugin with its .stoq defaults under ``opts``."""

    def _load(name: str, **opts: Any) -> BasePlugin:
        return registry.load(name, opts)

    return _load
