"""What every stoqd child does first: signals, death with the parent, logging."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
from typing import Any, Dict

from . import logs

# A child that cannot even load its plugin exits with this code, so the supervisor
# marks it FATAL at once instead of restarting it in a loop (gunicorn's boot error).
EXIT_BOOT = 3
_PR_SET_PDEATHSIG = 1


def prepare(proc: str, settings: Dict[str, Any]) -> None:
    # Ctrl-C on a terminal signals the whole process group; only the supervisor acts
    # on it and stops the children in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_on_term)
    try:  # die with the parent (the forkserver, which dies with the supervisor)
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    # Only the supervisor speaks systemd's notify protocol; a plugin that calls sd_notify
    # must not report READY or feed the watchdog on the daemon's behalf.
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        os.environ.pop(name, None)
    logs.setup(proc, settings.get("log_level", "INFO"), settings.get("log_syntax", "auto"))
    logging.captureWarnings(True)


def _exit_on_term(signum: int, frame: Any) -> None:
    # SystemExit unwinds the main thread, so a provider's finally blocks run.
    raise SystemExit(0)


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
