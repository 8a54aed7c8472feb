"""Option converters shared by the built-in plugins (used as ``kind`` in ``option()``)."""

from __future__ import annotations

from typing import Any

_SCALES = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def size(value: Any) -> int:
    """Bytes, as a whole number or with a K/M/G/T suffix (powers of 1024): ``100M``.

    Named ``size`` because ``BasePlugin.option`` names the converter in its error
    message ("is not a valid size").
    """
    if isinstance(value, bool):
        raise ValueError("expected a size such as 1048576 or 100M")
    if isinstance(value, int):
        number = value
    else:
        text = str(value).strip().upper().removesuffix("B").removesuffix("I")
        if not text:
            raise ValueError("expected a size such as 1048576 or 100M")
        scale = _SCALES.get(text[-1], 1)
        digits = text[:-1] if text[-1] in _SCALES else text
        try:
            number = int(float(digits) * scale)
        except ValueError:
            raise ValueError("expected a size such as 1048576 or 100M") from None
    if number < 0:
        raise ValueError("must be 0 or more")
    return number


def positive_int(value: Any) -> int:
    """A whole number of at least 1."""
    number = int(value)
    if number < 1:
        raise ValueError("must be 1 or more")
    return number


def positive_float(value: Any) -> float:
    """A number greater than 0."""
    number = float(value)
    if not number > 0:
        raise ValueError("must be greater than 0")
    return number
