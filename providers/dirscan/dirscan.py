"""Plugin ``dirscan``: scan every file of a directory tree once, then finish.

Same options, filters and after-scan actions as ``dirmon`` (see
``providers/dirmon/README.md``), without the watching: ``ingest`` walks the tree,
streaming, waits until every file it handed over has its outcome and action, and
returns, so the provider is EXHAUSTED and ``stoq run -P dirscan`` ends when all is saved.
"""

from __future__ import annotations

from configparser import ConfigParser
from typing import Any, Dict, Optional

from stoqd_providers.dirmon.files import Settings
from stoqd_providers.dirmon.scan import Scan

from stoqd.framework.plugins import ProviderPlugin


class DirscanProvider(ProviderPlugin):
    """Walks ``source_dir`` once and hands each complete file to stoqd."""

    def __init__(self, config: ConfigParser, plugin_opts: Optional[Dict[str, Any]] = None) -> None:
        super().__init__(config, plugin_opts)
        self.settings = Settings.from_plugin(self)

    def ingest(self, queue: Any) -> None:
        """Walk once; return when every file found is finished (or stoqd stops us)."""
        Scan(self.settings, queue, self.log).run()
