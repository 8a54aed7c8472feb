"""Problems found before any child starts: one line each on stderr, exit 78 (EX_CONFIG),
no process spawned, no control socket left behind."""

from __future__ import annotations

import json
from typing import Callable, List

from .helpers import Run


def _stderr_lines(log: str) -> List[str]:
    """The daemon's plain lines (its JSON log events excluded)."""
    return [line for line in log.splitlines() if not line.startswith("{")]


def _nothing_started(run: Run) -> None:
    events = [json.loads(line) for line in run.daemon.log().splitlines() if line.startswith("{")]
    assert not [e for e in events if e["event"] == "spawned"]
    assert not (run.dir / "run" / "stoqd.sock").exists()


def test_an_unknown_connector_exits_78_with_one_line(make_run: Callable[..., Run]) -> None:
    run = make_run({"core": {"providers": "source", "connectors": "jsonx"}})
    daemon = run.start()
    assert daemon.wait_exit() == 78
    lines = _stderr_lines(daemon.log())
    assert len(lines) == 1, lines
    assert lines[0].startswith(
        f"{run.config}: [core] connectors: unknown plugin jsonx (did you mean jsonl?) "
        "(known plugins: "
    )
    assert "source" in lines[0] and "hash" in lines[0]
    _nothing_started(run)


def test_an_unknown_provider_and_an_unknown_key_are_both_reported(
    make_run: Callable[..., Run],
) -> None:
    run = make_run({"core": {"providers": "sourse"}, "stoqd": {"scan_timout": 5}})
    daemon = run.start()
    assert daemon.wait_exit() == 78
    # Keys are checked first (the file must parse before plugin names mean anything).
    assert _stderr_lines(daemon.log()) == [
        f"{run.config}: [stoqd] scan_timout: unknown key (did you mean scan_timeout?)"
    ]
    _nothing_started(run)


def test_a_connector_that_rejects_its_options_exits_78(make_run: Callable[..., Run]) -> None:
    run = make_run({"core": {"providers": "source"}, "jsonl": {"output_file": " "}})
    daemon = run.start()
    assert daemon.wait_exit() == 78
    assert _stderr_lines(daemon.log()) == [f"{run.config}: [jsonl] option output_file is required"]
    _nothing_started(run)


def test_a_misspelt_worker_option_exits_78(make_run: Callable[..., Run]) -> None:
    run = make_run({"core": {"providers": "source"}, "hash": {"algoritms": "md5"}})
    daemon = run.start()
    assert daemon.wait_exit() == 78
    assert _stderr_lines(daemon.log()) == [
        f"{run.config}: [hash] algoritms: not an option of plugin hash (did you mean algorithms?)"
    ]
    _nothing_started(run)


def test_no_provider_configured_exits_78(make_run: Callable[..., Run]) -> None:
    run = make_run({"core": {"providers": ""}})
    daemon = run.start()
    assert daemon.wait_exit() == 78
    assert _stderr_lines(daemon.log()) == [
        f"{run.config}: [core] providers: no provider configured"
    ]
    _nothing_started(run)
