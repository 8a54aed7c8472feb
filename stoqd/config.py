"""stoq.cfg: one schema for every setting, validated as a whole before anything runs.

The file is stoQ's INI format. ``[core]`` holds stoQ's keys; ``[stoqd]`` the daemon's;
``[stoqd:NAME]`` overrides supervision settings for provider NAME; every other section
holds the options of the plugin it is named after, where ``${here}`` stands for the
file's directory. Each problem is one line naming the
file, section and key; all of them are reported at once, and the caller exits 78
(EX_CONFIG) so a supervisor does not restart-loop on a typo.
"""

from __future__ import annotations

import configparser
import difflib
import grp
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

from .framework.helpers import parse_bool, parse_list

EX_CONFIG = 78
PROVIDER_SECTION_PREFIX = "stoqd:"


class ConfigError(Exception):
    """One or more problems with the configuration, one line each."""

    def __init__(self, problems: List[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


# A value that is not a number at all says only that (""), without Python's own wording.


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise ValueError("") from None
    if number < 0:
        raise ValueError("must be 0 or more")
    return number


def _positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise ValueError("") from None
    if number < 0:
        raise ValueError("must be 0 or more")
    return number


def _log_level(value: str) -> str:
    level = value.strip().upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
        raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
    return level


def _log_syntax(value: str) -> str:
    syntax = value.strip().lower()
    if syntax not in {"auto", "json", "text"}:
        raise ValueError("must be auto, json or text")
    return syntax


def _group(value: str) -> str:
    """A group name that exists on this host (empty: none)."""
    name = value.strip()
    if name:
        try:
            grp.getgrnam(name)
        except KeyError:
            raise ValueError(f"no group named {name!r} on this host") from None
    return name


def _size(value: str) -> int:
    """Bytes, with an optional K/M/G suffix (powers of 1024)."""
    text = value.strip().upper().removesuffix("B") or "0"
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1], 1)
    digits = text[:-1] if text[-1] in "KMG" else text
    try:
        number = int(float(digits) * scale)
    except ValueError:
        raise ValueError("expected a number with an optional K, M or G suffix") from None
    if number < 0:
        raise ValueError("must be 0 or more")
    return number


_KIND_NAMES: Dict[Callable[[str], Any], str] = {
    _positive_int: "a whole number >= 0",
    _positive_float: "a number of seconds >= 0",
    parse_bool: "true or false",
    parse_list: "a comma-separated list",
    _log_level: "a log level",
    _log_syntax: "auto, json or text",
    _group: "a group name",
    _size: "a size such as 100M",
    str: "text",
}


@dataclass(frozen=True)
class Setting:
    """One key of the schema: where it lives, how it parses, its default, what it does."""

    section: str
    key: str
    parse: Callable[[str], Any]
    default: str
    help: str
    plugin_list: bool = False  # a list of plugin names, checked against the registry

    @property
    def kind(self) -> str:
        return _KIND_NAMES.get(self.parse, "text")


SUPERVISION_KEYS = ("startsecs", "startretries", "backoff_initial", "backoff_max", "autostart")

SCHEMA: Tuple[Setting, ...] = (
    # [core]: stoQ's keys, same names and meaning
    Setting("core", "providers", parse_list, "", "Provider plugins to run.", True),
    Setting(
        "core",
        "source_archivers",
        parse_list,
        "",
        "Archivers that turn a provider's reference into a payload.",
        True,
    ),
    Setting("core", "dest_archivers", parse_list, "", "Archivers that store every payload.", True),
    Setting("core", "connectors", parse_list, "", "Connectors that save results.", True),
    Setting(
        "core", "dispatchers", parse_list, "", "Dispatchers that choose workers per payload.", True
    ),
    Setting(
        "core", "decorators", parse_list, "", "Decorators run over each finished response.", True
    ),
    Setting("core", "always_dispatch", parse_list, "", "Workers every payload goes to.", True),
    Setting(
        "core",
        "max_queue",
        _positive_int,
        "100",
        "Items the work queue holds before providers block (backpressure). Each worker "
        "holds up to 16 more (no more than this, at least 4).",
    ),
    Setting(
        "core", "max_recursion", _positive_int, "3", "How deep extracted payloads are scanned."
    ),
    Setting("core", "max_dispatch_passes", _positive_int, "1", "Dispatch rounds per payload."),
    Setting(
        "core",
        "max_payload_size",
        _size,
        "256M",
        "Payloads larger than this are not scanned (0: no limit).",
    ),
    Setting(
        "core",
        "plugin_dir_list",
        parse_list,
        "",
        "Directories searched recursively for .stoq plugin files (relative to this file).",
    ),
    Setting("core", "log_level", _log_level, "INFO", "Log level."),
    Setting(
        "core",
        "log_syntax",
        _log_syntax,
        "auto",
        "Log format: json, text, or auto (text on a terminal, else json).",
    ),
    Setting(
        "core",
        "provider_consumers",
        _positive_int,
        "0",
        "stoQ v2's consumer count; stoqd reads it as [stoqd] workers when that is unset.",
    ),
    # [stoqd]: the daemon's own settings
    Setting("stoqd", "workers", _positive_int, "0", "Scanning worker processes (0: one per core)."),
    Setting(
        "stoqd",
        "graceful_timeout",
        _positive_float,
        "30",
        "Seconds in-flight work gets to finish on shutdown.",
    ),
    Setting(
        "stoqd",
        "scan_timeout",
        _positive_float,
        "300",
        "Hard limit in seconds on one payload's scan; the worker is killed past it.",
    ),
    Setting(
        "stoqd",
        "max_attempts",
        _positive_int,
        "3",
        "Worker deaths one payload may cause before it is quarantined.",
    ),
    Setting(
        "stoqd",
        "worker_max_payloads",
        _positive_int,
        "0",
        "Recycle a worker after this many payloads (0: never).",
    ),
    Setting(
        "stoqd",
        "worker_max_rss",
        _size,
        "0",
        "Recycle a worker whose resident memory exceeds this (0: never).",
    ),
    Setting(
        "stoqd",
        "inline_max_bytes",
        _size,
        "256K",
        "Payloads larger than this travel as a spooled file, not through the pipe.",
    ),
    Setting(
        "stoqd",
        "spool_dir",
        str,
        "",
        "Where large payloads are spooled (default: /dev/shm/stoqd-PID or the temp dir).",
    ),
    Setting(
        "stoqd",
        "control_socket",
        str,
        "var/run/stoqd.sock",
        "Unix socket stoqctl talks to (relative to this file).",
    ),
    Setting(
        "stoqd",
        "control_group",
        _group,
        "",
        "Group allowed to use the control socket (mode 0660); empty: 0600.",
    ),
    Setting(
        "stoqd", "metrics_address", str, "", "host:port for a Prometheus endpoint; empty: off."
    ),
    Setting(
        "stoqd",
        "startsecs",
        _positive_float,
        "1",
        "A provider up this long has started; its failure count resets.",
    ),
    Setting(
        "stoqd",
        "startretries",
        _positive_int,
        "5",
        "Failed starts in a row before a provider is FATAL.",
    ),
    Setting(
        "stoqd",
        "backoff_initial",
        _positive_float,
        "0.25",
        "First restart delay in seconds; doubles per failure, with jitter.",
    ),
    Setting("stoqd", "backoff_max", _positive_float, "30", "Longest restart delay in seconds."),
    Setting(
        "stoqd",
        "autostart",
        parse_bool,
        "true",
        "Start providers with the daemon (false: wait for stoqctl start).",
    ),
)

_BY_SECTION: Dict[str, Dict[str, Setting]] = {}
for _setting in SCHEMA:
    _BY_SECTION.setdefault(_setting.section, {})[_setting.key] = _setting

# stoQ v2 keys that configure its own log files; stoqd logs to stderr for journald/Docker.
_IGNORED_CORE_KEYS = frozenset({"log_dir", "log_maxbytes", "log_backup_count"})


@dataclass
class Config:
    """A validated configuration: typed values, plugin options, where it came from."""

    path: Optional[Path]
    values: Dict[str, Dict[str, Any]]
    plugin_opts: Dict[str, Dict[str, str]] = field(default_factory=dict)
    provider_overrides: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    ignored: List[str] = field(default_factory=list)
    display_path: str = "<defaults>"  # the path as the user gave it, for messages

    def get(self, section: str, key: str) -> Any:
        return self.values[section][key]

    @property
    def base_dir(self) -> Path:
        return self.path.parent if self.path else Path.cwd()

    def resolve_path(self, value: str) -> Path:
        """A path from the file, relative to the file's own directory."""
        path = Path(os.path.expanduser(value))
        return path if path.is_absolute() else self.base_dir / path

    def supervision(self, provider: str) -> Dict[str, Any]:
        """Supervision settings for ``provider``: ``[stoqd]``, overridden by ``[stoqd:NAME]``."""
        merged = {key: self.values["stoqd"][key] for key in SUPERVISION_KEYS}
        merged.update(self.provider_overrides.get(provider, {}))
        return merged

    def workers(self) -> int:
        configured = self.values["stoqd"]["workers"] or self.values["core"]["provider_consumers"]
        return configured or (os.cpu_count() or 1)


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _parse_value(where: str, setting: Setting, raw: str, problems: List[str]) -> Any:
    try:
        return setting.parse(raw)
    except (TypeError, ValueError) as exc:
        why = f": {exc}" if str(exc) else ""
        problems.append(f"{where} {setting.key}: {raw!r} is not {setting.kind}{why}")
        return setting.parse(setting.default)


def defaults() -> Config:
    values: Dict[str, Dict[str, Any]] = {}
    for setting in SCHEMA:
        values.setdefault(setting.section, {})[setting.key] = setting.parse(setting.default)
    return Config(path=None, values=values)


def load(path: Optional[os.PathLike[str] | str]) -> Config:
    """Read and validate ``path`` (None: built-in defaults). Raises ConfigError."""
    if path is None:
        return defaults()
    file = Path(path)
    parser = configparser.ConfigParser(interpolation=None)
    try:
        with open(file, encoding="utf-8") as handle:
            parser.read_file(handle)
    except FileNotFoundError:
        raise ConfigError([f"{file}: configuration file not found"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{file}: cannot read configuration file: {exc}"]) from None
    except configparser.MissingSectionHeaderError as exc:
        raise ConfigError(
            [f"{file}: line {exc.lineno}: not a valid INI file: a key before any [section] header"]
        ) from None
    except configparser.ParsingError as exc:
        lines = file.read_text(encoding="utf-8", errors="replace").splitlines()
        raise ConfigError(
            [
                f"{file}: line {lineno}: not a valid INI file: "
                f"cannot parse {lines[lineno - 1].strip()!r}"
                for lineno, _ in exc.errors
            ]
        ) from None
    except configparser.Error as exc:
        first = str(exc).splitlines()[0]
        raise ConfigError([f"{file}: not a valid INI file: {first}"]) from None
    return _validate(file, parser)


def _validate(file: Path, parser: configparser.ConfigParser) -> Config:
    config = defaults()
    config.path = file.resolve()
    config.display_path = str(file)
    problems: List[str] = []
    for section in parser.sections():
        where = f"{file}: [{section}]"
        if section in _BY_SECTION:
            known = _BY_SECTION[section]
            for key, raw in parser.items(section):
                if section == "core" and key in _IGNORED_CORE_KEYS:
                    config.ignored.append(f"{where} {key}: ignored; stoqd logs to stderr")
                elif key not in known:
                    problems.append(f"{where} {key}: unknown key{_did_you_mean(key, known)}")
                else:
                    config.values[section][key] = _parse_value(where, known[key], raw, problems)
        elif section.startswith(PROVIDER_SECTION_PREFIX):
            name = section[len(PROVIDER_SECTION_PREFIX) :]
            overrides = config.provider_overrides.setdefault(name, {})
            for key, raw in parser.items(section):
                if key not in SUPERVISION_KEYS:
                    hint = _did_you_mean(key, SUPERVISION_KEYS)
                    problems.append(
                        f"{where} {key}: unknown key{hint} (allowed: {', '.join(SUPERVISION_KEYS)})"
                    )
                else:
                    overrides[key] = _parse_value(where, _BY_SECTION["stoqd"][key], raw, problems)
        else:
            here = str(config.base_dir)
            config.plugin_opts[section] = {
                key: raw.replace("${here}", here) for key, raw in parser.items(section)
            }
    if problems:
        raise ConfigError(problems)
    return config


def check_plugins(config: Config, known: Iterable[str]) -> None:
    """Every plugin the file names, in a list or as a section, must exist."""
    known = sorted(known)
    listing = ", ".join(known) or "none"
    name = config.display_path
    problems: List[str] = []
    for setting in SCHEMA:
        if not setting.plugin_list:
            continue
        for plugin in config.values[setting.section][setting.key]:
            if plugin not in known:
                problems.append(
                    f"{name}: [{setting.section}] {setting.key}: unknown plugin {plugin}"
                    f"{_did_you_mean(plugin, known)} (known plugins: {listing})"
                )
    sections = list(config.plugin_opts) + list(config.provider_overrides)
    for section in sections:
        if section not in known:
            shown = section if section in config.plugin_opts else PROVIDER_SECTION_PREFIX + section
            problems.append(
                f"{name}: [{shown}]: no plugin named {section}"
                f"{_did_you_mean(section, known)} (known plugins: {listing})"
            )
    if problems:
        raise ConfigError(problems)
