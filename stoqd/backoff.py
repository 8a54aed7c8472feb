"""Restart delays: exponential with full jitter and a cap, as a pure function of its inputs.

supervisord's linear, wall-clock backoff makes a crash-looping provider either hammer
its broker or wait far too long; doubling with a cap bounds both, and jitter keeps many
hosts restarted by the same broker outage from reconnecting in lockstep.
"""

import random
from typing import Callable


def delay(
    failures: int, initial: float, cap: float, rand: Callable[[], float] = random.random
) -> float:
    """Seconds to wait before restart number ``failures`` (1 for the first failure).

    The nominal delay ``initial * 2**(failures-1)`` is capped at ``cap``; the result is
    drawn uniformly from its upper half so it never collapses to zero yet still spreads.
    """
    if failures <= 0:
        return 0.0
    return doubled(failures, initial, cap) * (0.5 + 0.5 * rand())


def doubled(failures: int, initial: float, cap: float) -> float:
    """``initial * 2**(failures-1)``, capped at ``cap``: the nominal delay, no jitter
    (for a pause within this process, where nothing runs in lockstep with it)."""
    return min(cap, initial * (2 ** min(max(failures, 1) - 1, 62)))


def retry_at(
    now: float, failures: int, initial: float, cap: float, rand: Callable[[], float] = random.random
) -> float:
    """The ``time.monotonic()`` instant of the next restart."""
    return now + delay(failures, initial, cap, rand)
