"""The control socket's protocol: one JSON object per line each way, then close."""

from __future__ import annotations

import json
from typing import Any, Dict

MAX_REQUEST = 64 * 1024


class ControlError(Exception):
    """A request the daemon refuses; the message is shown to the user as is."""


def encode(message: Dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def decode_request(line: bytes) -> Dict[str, Any]:
    try:
        request = json.loads(line)
    except ValueError:
        raise ControlError("request is not JSON") from None
    if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
        raise ControlError('request must be {"cmd": ...}')
    return request
