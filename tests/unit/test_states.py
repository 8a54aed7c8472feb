"""One test per transition of the provider state machine: no processes, no clock."""

import pytest

from stoqd.states import Event, IllegalTransition, State, next_state


@pytest.mark.parametrize(
    ("state", "event", "expected"),
    [
        (State.STOPPED, Event.START, State.STARTING),
        (State.BACKOFF, Event.START, State.STARTING),
        (State.FATAL, Event.START, State.STARTING),
        (State.EXHAUSTED, Event.START, State.STARTING),
        (State.STARTING, Event.READY, State.RUNNING),
        (State.RUNNING, Event.RETURNED, State.EXHAUSTED),
        (State.STARTING, Event.RETURNED, State.EXHAUSTED),
        (State.STARTING, Event.BOOT_FAILED, State.FATAL),
        (State.RUNNING, Event.BOOT_FAILED, State.FATAL),
        (State.STARTING, Event.STOP, State.STOPPING),
        (State.RUNNING, Event.STOP, State.STOPPING),
        (State.BACKOFF, Event.STOP, State.STOPPED),
        (State.STOPPING, Event.EXITED, State.STOPPED),
        (State.STOPPING, Event.CRASHED, State.STOPPED),
        (State.STOPPING, Event.RETURNED, State.STOPPED),
    ],
)
def test_transition(state: State, event: Event, expected: State) -> None:
    assert next_state(state, event) is expected


def test_crash_within_retries_backs_off() -> None:
    assert next_state(State.RUNNING, Event.CRASHED, failures=3, startretries=3) is State.BACKOFF


def test_crash_past_retries_is_fatal() -> None:
    assert next_state(State.STARTING, Event.CRASHED, failures=4, startretries=3) is State.FATAL


def test_stop_leaves_finished_states_alone() -> None:
    for state in (State.STOPPED, State.EXHAUSTED, State.FATAL, State.STOPPING):
        assert next_state(state, Event.STOP) is state


@pytest.mark.parametrize(
    ("state", "event"),
    [
        (State.EXHAUSTED, Event.CRASHED),
        (State.STOPPED, Event.READY),
        (State.RUNNING, Event.START),
        (State.FATAL, Event.READY),
        (State.BACKOFF, Event.EXITED),
    ],
)
def test_illegal_transitions_are_refused(state: State, event: Event) -> None:
    with pytest.raises(IllegalTransition, match=f"{event.value} in state {state.value}"):
        next_state(state, event)
