"""The objects that flow through a scan, with stoQ v2's names, signatures and JSON shape.

A plugin written for stoQ v2 builds and reads these exactly as it did there; a
``StoqResponse`` serialises to the same keys, so downstream consumers of stoQ results
keep working.
"""

from __future__ import annotations

import os
from collections import defaultdict
from datetime import UTC, datetime
from typing import Any, DefaultDict, Dict, List, Optional


def new_id() -> str:
    """A random (version 4) UUID as text: what ``str(uuid.uuid4())`` gives.

    Every scan makes at least two (``scan_id``, ``payload_id``); building a ``uuid.UUID``
    object for each took three times as long as these lines.
    """
    text = os.urandom(16).hex()
    # The version nibble is 4; the variant's two top bits are 10, its other two random.
    return f"{text[:8]}-{text[8:12]}-4{text[13:16]}-{_VARIANT[text[16]]}{text[17:20]}-{text[20:]}"


_VARIANT = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}


class PayloadMeta:
    """What the producer of a payload says about it."""

    def __init__(
        self,
        should_archive: bool = True,
        extra_data: Optional[Dict[str, Any]] = None,
        dispatch_to: Optional[List[str]] = None,
    ) -> None:
        self.should_archive = should_archive
        self.extra_data = {} if extra_data is None else extra_data
        self.dispatch_to = [] if dispatch_to is None else dispatch_to

    def __repr__(self) -> str:
        return f"PayloadMeta({self.__dict__!r})"


class Payload:
    """A blob of bytes and what is known about it, as a worker plugin sees it."""

    def __init__(
        self,
        content: bytes,
        payload_meta: Optional[PayloadMeta] = None,
        extracted_by: Optional[str] = None,
        extracted_from: Optional[str] = None,
        payload_id: Optional[str] = None,
    ) -> None:
        self.content = content
        self.payload_meta = PayloadMeta() if payload_meta is None else payload_meta
        self.extracted_by = extracted_by
        self.extracted_from = extracted_from
        self.payload_id = new_id() if payload_id is None else payload_id
        # stoQ v2 records per dispatch pass which workers ran and what they returned.
        self.plugins_run: Dict[str, List[Any]] = {"workers": [[]], "archivers": []}
        self.worker_results: List[Dict[str, Any]] = [{}]
        self.archiver_results: Dict[str, Any] = {}

    def __repr__(self) -> str:
        return (
            f"Payload(id={self.payload_id!r}, size={len(self.content)}, "
            f"extracted_by={self.extracted_by!r})"
        )


class RequestMeta:
    """What the requester says about a whole scan request."""

    def __init__(
        self,
        archive_payloads: bool = True,
        source: Optional[str] = None,
        extra_data: Optional[Dict[str, Any]] = None,
    ) -> None:
        self.archive_payloads = archive_payloads
        self.source = source
        self.extra_data = {} if extra_data is None else extra_data


class PayloadResults:
    """The serialisable record of one payload's scan (one entry of ``results``)."""

    def __init__(
        self,
        payload_id: str,
        size: int,
        payload_meta: PayloadMeta,
        workers: List[Dict[str, Any]],
        plugins_run: Dict[str, List[Any]],
        extracted_from: Optional[str] = None,
        extracted_by: Optional[str] = None,
        archivers: Optional[Dict[str, Any]] = None,
    ) -> None:
        self.payload_id = payload_id
        self.size = size
        self.payload_meta = payload_meta
        self.workers = workers
        self.plugins_run = plugins_run
        self.extracted_from = extracted_from
        self.extracted_by = extracted_by
        self.archivers = {} if archivers is None else archivers

    @classmethod
    def from_payload(cls, payload: Payload) -> PayloadResults:
        return cls(
            payload_id=payload.payload_id,
            size=len(payload.content),
            payload_meta=payload.payload_meta,
            workers=payload.worker_results,
            plugins_run=payload.plugins_run,
            extracted_from=payload.extracted_from,
            extracted_by=payload.extracted_by,
            archivers=payload.archiver_results,
        )


class StoqResponse:
    """The result of one scan request: every payload's results plus errors and decorators."""

    def __init__(
        self,
        results: List[PayloadResults],
        request_meta: RequestMeta,
        errors: DefaultDict[str, List[str]],
        time: Optional[str] = None,
        decorators: Optional[Dict[str, Any]] = None,
        scan_id: Optional[str] = None,
    ) -> None:
        self.time = datetime.now(UTC).isoformat() if time is None else time
        self.results = results
        self.request_meta = request_meta
        self.errors = errors
        self.decorators = {} if decorators is None else decorators
        self.scan_id = new_id() if scan_id is None else scan_id

    def __str__(self) -> str:
        from .helpers import dumps

        return dumps(self)


class ExtractedPayload:
    """Bytes a worker carved out of a payload, to be scanned in turn."""

    def __init__(self, content: bytes, payload_meta: Optional[PayloadMeta] = None) -> None:
        self.content = content
        self.payload_meta = PayloadMeta() if payload_meta is None else payload_meta


class WorkerResponse:
    def __init__(
        self,
        results: Optional[Dict[str, Any]] = None,
        extracted: Optional[List[ExtractedPayload]] = None,
        errors: Optional[List[str]] = None,
    ) -> None:
        self.results = results
        self.extracted = [] if extracted is None else extracted
        self.errors = [] if errors is None else errors


class ArchiverResponse:
    def __init__(
        self, results: Optional[Dict[str, Any]] = None, errors: Optional[List[str]] = None
    ) -> None:
        self.results = results
        self.errors = [] if errors is None else errors


class DispatcherResponse:
    def __init__(
        self,
        plugin_names: Optional[List[str]] = None,
        meta: Optional[Dict[str, Any]] = None,
        errors: Optional[List[str]] = None,
    ) -> None:
        self.plugin_names = [] if plugin_names is None else plugin_names
        self.meta = {} if meta is None else meta
        self.errors = [] if errors is None else errors


class DecoratorResponse:
    def __init__(
        self, results: Optional[Dict[str, Any]] = None, errors: Optional[List[str]] = None
    ) -> None:
        self.results = results
        self.errors = [] if errors is None else errors


def new_errors() -> DefaultDict[str, List[str]]:
    """The errors mapping of a response: plugin name -> messages."""
    return defaultdict(list)
