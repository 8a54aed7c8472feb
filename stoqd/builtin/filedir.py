"""Plugin ``filedir``: a connector writing one file per result, and an archiver by sha256.

Connector: ``results_dir/<scan_id>.json``. Archiver: ``archive_dir/ab/cd/abcd…`` where
``abcd…`` is the payload's sha256 and ``ab``/``cd`` its first two hex pairs, so each of
the two upper levels holds at most 256 directories and files spread evenly below them.
Every file is written to a temporary name in its final directory and renamed into place,
so a reader sees either nothing or the whole file. ``get`` serves only files whose real
path (symlinks followed) lies inside ``archive_dir``.
"""

from __future__ import annotations

import os
import re
import stat
from configparser import ConfigParser
from typing import Any, Dict, Optional

from stoqd.framework.data import (
    ArchiverResponse,
    Payload,
    PayloadMeta,
    RequestMeta,
    StoqResponse,
)
from stoqd.framework.exceptions import StoqPluginException
from stoqd.framework.helpers import dumps, get_sha256, write_atomically
from stoqd.framework.plugins import ArchiverPlugin, ConnectorPlugin

_SHA256 = re.compile(r"[0-9a-f]{64}")
# scan_id becomes a file name: letters, digits, '.', '_' and '-' only, never '.'-first.
_SAFE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}")


class FiledirPlugin(ArchiverPlugin, ConnectorPlugin):
    """Connector (``results_dir``) and archiver (``archive_dir``) on the local disk."""

    def __init__(self, config: ConfigParser, plugin_opts: Optional[Dict[str, Any]] = None) -> None:
        super().__init__(config, plugin_opts)
        self.results_dir = self._directory("results_dir")
        self.archive_dir = self._directory("archive_dir")
        self.compactly = self.option("compactly", False, bool)
        self.fsync = self.option("fsync", False, bool)

    def _directory(self, option: str) -> Optional[str]:
        value = self.option(option, "", str).strip()
        if not value:
            return None
        path = os.path.realpath(os.path.expanduser(value))
        try:
            os.makedirs(path, exist_ok=True)  # exist_ok: many processes load this at once
        except OSError as exc:
            raise StoqPluginException(
                f"plugin {self.plugin_name}: option {option}: cannot create directory "
                f"{path}: {exc.strerror}"
            ) from None
        return path

    def _required(self, option: str, value: Optional[str]) -> str:
        if value is None:
            raise StoqPluginException(f"plugin {self.plugin_name}: option {option} is not set")
        return value

    # -- connector ------------------------------------------------------------------

    def save(self, response: StoqResponse) -> None:
        """Write ``results_dir/<scan_id>.json`` atomically."""
        results_dir = self._required("results_dir", self.results_dir)
        scan_id = str(response.scan_id)
        if not _SAFE_NAME.fullmatch(scan_id):
            raise StoqPluginException(
                f"plugin {self.plugin_name}: scan_id {scan_id[:80]!r} is not a safe file name"
            )
        text = dumps(response, compactly=self.compactly) + "\n"
        write_atomically(os.path.join(results_dir, f"{scan_id}.json"), text.encode(), self.fsync)

    # -- archiver -------------------------------------------------------------------

    def archive(self, payload: Payload, request_meta: RequestMeta) -> Optional[ArchiverResponse]:
        """Store the payload under its sha256; a file already there is left as it is."""
        archive_dir = self._required("archive_dir", self.archive_dir)
        sha256 = get_sha256(payload.content)
        path = os.path.join(archive_dir, _relative_path(sha256))
        if not os.path.isfile(path):  # content-addressed: same name, same bytes
            os.makedirs(os.path.dirname(path), exist_ok=True)
            write_atomically(path, payload.content, self.fsync)
        return ArchiverResponse({"path": path, "sha256": sha256})

    def get(self, task: ArchiverResponse) -> Optional[Payload]:
        """The payload at ``{"path": ...}`` (relative paths below archive_dir) or
        ``{"sha256": ...}``; nothing outside archive_dir is ever read."""
        archive_dir = self._required("archive_dir", self.archive_dir)
        results = task.results or {}
        if results.get("sha256"):
            sha256 = str(results["sha256"]).lower()
            if not _SHA256.fullmatch(sha256):
                raise StoqPluginException(
                    f"plugin {self.plugin_name}: sha256 {sha256[:80]!r} is not 64 hex digits"
                )
            requested = _relative_path(sha256)
        elif results.get("path"):
            requested = str(results["path"])
        else:
            raise StoqPluginException(
                f"plugin {self.plugin_name}: archiver task needs a path or a sha256, "
                f"got {sorted(results)}"
            )
        real = self._inside_archive(archive_dir, requested)
        content = _read_regular_file(self.plugin_name, real)
        meta = PayloadMeta(extra_data={"path": real, "filename": os.path.basename(real)})
        return Payload(content, meta)

    def _inside_archive(self, archive_dir: str, requested: str) -> str:
        if "\x00" in requested:
            raise StoqPluginException(f"plugin {self.plugin_name}: path contains a NUL byte")
        real = os.path.realpath(os.path.join(archive_dir, requested))
        if os.path.commonpath([real, archive_dir]) != archive_dir or real == archive_dir:
            raise StoqPluginException(
                f"plugin {self.plugin_name}: path {requested[:200]!r} is outside archive_dir "
                f"{archive_dir} (resolves to {real})"
            )
        return real


def _relative_path(sha256: str) -> str:
    return os.path.join(sha256[:2], sha256[2:4], sha256)


def _read_regular_file(plugin_name: str, path: str) -> bytes:
    # O_NOFOLLOW: the path was resolved already; a symlink planted since is refused.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise StoqPluginException(
            f"plugin {plugin_name}: cannot read {path}: {exc.strerror}"
        ) from None
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise StoqPluginException(f"plugin {plugin_name}: {path} is not a regular file")
        return handle.read()
