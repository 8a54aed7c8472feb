"""The ``stoq`` and ``stoqd`` commands.

``stoq`` keeps stoQ v2's shape (``stoq scan``, ``stoq run``, ``stoq list`` and their flags
and letters) so scripts written for stoQ keep working. ``stoqd`` starts the daemon on one
configuration file. Both validate everything before any plugin runs: a configuration
problem is one line per problem on stderr and exit 78 (EX_CONFIG), never a traceback.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import stat
import sys
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from . import logs
from .config import EX_CONFIG, ConfigError, defaults
from .framework.core import Stoq
from .framework.data import Payload, PayloadMeta, RequestMeta
from .framework.exceptions import StoqException, StoqPluginException
from .framework.helpers import dumps
from .framework.scan import save

# sysexits.h codes, so shell scripts and systemd can tell failures apart.
EX_OK = 0
EX_FAILURE = 1
EX_USAGE = 64
EX_DATAERR = 65
EX_NOINPUT = 66
EX_SOFTWARE = 70

CONFIG_ENV = "STOQ_CONFIG"
DAEMON_DEFAULT_CONFIG = "/etc/stoqd/stoq.cfg"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

# (flags, Stoq argument, help) for every option that names plugins; each takes one or
# more names and may be repeated.
_PLUGIN_LIST_FLAGS: Tuple[Tuple[Tuple[str, ...], str, str], ...] = (
    (("-a", "--always-dispatch"), "always_dispatch", "workers every payload goes to"),
    (("-s", "--start-dispatch"), "start_dispatch", "workers the first payload goes to"),
    (("-A", "--dest-archivers"), "dest_archivers", "archivers that store every payload"),
    (("-S", "--source-archivers"), "source_archivers", "archivers that fetch references"),
    (("-C", "--connectors"), "connectors", "connectors that save the result"),
    (("-R", "--dispatchers"), "dispatchers", "dispatchers that choose workers"),
    (("-D", "--decorators"), "decorators", "decorators run over the result"),
)


class _Exit(Exception):
    """Stop with ``code`` after printing ``lines`` to stderr (no traceback)."""

    def __init__(self, code: int, lines: Iterable[str]) -> None:
        super().__init__(code)
        self.code = code
        self.lines = list(lines)


# -- argument types ---------------------------------------------------------------------


def plugin_opt(text: str) -> Tuple[str, str, str]:
    """``NAME:KEY=VALUE``, split on the first ``:`` and the first ``=`` after it."""
    name, colon, rest = text.partition(":")
    key, equals, value = rest.partition("=")
    if not (colon and equals and name and key):
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME:KEY=VALUE")
    return name, key, value


def key_value(text: str) -> Tuple[str, str]:
    """``KEY=VALUE``, split on the first ``=``."""
    key, equals, value = text.partition("=")
    if not (equals and key):
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return key, value


def _non_negative(text: str) -> int:
    try:
        number = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be 0 or more")
    return number


def _log_level(text: str) -> str:
    level = text.upper()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(LOG_LEVELS)}")
    return level


# -- the parser -------------------------------------------------------------------------

_DESCRIPTION = f"""\
Scan files with stoQ v2 plugins, list plugins, or run providers.

Configuration: --config-file FILE, else ${CONFIG_ENV} when set, else built-in defaults
(no file). Flags given here win over the file's [core] keys; --plugin-opts win over
the file's plugin sections, which win over each plugin's .stoq [options].

Exit codes: 0 ok, 1 a connector failed, 64 usage, 65 input over max_payload_size,
66 input unreadable, 78 configuration problem.
"""


def _add_common(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """Options valid before or after the subcommand (``stoq --plugin-dir D scan``)."""
    default: Any = argparse.SUPPRESS if suppress else None
    parser.add_argument(
        "--config-file",
        metavar="FILE",
        default=default,
        help=f"stoq.cfg to use (default: ${CONFIG_ENV} if set, else built-in defaults)",
    )
    # Before the subcommand one DIR per flag (repeatable): "+" would swallow "scan".
    parser.add_argument(
        "--plugin-dir",
        metavar="DIR",
        nargs="+" if suppress else None,
        action="extend" if suppress else "append",
        default=default,
        help="directories searched recursively for .stoq plugin files "
        + ("(one or more)" if suppress else "(repeatable)"),
    )
    parser.add_argument(
        "--log-level",
        metavar="LEVEL",
        type=_log_level,
        default=default,
        help=f"one of {', '.join(LOG_LEVELS)} (default: [core] log_level, INFO)",
    )


def _add_scan_options(parser: argparse.ArgumentParser) -> None:
    for flags, dest, text in _PLUGIN_LIST_FLAGS:
        parser.add_argument(
            *flags, dest=dest, metavar="NAME", nargs="+", action="extend", help=text
        )
    parser.add_argument(
        "--plugin-opts",
        metavar="NAME:KEY=VALUE",
        nargs="+",
        action="extend",
        type=plugin_opt,
        default=[],
        help="plugin options; the value may contain ':' and '='",
    )
    parser.add_argument(
        "--max-recursion",
        metavar="N",
        type=_non_negative,
        help="how deep extracted payloads are scanned (default: [core] max_recursion)",
    )
    parser.add_argument("--request-source", metavar="SOURCE", help="request_meta.source")
    parser.add_argument(
        "--request-extra",
        metavar="KEY=VALUE",
        nargs="+",
        action="extend",
        type=key_value,
        default=[],
        help="request_meta.extra_data entries",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stoq",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_common(parser, suppress=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    scan = commands.add_parser(
        "scan",
        help="scan one file (or stdin) and print or save the result",
        description="Scan FILE, or stdin when FILE is absent or '-'. With no connector "
        "the result is printed as JSON; with -C it is saved through the connectors.",
    )
    _add_common(scan, suppress=True)
    scan.add_argument("file", metavar="FILE", nargs="?", default="-", help="file to scan")
    _add_scan_options(scan)

    run = commands.add_parser(
        "run",
        help="run providers until every one is exhausted",
        description="Run providers under the stoqd engine, stoQ's way: until every "
        "provider's source is exhausted. The exit code is the daemon's.",
    )
    _add_common(run, suppress=True)
    run.add_argument(
        "-P",
        "--providers",
        metavar="NAME",
        nargs="+",
        action="extend",
        help="provider plugins to run (default: [core] providers)",
    )
    _add_scan_options(run)

    listing = commands.add_parser("list", help="list the plugins that can be loaded")
    _add_common(listing, suppress=True)
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


# -- building Stoq ----------------------------------------------------------------------


def _config_file(explicit: Optional[str], fallback: Optional[str] = None) -> Optional[str]:
    return explicit or os.environ.get(CONFIG_ENV) or fallback


def _did_you_mean(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _grouped_plugin_opts(items: Iterable[Tuple[str, str, str]]) -> Dict[str, Dict[str, str]]:
    grouped: Dict[str, Dict[str, str]] = {}
    for name, key, value in items:
        grouped.setdefault(name, {})[key] = value
    return grouped


def _make_stoq(args: argparse.Namespace, **explicit: Any) -> Stoq:
    """Build ``Stoq``; a configuration or plugin-directory problem becomes ``_Exit(78)``."""
    try:
        return Stoq(
            config_file=_config_file(args.config_file),
            plugin_dir_list=args.plugin_dir,
            log_level=args.log_level,
            **explicit,
        )
    except ConfigError as exc:
        raise _Exit(EX_CONFIG, exc.problems) from None
    except StoqPluginException as exc:  # a plugin directory or .stoq file is broken
        raise _Exit(EX_CONFIG, [f"stoq: {line}" for line in str(exc).splitlines()]) from None


def _check_cli_names(stoq: Stoq, named: Dict[str, List[str]]) -> None:
    """Plugin names given on the command line, each checked against the registry."""
    known = stoq.registry.names()
    listing = ", ".join(known) or "none"
    problems = [
        f"stoq: {flag}: unknown plugin {name}{_did_you_mean(name, known)} "
        f"(known plugins: {listing}){_file_hint(name)}"
        for flag, names in named.items()
        for name in names
        if name not in known
    ]
    if problems:
        raise _Exit(EX_CONFIG, problems)


def _file_hint(name: str) -> str:
    # "stoq scan -a hash FILE" lets -a swallow FILE; say so instead of a bare "unknown".
    if os.sep in name and os.path.exists(name):
        return "; a file? put FILE right after 'scan', before the plugin flags"
    return ""


def _validate(stoq: Stoq, named: Dict[str, List[str]]) -> None:
    _check_cli_names(stoq, named)
    try:
        stoq.check()
    except ConfigError as exc:
        raise _Exit(EX_CONFIG, exc.problems) from None


def _setup_logging(stoq: Stoq) -> None:
    """Plugins' log lines go to stderr (stdout carries the result), as the daemon's do."""
    logs.setup("stoq", stoq.core("log_level"), stoq.core("log_syntax"))


def _scan_stoq(args: argparse.Namespace, **extra: Any) -> Tuple[Stoq, RequestMeta]:
    """Build and validate Stoq for ``scan`` and ``run`` from the shared flags."""
    lists = {dest: getattr(args, dest) for _, dest, _ in _PLUGIN_LIST_FLAGS}
    start_dispatch = lists.pop("start_dispatch")
    plugin_opts = _grouped_plugin_opts(args.plugin_opts)
    stoq = _make_stoq(
        args,
        plugin_opts=plugin_opts,
        max_recursion=args.max_recursion,
        **lists,
        **extra,
    )
    named = {"/".join(flags): getattr(args, dest) or [] for flags, dest, _ in _PLUGIN_LIST_FLAGS}
    named["--plugin-opts"] = list(plugin_opts)
    if extra.get("providers"):
        named["-P/--providers"] = extra["providers"]
    _validate(stoq, named)
    _setup_logging(stoq)
    args.start_dispatch = start_dispatch or []
    meta = RequestMeta(source=args.request_source, extra_data=dict(args.request_extra))
    return stoq, meta


def _load(stoq: Stoq, names: Iterable[str], prog: str = "stoq") -> None:
    """Build plugins now, so one that cannot load stops us before any scanning."""
    try:
        stoq.load_scan_plugins()
        for name in names:
            stoq.load_plugin(name)
    except StoqPluginException as exc:
        raise _Exit(EX_CONFIG, [f"{prog}: {exc}"]) from None


# -- commands ---------------------------------------------------------------------------


def _read_input(file: str, limit: int) -> Tuple[bytes, PayloadMeta]:
    """The bytes to scan, never more than ``limit`` (0: no limit) held in memory."""
    if file == "-":
        if sys.stdin is None or sys.stdin.isatty():
            raise _Exit(EX_USAGE, ["stoq: nothing to scan: give FILE, or pipe data on stdin"])
        return _read_stream(sys.stdin.buffer, "stdin", limit), PayloadMeta()
    try:
        # A FIFO is opened as `cat` would: waiting for its writer, whose bytes it then
        # reads. Anything else opens without blocking (a device must not stall the open).
        fifo = stat.S_ISFIFO(os.stat(file).st_mode)
        fd = os.open(file, os.O_RDONLY | os.O_CLOEXEC | (0 if fifo else os.O_NONBLOCK))
        with os.fdopen(fd, "rb") as handle:
            os.set_blocking(fd, True)
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):  # a pipe (`<(cmd)`), a device: no size known
                content = _read_stream(handle, file, limit)
            elif limit and info.st_size > limit:
                raise _Exit(
                    EX_DATAERR,
                    [f"stoq: {file}: {info.st_size} bytes exceeds max_payload_size {limit}"],
                )
            else:
                content = handle.read()
    except OSError as exc:
        raise _Exit(EX_NOINPUT, [f"stoq: cannot read {file}: {exc.strerror or exc}"]) from None
    return content, PayloadMeta(extra_data={"filename": os.path.basename(file)})


def _read_stream(stream: Any, name: str, limit: int) -> bytes:
    """All of a stream of unknown size, refusing more than ``limit`` bytes (0: the
    built-in max_payload_size default, so /dev/zero cannot exhaust memory)."""
    cap = limit or defaults().get("core", "max_payload_size")
    content: bytes = stream.read(cap + 1)
    if len(content) > cap:
        raise _Exit(EX_DATAERR, [f"stoq: {name}: more than max_payload_size {cap} bytes"])
    return content


def cmd_scan(args: argparse.Namespace) -> int:
    stoq, request_meta = _scan_stoq(args)
    _load(stoq, args.start_dispatch)
    content, payload_meta = _read_input(args.file, stoq.core("max_payload_size"))
    payload = Payload(content, payload_meta)
    response = stoq.scan_unsaved(payload, request_meta, args.start_dispatch)
    connectors = stoq.core("connectors")
    if not connectors:
        print(dumps(response))
        return EX_OK
    # Saved through the framework's save() rather than Stoq.save(), which also logs
    # each failure: here the failure is reported once, as our own one-line error.
    failures = save(stoq, list(connectors), response)
    response.errors["stoq"].extend(failures)
    if failures:
        raise _Exit(EX_FAILURE, [f"stoq: {failure}" for failure in failures])
    return EX_OK


def cmd_run(args: argparse.Namespace) -> int:
    stoq, request_meta = _scan_stoq(args, providers=args.providers)
    if not stoq.core("providers"):
        raise _Exit(EX_USAGE, ["stoq: nothing to run: give -P NAME or set [core] providers"])
    # The daemon's engine, stoQ's semantics: until every provider is exhausted.
    return stoq.run(request_meta=request_meta, add_start_dispatch=args.start_dispatch)


def plugin_table(listing: Dict[str, Dict[str, str]]) -> List[str]:
    """``stoq list`` as aligned lines: name, kind, description (or why it won't load)."""
    rows = [("NAME", "KIND", "DESCRIPTION")]
    for name, info in listing.items():
        kind, _, problem = info["kind"].partition(": ")
        rows.append((name, kind, problem if problem else info["description"]))
    name_width = max(len(row[0]) for row in rows)
    kind_width = max(len(row[1]) for row in rows)
    return [f"{n:<{name_width}}  {k:<{kind_width}}  {d}".rstrip() for n, k, d in rows]


def cmd_list(args: argparse.Namespace) -> int:
    stoq = _make_stoq(args)
    listing = stoq.list_plugins()
    if args.json:
        print(json.dumps(listing, indent=2))
    else:
        print("\n".join(plugin_table(listing)))
    return EX_OK


_COMMANDS = {"scan": cmd_scan, "run": cmd_run, "list": cmd_list}


def _report(error: _Exit) -> int:
    for line in error.lines:
        print(line, file=sys.stderr)
    return error.code


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``stoq``: scan, run or list, in stoQ v2's shape."""
    args = build_parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except _Exit as error:
        return _report(error)
    except StoqException as exc:  # the framework refusing something: one line, no trace
        return _report(_Exit(EX_SOFTWARE, [f"stoq: {exc}"]))


# -- stoqd ------------------------------------------------------------------------------


def _daemon_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stoqd",
        description="Run the stoqd daemon in the foreground on one configuration file.",
        epilog="Exit codes: 0 every provider exhausted, 78 configuration problem; "
        "otherwise the daemon's.",
    )
    parser.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        help=f"stoq.cfg (default: ${CONFIG_ENV} if set, else {DAEMON_DEFAULT_CONFIG})",
    )
    parser.add_argument(
        "--check-config",
        action="store_true",
        help="validate the configuration and its plugins, print 'configuration OK', exit",
    )
    return parser


def _check_daemon_plugins(stoq: Stoq) -> None:
    """--check-config goes as far as the daemon's own start-up checks: a provider is
    configured, and every plugin imports and accepts its options."""
    from .preflight import preflight

    problems, warnings = preflight(stoq, providers=True)
    for line in warnings:
        print(f"warning: {line}", file=sys.stderr)
    if problems:
        raise _Exit(EX_CONFIG, problems)


def daemon_main(argv: Optional[Sequence[str]] = None) -> int:
    """``stoqd``: validate the configuration, then run the daemon until it stops."""
    args = _daemon_parser().parse_args(argv)
    config_file = _config_file(args.config, DAEMON_DEFAULT_CONFIG)
    try:
        try:
            stoq = Stoq(config_file=config_file)
            stoq.check()
        except ConfigError as exc:
            raise _Exit(EX_CONFIG, exc.problems) from None
        except StoqPluginException as exc:
            raise _Exit(EX_CONFIG, [f"stoqd: {line}" for line in str(exc).splitlines()]) from None
        if args.check_config:
            # The daemon logs these itself; a check prints them as plain lines.
            for note in [*stoq.config.ignored, *stoq.registry.notes]:
                print(note, file=sys.stderr)
            _check_daemon_plugins(stoq)
            print("configuration OK")
            return EX_OK
        from .daemon import run_daemon  # imported late: the daemon pulls in much more
        from .pid1 import become_reaper_if_pid1

        become_reaper_if_pid1()  # in a container without an init, someone must reap orphans
        return run_daemon(stoq)
    except _Exit as error:
        return _report(error)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
