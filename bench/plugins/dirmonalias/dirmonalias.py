"""Benchmark only: stoqd's ``dirmon`` provider under other plugin names.

A plugin name is one provider instance, so the memory benchmark runs five directory
watchers as ``dirmon1`` ... ``dirmon5``, each on its own directory. Options not set in
stoq.cfg take dirmon's own defaults from its code.
"""

from __future__ import annotations

from stoqd_providers.dirmon.dirmon import DirmonProvider


class BenchDirmon(DirmonProvider):
    """``dirmon`` itself; the subclass only gives the loader a class of this module."""
