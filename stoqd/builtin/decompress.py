"""Worker ``decompress``: members of zip, gzip, bzip2, xz and tar payloads, within limits.

The format is recognised by magic bytes, never by file name. Decompression streams in
1 MiB chunks and stops at the first limit: ``max_member_size`` (one member),
``max_total_size`` (every member extracted from one root payload, nested archives
included), ``max_ratio`` (expanded / compressed size of a member) and ``max_members``
(members of one archive). Each limit hit is one line in the result's errors; what was
extracted before it is kept. How deep nested archives go is the framework's
``max_recursion``.
"""

from __future__ import annotations

import zipfile
from collections import OrderedDict
from configparser import ConfigParser
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

from stoqd.framework.data import (
    ExtractedPayload,
    Payload,
    PayloadMeta,
    RequestMeta,
    WorkerResponse,
)
from stoqd.framework.exceptions import StoqPluginException
from stoqd.framework.plugins import WorkerPlugin

from ._archives import CORRUPT, Member, StreamReader, TarReader, ZipReader, detect, tar_skip_reason
from ._options import positive_float, positive_int, size

# The ratio is judged only past this many expanded bytes: a small file of zeros
# legitimately compresses 1000-fold and is no danger.
RATIO_FLOOR = 1 << 20
# Root payloads whose byte budget is remembered (a worker scans them one at a time, so
# only the latest few matter; the bound keeps a long-running worker's memory flat).
_BUDGETS_KEPT = 4096
# Skipped entries listed in the results at most (the count is always exact).
_SKIPPED_LISTED = 100


@dataclass(frozen=True)
class Limits:
    """The caps of one extraction, from the plugin's options."""

    max_member_size: int
    max_total_size: int
    max_ratio: float
    max_members: int


class Budget:
    """Expanded bytes already extracted from one root payload and its descendants."""

    def __init__(self) -> None:
        self.used = 0


class LimitHit(Exception):
    """A cap was reached; ``stop`` means no further member of this archive is read."""

    def __init__(self, message: str, stop: bool) -> None:
        super().__init__(message)
        self.stop = stop


class DecompressPlugin(WorkerPlugin):
    """Extracted payloads carry ``extra_data`` with ``filename`` and ``archive`` (format)."""

    def __init__(self, config: ConfigParser, plugin_opts: Optional[Dict[str, Any]] = None) -> None:
        super().__init__(config, plugin_opts)
        self.passwords: List[str] = self.option("passwords", [], list)
        self.limits = Limits(
            max_member_size=self._positive_size("max_member_size", 100 << 20),
            max_total_size=self._positive_size("max_total_size", 256 << 20),
            max_ratio=self.option("max_ratio", 250.0, positive_float),
            max_members=self.option("max_members", 1000, positive_int),
        )
        self._budgets: OrderedDict[str, Budget] = OrderedDict()

    def _positive_size(self, name: str, default: int) -> int:
        value = self.option(name, default, size)
        if value < 1:
            raise StoqPluginException(f"plugin {self.plugin_name}: option {name} must be 1 or more")
        return value

    def scan(self, payload: Payload, request_meta: RequestMeta) -> Optional[WorkerResponse]:
        fmt = detect(payload.content)
        if fmt is None:
            return None  # not an archive: nothing to say
        extraction = Extraction(fmt, self.limits, self._budget_for(payload))
        try:
            if fmt == "zip":
                self._unzip(payload.content, extraction)
            elif fmt == "tar":
                self._untar(payload.content, extraction)
            else:
                reader = StreamReader(fmt, payload.content)
                for member in reader.members():
                    extraction.take(member, consumed=reader.consumed)
        except LimitHit as hit:
            extraction.errors.append(str(hit))
        except CORRUPT as exc:
            extraction.errors.append(f"{fmt} archive is corrupt: {_reason(exc)}")
        return extraction.response()

    def _budget_for(self, payload: Payload) -> Budget:
        """The budget of the root payload this one descends from (a new one for a root).

        Children come back with ``extracted_from`` set to the id of the payload they
        were extracted from, so the chain of ids leads every nested archive to the
        budget of its root.
        """
        budget = self._budgets.get(payload.extracted_from or "") or Budget()
        self._budgets[payload.payload_id] = budget
        self._budgets.move_to_end(payload.payload_id)
        while len(self._budgets) > _BUDGETS_KEPT:
            self._budgets.popitem(last=False)
        return budget

    def _unzip(self, content: bytes, extraction: Extraction) -> None:
        reader = ZipReader(content)
        entries = reader.entries()
        for index, info in enumerate(entries):
            if index >= self.limits.max_members:
                raise LimitHit(
                    f"max_members {self.limits.max_members} reached: {len(entries) - index} "
                    "more zip members not extracted",
                    stop=True,
                )
            name = info.filename
            if not info.flag_bits & 0x1:
                extraction.take_guarded(name, lambda: reader.member(info, None))
                continue
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                # WinZip's AES (method 99) and the like: zipfile cannot decrypt them.
                extraction.errors.append(
                    f"zip member {name!r} is encrypted with compression method "
                    f"{info.compress_type}, which is not supported; skipped"
                )
                continue
            if not self.passwords:
                extraction.errors.append(
                    f"zip member {info.filename!r} is encrypted and no passwords are "
                    "configured; skipped"
                )
                continue
            for password in self.passwords:
                opener = lambda pw=password: reader.member(info, pw)  # noqa: E731
                if extraction.take_guarded(name, opener, quiet=True):
                    break
            else:
                extraction.errors.append(
                    f"zip member {info.filename!r} is encrypted and none of the "
                    f"{len(self.passwords)} passwords fit; skipped"
                )

    def _untar(self, content: bytes, extraction: Extraction) -> None:
        reader = TarReader(content)
        for index, info in enumerate(reader.entries()):
            if index >= self.limits.max_members:
                raise LimitHit(
                    f"max_members {self.limits.max_members} reached: later tar members "
                    "not extracted",
                    stop=True,
                )
            reason = tar_skip_reason(info)
            if reason is not None:
                extraction.skip(info.name, reason)
            else:
                extraction.take_guarded(info.name, lambda: reader.member(info))


class Extraction:
    """One payload being unpacked: the members taken, the errors, the limits applied."""

    def __init__(self, fmt: str, limits: Limits, budget: Budget) -> None:
        self.fmt = fmt
        self.limits = limits
        self.budget = budget
        self.extracted: List[ExtractedPayload] = []
        self.errors: List[str] = []
        self.skipped: List[Dict[str, str]] = []
        self.skipped_count = 0

    def skip(self, name: str, reason: str) -> None:
        self.skipped_count += 1
        if len(self.skipped) < _SKIPPED_LISTED:
            self.skipped.append({"filename": name, "reason": reason})

    def take_guarded(
        self, name: str, open_member: Callable[[], Member], quiet: bool = False
    ) -> bool:
        """Open and take member ``name``; a corrupt member (or, when ``quiet``, a wrong
        password) is reported or ignored and the archive goes on. A limit that stops the
        whole archive propagates. True when the member was dealt with."""
        try:
            self.take(open_member())
            return True
        except LimitHit as hit:
            if hit.stop:
                raise
            self.errors.append(str(hit))
            return True  # judged and refused: trying other passwords would not help
        except (RuntimeError, *CORRUPT) as exc:
            # RuntimeError: zipfile's "Bad password"; a wrong password that passes the
            # one-byte check shows up as corrupt data or a CRC error instead.
            if not quiet:
                self.errors.append(
                    f"{self.fmt} member {name!r} cannot be extracted: {_reason(exc)}; skipped"
                )
            return False

    def take(self, member: Member, consumed: Optional[Callable[[], int]] = None) -> None:
        """Read ``member`` under every cap and keep it; ``consumed`` gives the compressed
        bytes read so far when only the stream knows it (gzip, bzip2, xz)."""
        label = f"{self.fmt} member {member.name!r}" if member.name else f"{self.fmt} stream"
        if member.declared_size is not None:
            self._check(label, member.declared_size, member.compressed_size)
        chunks: List[bytes] = []
        produced = 0
        try:
            for chunk in member.chunks:
                produced += len(chunk)
                self._check(label, produced, consumed() if consumed else member.compressed_size)
                chunks.append(chunk)
        finally:
            # Stopping early must release the archive handle behind the generator now.
            close = getattr(member.chunks, "close", None)
            if close is not None:
                close()
        self.budget.used += produced
        extra = {"filename": member.name, "archive": self.fmt, **member.extra}
        if member.name is None:
            del extra["filename"]
        meta = PayloadMeta(extra_data=extra)
        self.extracted.append(ExtractedPayload(b"".join(chunks), meta))

    def _check(self, label: str, produced: int, compressed: int) -> None:
        limits = self.limits
        if produced > limits.max_member_size:
            raise LimitHit(
                f"{label} exceeds max_member_size {limits.max_member_size} bytes; skipped",
                stop=False,
            )
        ratio = produced / max(1, compressed)
        if produced > RATIO_FLOOR and ratio > limits.max_ratio:
            raise LimitHit(
                f"{label} exceeds max_ratio {limits.max_ratio:g} "
                f"({produced} bytes from {compressed} compressed); skipped",
                stop=False,
            )
        if self.budget.used + produced > limits.max_total_size:
            raise LimitHit(
                f"max_total_size {limits.max_total_size} bytes reached at {label}; "
                "it and later members not extracted",
                stop=True,
            )

    def response(self) -> WorkerResponse:
        results: Dict[str, Any] = {"archive": self.fmt, "extracted": len(self.extracted)}
        if self.skipped_count:
            results["skipped"] = self.skipped
            results["skipped_count"] = self.skipped_count
        return WorkerResponse(results=results, extracted=self.extracted, errors=self.errors)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
