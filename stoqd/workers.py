"""A scanning worker process: take an item, scan it, save it, say how it ended.

The supervisor decides everything about time limits and retries; a worker only
scans. Items arrive one frame at a time and results leave in the same order. Items
still waiting are given back when the supervisor asks (``_give_back_when_asked``).
"""

from __future__ import annotations

import socket
import sys
import threading
from typing import Any, Dict, List, Optional

from . import childproc, logs
from .framework.core import Stoq
from .framework.data import RequestMeta, StoqResponse, new_errors
from .wire import Endpoint, Message
from .workqueue import FAILED, SAVED, ItemError, load_payload, request_meta_of


def worker_main(
    wid: int,
    sock: socket.socket,
    spec: Dict[str, Any],
    settings: Dict[str, Any],
    asks: socket.socket,
) -> None:
    childproc.prepare(f"worker:{wid}", settings)
    log = logs.get()
    endpoint = Endpoint(sock)
    threading.Thread(
        target=_give_back_when_asked, args=(asks, endpoint), name="give-back", daemon=True
    ).start()
    try:
        stoq = Stoq.from_spec(spec)
        stoq.load_scan_plugins()
    except Exception as exc:  # a plugin that cannot load: the daemon cannot scan
        error = childproc.one_line(exc)
        log.error("boot_failed", error=error)
        endpoint.send({"t": "boot_failed", "error": error})
        sys.exit(childproc.EXIT_BOOT)
    request_meta = settings.get("request_meta")
    default_meta = RequestMeta(**request_meta) if request_meta else None
    start_dispatch: List[str] = list(settings.get("add_start_dispatch") or [])
    endpoint.send({"t": "ready"})
    while True:
        message = endpoint.receive()
        if message is None or message[0].get("t") == "exit":
            return
        header, body = message
        reply = _scan_item(stoq, header, body, default_meta, start_dispatch)
        endpoint.send(reply)


def _give_back_when_asked(asks: socket.socket, endpoint: Endpoint) -> None:
    """Answer each request on ``asks`` with the items that arrived and wait unscanned.

    The supervisor sends a worker more than one item, so that it never waits between
    scans; it asks for them back when the scan ahead of them has run long, and gives
    them to another worker. This thread does it because the main thread is in that scan.
    """
    while True:
        try:
            request = asks.recv(64)
        except OSError:
            return
        if not request:
            return  # the supervisor closed it: this worker is going
        try:
            endpoint.take_waiting(_is_item, _answer)
        except OSError:
            return  # the supervisor is gone


def _is_item(header: Dict[str, Any]) -> bool:
    return header.get("t") == "item"


def _answer(endpoint: Endpoint, taken: List[Message]) -> None:
    endpoint.send({"t": "given_back", "seqs": [header["seq"] for header, _ in taken]})


def _record_failure(stoq: Stoq, request_meta: RequestMeta, reason: str) -> List[str]:
    """Save a result that says why an item could not be scanned."""
    errors = new_errors()
    errors["stoqd"].append(reason)
    response = StoqResponse(results=[], request_meta=request_meta, errors=errors)
    return stoq.save(response)


def _scan_item(
    stoq: Stoq,
    header: Dict[str, Any],
    body: bytes,
    default_meta: Optional[RequestMeta],
    start_dispatch: List[str],
) -> Dict[str, Any]:
    request_meta = request_meta_of(header, default_meta)
    reply: Dict[str, Any] = {"t": "result", "seq": header["seq"]}
    reason = header.get("fail")
    if reason is None:
        try:
            payload = load_payload(header, body, stoq.core("max_payload_size"), stoq.resolve)
        except ItemError as exc:
            reason = str(exc)
    if reason is not None:
        failures = _record_failure(stoq, request_meta, reason)
        reply.update(status=FAILED, error="; ".join([reason, *failures]))
        return reply
    response = stoq.scan_unsaved(payload, request_meta, start_dispatch)
    failures = stoq.save(response)
    # Rounded: a float's full text can hold 19 digits in a row, which the supervisor
    # would then decode with the json module (wire._quick_decode), at three times the cost.
    reply["timings"] = {k: round(v, 6) for k, v in stoq.last_timings.items()}
    reply["scan_id"] = response.scan_id
    if failures:
        reply.update(status=FAILED, error="; ".join(failures))
    else:
        reply["status"] = SAVED
    return reply
