"""Small utilities stoQ v2 plugins import from ``stoq.helpers``."""

from __future__ import annotations

import configparser
import datetime
import enum
import hashlib
import json
from typing import Any, List, Optional

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


def _to_jsonable(obj: Any) -> Any:
    """Turn what plugins commonly return (objects, bytes, sets, dates) into JSON types."""
    if isinstance(obj, (bytes, bytearray, memoryview)):
        # Results are text for people and SIEMs; undecodable bytes stay visible as escapes.
        return bytes(obj).decode("utf-8", "backslashreplace")
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if isinstance(obj, (datetime.datetime, datetime.date)):
        return obj.isoformat()
    if isinstance(obj, enum.Enum):
        return obj.value
    if hasattr(obj, "__dict__"):
        return {k: v for k, v in vars(obj).items() if not k.startswith("_")}
    return repr(obj)


def dumps(data: Any, indent: Optional[int] = 4, compactly: bool = False) -> str:
    """Serialise stoQ objects to JSON; ``compactly`` gives one line with no spaces."""
    if compactly:
        return json.dumps(data, default=_to_jsonable, separators=(",", ":"))
    return json.dumps(data, default=_to_jsonable, indent=indent)


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
