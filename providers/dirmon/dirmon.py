"""Plugin ``dirmon``: scan every file that is complete in a directory tree, once.

A file is taken when its writer closes it (IN_CLOSE_WRITE) or when it is renamed into
the tree, never when it is created; files already there at start are taken too. After
its result is saved the file is kept, deleted or moved to ``done_dir``; a failed scan
moves it to ``failed_dir`` or keeps it, never deletes it. See README.md beside this file.
"""

from __future__ import annotations

from configparser import ConfigParser
from typing import Any, Dict, Optional

from stoqd.builtin._options import positive_int
from stoqd.framework.plugins import ProviderPlugin

from .files import Settings, seconds
from .monitor import Monitor


class DirmonProvider(ProviderPlugin):
    """Watches ``source_dir`` with inotify and hands each complete file to stoqd."""

    def __init__(self, config: ConfigParser, plugin_opts: Optional[Dict[str, Any]] = None) -> None:
        super().__init__(config, plugin_opts)
        self.settings = Settings.from_plugin(self)
        self.process_existing = self.option("process_existing", True, bool)
        self.rescan_interval = self.option("rescan_interval", 0.0, seconds)
        self.max_backlog = self.option("max_backlog", 100_000, positive_int)

    def ingest(self, queue: Any) -> None:
        """Run until stoqd stops this provider (``queue.stopping``)."""
        Monitor(
            self.settings,
            queue,
            self.log,
            process_existing=self.process_existing,
            rescan_interval=self.rescan_interval,
            max_backlog=self.max_backlog,
        ).run()
