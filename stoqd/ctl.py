"""stoqctl: talk to a running stoqd over its control socket.

Exit codes follow supervisorctl's LSB style so scripts and health checks can rely on
them: 0 all well; 1 the daemon refused the request; 2 usage; 3 a provider is FATAL
(status); 4 the daemon is not running or cannot be reached.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from typing import Any, Dict, List, Optional

from . import config as configuration
from .control.protocol import encode

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_FATAL, EXIT_DOWN = 0, 1, 2, 3, 4
DEFAULT_CONFIG = "/etc/stoqd/stoq.cfg"


class DaemonDown(Exception):
    pass


def socket_path(args: argparse.Namespace) -> str:
    if args.socket:
        return str(args.socket)
    if os.environ.get("STOQD_SOCKET"):
        return os.environ["STOQD_SOCKET"]
    cfg_path = args.config or os.environ.get("STOQ_CONFIG") or DEFAULT_CONFIG
    cfg = configuration.load(cfg_path)
    return str(cfg.resolve_path(cfg.get("stoqd", "control_socket")))


def request(path: str, message: Dict[str, Any], timeout: float = 10.0) -> Dict[str, Any]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except BlockingIOError:  # EAGAIN: connections wait unaccepted, up to the backlog
            raise DaemonDown(
                f"stoqd on {path} is not accepting connections (its backlog is full: out of "
                "descriptors?); the request was not sent"
            ) from None
        except OSError as exc:
            raise DaemonDown(
                f"stoqd is not running (cannot connect to {path}: {exc.strerror or exc})"
            ) from None
        data = b""
        try:
            sock.sendall(encode(message))
            while not data.endswith(b"\n"):
                chunk = sock.recv(1 << 16)
                if not chunk:
                    break
                data += chunk
        except TimeoutError:
            # Connected, so it runs; one out of descriptors leaves the connection in its
            # backlog, and the request may still be carried out once it is read.
            raise DaemonDown(
                f"stoqd did not answer on {path} within {timeout:g} s; "
                "the request may still be carried out"
            ) from None
        except OSError as exc:  # it died meanwhile
            raise DaemonDown(
                f"stoqd closed the connection on {path} without answering: {exc.strerror or exc}"
            ) from None
    finally:
        sock.close()
    if not data:
        raise DaemonDown(f"stoqd closed the connection on {path} without answering")
    try:
        answer = json.loads(data)
    except ValueError:
        answer = None
    if not isinstance(answer, dict):  # not stoqd on the other end, or cut short
        raise DaemonDown(f"what answers on {path} is not stoqd (its answer is not a JSON object)")
    return answer


def _duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    whole = int(seconds)
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


# What the shipped providers report that an operator looks for first; every statistic
# is shown by `stoqctl status NAME` and `--json`.
HEADLINE_STATS = (
    "connection",
    "acknowledgement",
    "backlog",
    "oldest_age",
    "in_flight",
    "received",
    "acked",
    "nacked",
    "dead_lettered",
    "dropped",
    "lag",
)


def _headline(key: str, value: Any) -> str:
    if key == "acknowledgement" and isinstance(value, str):
        value = value.split(":")[0]  # "none: ZeroMQ has no ..." -> "none"
    elif isinstance(value, float):
        value = f"{value:.1f}"
    return f"{key}={value}"


def _provider_info(p: Dict[str, Any]) -> str:
    parts: List[str] = []
    if p.get("next_retry_in") is not None:
        parts.append(f"retry in {p['next_retry_in']:.1f}s")
    if p.get("last_error"):
        parts.append(f"error: {p['last_error']}")
    stats = p.get("stats") or {}
    headline = [key for key in HEADLINE_STATS if key in stats]
    # A provider of one's own, reporting none of the well-known figures, shows all it says.
    parts += [_headline(key, stats[key]) for key in headline or stats]
    return ", ".join(parts)


def render_provider(provider: Dict[str, Any]) -> str:
    """Everything known about one provider (its status entry), one ``key  value`` per line."""
    fields = {k: v for k, v in provider.items() if k != "stats"}
    fields.update(provider.get("stats") or {})
    width = max(len(key) for key in fields)
    return "\n".join(f"{key.ljust(width)}  {value}" for key, value in fields.items())


def _table(rows: List[List[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def render(status: Dict[str, Any]) -> str:
    """The people's view of a status snapshot."""
    daemon = status["daemon"]
    lines = [f"stoqd {daemon['state']}, pid {daemon['pid']}, uptime {_duration(daemon['uptime'])}"]
    rows = [["PROVIDER", "STATE", "PID", "UPTIME", "RESTARTS", "PUT", "SAVED", "FAILED", "INFO"]]
    for p in status["providers"]:
        rows.append(
            [
                p["name"],
                p["state"],
                str(p["pid"] or "-"),
                _duration(p["uptime"]),
                str(p["restarts"]),
                str(p["put"]),
                str(p["saved"]),
                str(p["failed"]),
                _provider_info(p),
            ]
        )
    lines += ["", _table(rows)]
    rows = [["WORKER", "PID", "STATE", "CURRENT", "AGE", "DONE"]]
    for w in status["workers"]:
        current = w.get("current") or {}
        rows.append(
            [
                str(w["id"]),
                str(w["pid"]),
                w["state"],
                f"{current['provider']}#{current['seq']}" if current else "-",
                f"{current['age']:.1f}s" if current else "-",
                str(w["payloads"]),
            ]
        )
    lines += ["", _table(rows)]
    if daemon.get("worker_error"):
        retry = daemon.get("worker_retry_in")
        working = [w for w in status["workers"] if w["state"] != "retiring"]
        lines += [
            "",
            f"workers: {len(working)} of {daemon['workers']}, error: {daemon['worker_error']}"
            + (f", retry in {max(0.0, retry):.1f}s" if retry is not None else ""),
        ]
    queue = status["queue"]
    lines += ["", f"queue: {queue['depth']}/{queue['max']} waiting, {queue['in_flight']} in flight"]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="stoqctl", description="Control a running stoqd.")
    parser.add_argument(
        "-c", "--config", help=f"stoqd's config file (default: $STOQ_CONFIG or {DEFAULT_CONFIG})"
    )
    parser.add_argument("-s", "--socket", help="control socket path (default: from the config)")
    sub = parser.add_subparsers(dest="command", required=True)
    status_parser = sub.add_parser("status", help="providers, workers and the queue")
    status_parser.add_argument("--json", action="store_true", help="machine-readable output")
    status_parser.add_argument("provider", nargs="?", help="show every statistic of one provider")
    for verb in ("start", "stop", "restart"):
        sub.add_parser(verb, help=f"{verb} a provider").add_argument("name")
    sub.add_parser("shutdown", help="stop stoqd gracefully")
    sub.add_parser("reload", help="re-read the configuration (as SIGHUP)")
    args = parser.parse_args(argv)
    try:
        path = socket_path(args)
    except configuration.ConfigError as exc:
        print("\n".join(exc.problems), file=sys.stderr)
        return EXIT_DOWN
    message: Dict[str, Any] = {"cmd": args.command}
    if getattr(args, "name", None):
        message["name"] = args.name
    try:
        answer = request(path, message)
    except DaemonDown as exc:
        print(f"stoqctl: {exc}", file=sys.stderr)
        return EXIT_DOWN
    if not answer.get("ok"):
        print(f"stoqctl: {answer.get('error')}", file=sys.stderr)
        return EXIT_REFUSED
    if args.command != "status":
        print(answer.get("message", "ok"))
        return EXIT_OK
    status = answer["status"]
    if args.provider:
        return _show_provider(status, args.provider, args.json)
    print(json.dumps(status, indent=2) if args.json else render(status))
    fatal = any(p["state"] == "FATAL" for p in status["providers"])
    return EXIT_FATAL if fatal else EXIT_OK


def _show_provider(status: Dict[str, Any], name: str, as_json: bool) -> int:
    """``stoqctl status NAME``: one provider in full; exit 3 if it is FATAL."""
    found = [p for p in status["providers"] if p["name"] == name]
    if not found:
        known = ", ".join(p["name"] for p in status["providers"]) or "none"
        print(f"stoqctl: no provider named {name!r} (running: {known})", file=sys.stderr)
        return EXIT_REFUSED
    print(json.dumps(found[0], indent=2) if as_json else render_provider(found[0]))
    return EXIT_FATAL if found[0]["state"] == "FATAL" else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
