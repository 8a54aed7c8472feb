"""stoqd as PID 1 of a container: a minimal init that reaps orphans.

A container started without an init (``docker run`` without ``--init``) makes stoqd its
PID 1. Processes orphaned inside it -- a grandchild of a plugin whose parent exited --
are re-parented to PID 1, which must reap them or they stay zombies forever. The
supervisor cannot simply ``waitpid(-1)``: it would steal the exit statuses that
multiprocessing waits for. So PID 1 forks: the child carries on as the daemon, and the
parent only forwards signals to it and reaps whatever exits, until the daemon itself
exits; then it exits with the daemon's code, which is what the container reports.

The kernel delivers to PID 1 only the signals it has a handler for, so the parent
installs one for every signal an operator sends (``docker stop``, ``docker kill -s HUP``).
"""

from __future__ import annotations

import os
import signal

# What stoqd acts on (stop, stop, reload, and QUIT's default: stop at once). USR1/USR2
# are not forwarded: stoqd has no use for them and their default would kill it.
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)


def become_reaper_if_pid1() -> None:
    """As PID 1, fork: return in the child (the daemon); the parent never returns."""
    if os.getpid() != 1:
        return
    # Blocked across the fork, so a signal arriving in between waits instead of being lost.
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
    daemon = os.fork()
    if daemon == 0:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        return
    for signum in FORWARDED:
        signal.signal(signum, lambda received, _frame: _forward(daemon, received))
    signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    os._exit(_reap_until(daemon))


def _forward(daemon: int, signum: int) -> None:
    try:
        os.kill(daemon, signum)
    except ProcessLookupError:  # already gone: its exit is being reaped
        pass


def _reap_until(daemon: int) -> int:
    """Reap every child until ``daemon`` exits; its exit code (128 + N when killed by N)."""
    while True:
        try:
            pid, status = os.wait()  # interrupted by a forwarded signal: retried (PEP 475)
        except ChildProcessError:  # cannot happen while the daemon lives; be safe
            return 1
        if pid == daemon:
            code = os.waitstatus_to_exitcode(status)
            return code if code >= 0 else 128 - code
