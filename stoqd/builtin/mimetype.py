"""Worker ``mimetype``: libmagic's MIME type for the payload's first bytes."""

from __future__ import annotations

from configparser import ConfigParser
from typing import Any, Dict, Optional

import magic

from stoqd.framework.data import Payload, RequestMeta, WorkerResponse
from stoqd.framework.exceptions import StoqPluginException
from stoqd.framework.plugins import WorkerPlugin

from ._options import size

# libmagic itself looks at no more than about 1 MiB; handing it more only costs a copy.
DEFAULT_MAX_BYTES = 1 << 20


class MimetypePlugin(WorkerPlugin):
    """Results: ``{"mimetype": "image/png"}``."""

    def __init__(self, config: ConfigParser, plugin_opts: Optional[Dict[str, Any]] = None) -> None:
        super().__init__(config, plugin_opts)
        self.max_bytes = self.option("max_bytes", DEFAULT_MAX_BYTES, size)
        if self.max_bytes < 1:
            raise StoqPluginException(
                f"plugin {self.plugin_name}: option max_bytes must be 1 or more"
            )
        # One libmagic handle per plugin instance (so per process); python-magic locks it.
        self._magic = magic.Magic(mime=True)

    def scan(self, payload: Payload, request_meta: RequestMeta) -> Optional[WorkerResponse]:
        head = payload.content[: self.max_bytes]
        return WorkerResponse(results={"mimetype": self._magic.from_buffer(head)})
