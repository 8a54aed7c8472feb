"""A provider's lifecycle as a pure state machine: no processes, no clock, no imports.

    STOPPED --start--> STARTING --ready--> RUNNING --returned--> EXHAUSTED
                          |                   |
                          +------crash--------+--> BACKOFF --retry--> STARTING
                          |                          (too many failed starts: FATAL)
                          +--cannot load / bad options--> FATAL
    any live state --stop--> STOPPING --exit--> STOPPED

A start counts as failed when the provider dies before it has been RUNNING for
``startsecs``; ``startretries`` failed starts in a row make it FATAL. EXHAUSTED (its
``ingest`` returned: the source ran dry) is never restarted.
"""

from enum import StrEnum


class State(StrEnum):
    STOPPED = "STOPPED"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    BACKOFF = "BACKOFF"
    STOPPING = "STOPPING"
    EXHAUSTED = "EXHAUSTED"
    FATAL = "FATAL"


class Event(StrEnum):
    START = "start"  # spawn requested (autostart, stoqctl start, backoff elapsed)
    READY = "ready"  # the child loaded its plugin and entered ingest()
    RETURNED = "returned"  # ingest() returned: source exhausted
    CRASHED = "crashed"  # exception, non-zero exit or signal
    BOOT_FAILED = "boot_failed"  # plugin cannot be imported or rejected its options
    STOP = "stop"  # stoqctl stop / daemon shutdown
    EXITED = "exited"  # the process is gone (after STOP)


# Terminal for the daemon's "are we done?" question.
FINISHED = frozenset({State.EXHAUSTED, State.FATAL, State.STOPPED})
# States in which a process exists (or is about to).
LIVE = frozenset({State.STARTING, State.RUNNING, State.STOPPING})


class IllegalTransition(Exception):
    pass


def next_state(state: State, event: Event, *, failures: int = 0, startretries: int = 0) -> State:
    """The state after ``event``. ``failures`` counts failed starts in a row, this one included."""
    if event is Event.STOP:
        if state in (State.STARTING, State.RUNNING):
            return State.STOPPING
        if state is State.BACKOFF:
            return State.STOPPED
        return state
    if event is Event.EXITED and state is State.STOPPING:
        return State.STOPPED
    if event is Event.START and state in (
        State.STOPPED,
        State.BACKOFF,
        State.FATAL,
        State.EXHAUSTED,
    ):
        return State.STARTING
    if event is Event.READY and state is State.STARTING:
        return State.RUNNING
    if event is Event.RETURNED and state in (State.STARTING, State.RUNNING):
        return State.EXHAUSTED
    if event is Event.BOOT_FAILED and state in (State.STARTING, State.RUNNING):
        return State.FATAL
    if event is Event.CRASHED and state in (State.STARTING, State.RUNNING):
        return State.FATAL if failures > startretries else State.BACKOFF
    if event in (Event.CRASHED, Event.RETURNED, Event.EXITED) and state is State.STOPPING:
        return State.STOPPED
    raise IllegalTransition(f"{event.value} in state {state.value}")
