"""Small utilities stoQ v2 plugins import from ``stoq.helpers``."""

from __future__ import annotations

import configparser
import datetime
import enum
import hashlib
import json
import os
import tempfile
import uuid
from typing import Any, List, Optional

import orjson

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


# What _to_jsonable turns into something other than an object's public attributes.
_SPECIAL = (
    bytes,
    bytearray,
    memoryview,
    set,
    frozenset,
    tuple,
    datetime.date,
    enum.Enum,
    uuid.UUID,
    float,  # a subclass (numpy.float64): orjson writes only float itself
)


def _to_jsonable(obj: Any) -> Any:
    """Turn what plugins commonly return (objects, bytes, sets, dates) into JSON types."""
    if not isinstance(obj, _SPECIAL):
        # The usual case, a result object, first: four of them per result.
        fields = getattr(obj, "__dict__", None)
        if fields is None:
            return repr(obj)
        for key in fields:
            if key[:1] == "_":  # rare: private attributes stay out
                return {k: v for k, v in fields.items() if k[:1] != "_"}
        return fields  # a third of the time of building a copy; orjson only reads it
    if isinstance(obj, (bytes, bytearray, memoryview)):
        # Results are text for people and SIEMs; undecodable bytes stay visible as escapes.
        return bytes(obj).decode("utf-8", "backslashreplace")
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if isinstance(obj, datetime.date):  # and datetime.datetime
        return obj.isoformat()
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, float):
        return float(obj)  # the number, as the json module writes a float subclass
    return str(obj)  # a UUID: as orjson writes it natively, rather than its repr


def dumps(data: Any, indent: Optional[int] = 4, compactly: bool = False) -> str:
    """Serialise stoQ objects to JSON; ``compactly`` gives one line with no spaces."""
    if compactly:
        return compact_json(data).decode("utf-8")
    return json.dumps(data, default=_to_jsonable, indent=indent)


# Compact JSON is written once per result and once per item on stoqd's private sockets;
# with the json module it was a third of a worker's CPU per 4 KiB message, and orjson
# takes under half of that. The passthrough options send dates and dataclasses to
# _to_jsonable, as the json module does, so both write the same text for them. (orjson's
# own dataclass path would be faster, but it kills the process, SIGSEGV or SIGILL, on a
# slots dataclass with an unset field or an attribute named "": a plugin's value must
# never do more than fail its save.)
_ORJSON_OPTIONS = (
    orjson.OPT_NON_STR_KEYS | orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS
)


def compact_json(data: Any, newline: bool = False) -> bytes:
    """``data`` as one line of UTF-8 JSON with no spaces, plus a newline if asked.

    What orjson refuses (an integer beyond 64 bits, a string with a lone surrogate,
    nesting deeper than 254) is written by the json module instead, as before orjson.
    Unlike the json module, NaN and infinities are written as null (valid JSON) and
    non-ASCII text as UTF-8 rather than ``\\u`` escapes.
    """
    try:
        options = _ORJSON_OPTIONS | orjson.OPT_APPEND_NEWLINE if newline else _ORJSON_OPTIONS
        return orjson.dumps(data, default=_to_jsonable, option=options)
    except orjson.JSONEncodeError:
        text = json.dumps(data, default=_to_jsonable, separators=(",", ":"))
        return (text + "\n" if newline else text).encode()  # ensure_ascii: pure ASCII


def _digest(name: str, content: bytes) -> str:
    return hashlib.new(name, content).hexdigest()


def get_md5(content: bytes) -> str:
    return _digest("md5", content)


def get_sha1(content: bytes) -> str:
    return _digest("sha1", content)


def get_sha256(content: bytes) -> str:
    return _digest("sha256", content)


def get_sha512(content: bytes) -> str:
    return _digest("sha512", content)


def parse_bool(value: Any) -> bool:
    """Booleans from any source: ``"False"`` is false, unlike ``bool("False")``."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return bool(value)
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"not a boolean: {value!r} (use true/false, yes/no, on/off or 1/0)")


def parse_list(value: Any) -> List[str]:
    """A comma-separated list, as stoQ writes them in INI files."""
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value if str(v).strip()]
    return [item.strip() for item in str(value).split(",") if item.strip()]


class StoqConfigParser(configparser.ConfigParser):
    """ConfigParser with the list and boolean readers stoQ plugins use."""

    def getlist(self, section: str, option: str, fallback: Any = None) -> Any:
        if not self.has_option(section, option):
            return fallback
        return parse_list(self.get(section, option))

    def getbool(self, section: str, option: str, fallback: Any = None) -> Any:
        if not self.has_option(section, option):
            return fallback
        return parse_bool(self.get(section, option))


def write_atomically(path: str, data: bytes, fsync: bool = False) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it over ``path``:
    a reader, or a writer killed midway, never sees part of it."""
    directory, name = os.path.split(path)
    fd, temp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fchmod(handle.fileno(), 0o644)  # mkstemp's 0600 would hide results from readers
            if fsync:
                os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass
        raise
