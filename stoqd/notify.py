"""systemd's notify protocol (sd_notify), written directly on a Unix datagram socket.

Under ``Type=notify`` systemd passes ``NOTIFY_SOCKET`` (a filesystem path, or ``@name``
for the abstract namespace) and waits for ``READY=1`` before it calls the unit started.
Each message is one datagram of newline-separated ``KEY=VALUE`` assignments.

Everything here is a no-op when ``NOTIFY_SOCKET`` is unset (a terminal, Docker,
supervisord), and nothing ever raises into the caller: the daemon must keep scanning
even if systemd's socket goes away. The first failure is logged once as a warning.

The supervisor calls :func:`ready` once providers and workers are up, :func:`status`
with live counts, :func:`reloading` on SIGHUP, :func:`stopping` on shutdown, and
:func:`watchdog` every :func:`watchdog_ping_interval` seconds from its loop.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Optional

log = logging.getLogger("stoqd.notify")

# A wedged service manager must not stall the supervisor loop for long.
_SEND_TIMEOUT = 1.0


class Notifier:
    """Sends notify messages to one ``NOTIFY_SOCKET`` address (``None``: do nothing)."""

    def __init__(self, socket_env: Optional[str]) -> None:
        self.socket_env = socket_env
        self.address: Optional[str] = None
        self._sock: Optional[socket.socket] = None
        self._warned = False
        if socket_env:
            self.address = self._parse(socket_env)

    def _parse(self, value: str) -> Optional[str]:
        if value.startswith("@"):
            # Abstract namespace: a leading NUL byte instead of the "@".
            return "\0" + value[1:]
        if value.startswith("/"):
            return value
        self._warn(f"NOTIFY_SOCKET={value!r} is not a path or @name; notifications are off")
        return None

    @property
    def enabled(self) -> bool:
        """True when messages are actually sent somewhere."""
        return self.address is not None

    def send(self, *assignments: str) -> bool:
        """Send one datagram of ``KEY=VALUE`` lines; True if it was sent."""
        if self.address is None:
            return False
        data = "\n".join(assignments).encode("utf-8")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.settimeout(_SEND_TIMEOUT)
            self._sock.sendto(data, self.address)
        except OSError as exc:
            self._warn(f"cannot notify systemd at {self.socket_env}: {exc}")
            self.close()  # a fresh socket next time, in case the manager came back
            return False
        return True

    def close(self) -> None:
        """Close the socket; the next message opens a new one."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _warn(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            log.warning(message)


_default: Optional[Notifier] = None


def default() -> Notifier:
    """The notifier for the current ``NOTIFY_SOCKET`` (rebuilt if the variable changed)."""
    global _default
    current = os.environ.get("NOTIFY_SOCKET") or None
    if _default is None or _default.socket_env != current:
        if _default is not None:
            _default.close()
        _default = Notifier(current)
    return _default


def _clean(text: str) -> str:
    # A newline would start a new assignment: a status line must stay one line.
    return " ".join(text.splitlines())


def _monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def ready(status_text: Optional[str] = None) -> bool:
    """Tell systemd the daemon is up (providers and workers started)."""
    extra = [f"STATUS={_clean(status_text)}"] if status_text is not None else []
    return default().send("READY=1", *extra)


def reloading() -> bool:
    """Tell systemd a reload began; send :func:`ready` when it is done.

    systemd 253+ (``Type=notify-reload``) wants the monotonic time with it.
    """
    return default().send("RELOADING=1", f"MONOTONIC_USEC={_monotonic_usec()}")


def stopping(status_text: Optional[str] = None) -> bool:
    """Tell systemd the daemon is shutting down (draining)."""
    extra = [f"STATUS={_clean(status_text)}"] if status_text is not None else []
    return default().send("STOPPING=1", *extra)


def status(text: str) -> bool:
    """A one-line status shown by ``systemctl status``."""
    return default().send(f"STATUS={_clean(text)}")


def watchdog() -> bool:
    """A watchdog keep-alive; send one every :func:`watchdog_ping_interval` seconds."""
    return default().send("WATCHDOG=1")


def extend_timeout(seconds: float) -> bool:
    """Ask for ``seconds`` more before systemd times out the current start or stop."""
    return default().send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")


def main_pid(pid: Optional[int] = None) -> bool:
    """Tell systemd which process is the service's main process (default: this one)."""
    return default().send(f"MAINPID={os.getpid() if pid is None else pid}")


def watchdog_interval() -> Optional[float]:
    """Seconds of systemd's watchdog for this process, or None when it is off.

    ``WATCHDOG_USEC`` is the interval; ``WATCHDOG_PID``, when set, names the process it
    is meant for (children that inherited the environment must not answer for it).
    """
    raw_usec = os.environ.get("WATCHDOG_USEC", "")
    raw_pid = os.environ.get("WATCHDOG_PID", "")
    try:
        usec = int(raw_usec)
        if raw_pid and int(raw_pid) != os.getpid():
            return None
    except ValueError:
        return None
    return usec / 1_000_000 if usec > 0 else None


def watchdog_ping_interval() -> Optional[float]:
    """How often to call :func:`watchdog`: half the interval, as systemd recommends."""
    interval = watchdog_interval()
    return None if interval is None else interval / 2
