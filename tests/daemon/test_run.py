"""Providers run to exhaustion: every payload they put is scanned, saved and reported back.

Results are read from the ``jsonl`` connector's file, outcomes from the file each fixture
provider records its ``done=`` callbacks in, exit codes from the processes themselves.
"""

from __future__ import annotations

import glob
import hashlib
import os
import pty
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable

from stoqd.testing import temp_dir

from .helpers import PLUGINS, Run

V2_PLUGINS = PLUGINS.parent / "stoq_v2_plugins"
SEED_SHA256 = hashlib.sha256(b"This is a payload").hexdigest()


def _hash_of(result: dict) -> str:
    workers = result["results"][0]["workers"]
    return next(w["hash"]["sha256"] for w in workers if "hash" in w)


def _id_of(result: dict) -> str:
    return result["results"][0]["payload_meta"]["extra_data"]["id"]


def test_seed_provider_under_stoqd_saves_one_result(make_run: Callable[..., Run]) -> None:
    run = make_run({"core": {"providers": "example_provider", "plugin_dir_list": str(V2_PLUGINS)}})
    daemon = run.start()
    assert daemon.wait_exit() == 0, daemon.log()
    results = run.results()
    assert len(results) == 1
    assert _hash_of(results[0]) == SEED_SHA256
    assert results[0]["errors"] == {}


def test_seed_provider_under_stoq_run(workdir: Path) -> None:
    out = workdir / "out.jsonl"
    done = subprocess.run(
        [
            str(Path(sys.executable).parent / "stoq"),
            "run",
            "-P",
            "example_provider",
            "--plugin-dir",
            str(V2_PLUGINS),
            "-a",
            "hash",
            "-C",
            "jsonl",
            "--plugin-opts",
            f"jsonl:output_file={out}",
        ],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if k != "STOQ_CONFIG"},
    )
    assert done.returncode == 0, done.stderr
    lines = out.read_text().splitlines()
    assert len(lines) == 1
    assert SEED_SHA256 in lines[0]


def test_seed_provider_from_python(workdir: Path) -> None:
    out = workdir / "out.jsonl"
    script = (
        "import sys\n"
        "from stoq import Stoq\n"
        "from stoqd import config\n"
        "cfg = config.defaults()\n"
        "cfg.values['stoqd']['workers'] = 2\n"
        f"s = Stoq(providers=['example_provider'], plugin_dir_list=[{str(V2_PLUGINS)!r}],\n"
        f"         connectors=['jsonl'], always_dispatch=['hash'],\n"
        f"         plugin_opts={{'jsonl': {{'output_file': {str(out)!r}}}}}, config=cfg)\n"
        "sys.exit(s.run())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=workdir, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    lines = out.read_text().splitlines()
    assert len(lines) == 1
    assert SEED_SHA256 in lines[0]


def test_exhausted_after_n_every_payload_saved_and_reported(make_run: Callable[..., Run]) -> None:
    run = make_run(
        {"core": {"providers": "source"}, "source": {"count": 40, "outcomes": "{dir}/outcomes"}}
    )
    daemon = run.start()
    assert daemon.wait_exit() == 0, daemon.log()
    expected = {f"item-{i}" for i in range(1, 41)}
    assert run.saved_ids() == {item_id: 1 for item_id in expected}
    outcomes = run.outcomes()
    assert sorted(o[0] for o in outcomes) == sorted(expected)
    assert {o[1] for o in outcomes} == {"saved"}
    events = [e for e in daemon.events() if e.get("provider") == "source"]
    assert [e["put"] for e in events if e["event"] == "exhausted"] == [40]


def test_huge_payloads_are_spooled_hashed_right_and_cleaned_up(
    make_run: Callable[..., Run],
) -> None:
    run = make_run(
        {
            "core": {"providers": "huge"},
            "stoqd": {"inline_max_bytes": "256K"},
            "huge": {"count": 3, "size": 8 << 20, "outcomes": "{dir}/outcomes"},
        }
    )
    daemon = run.start()
    assert daemon.wait_exit() == 0, daemon.log()
    expected = {
        f"huge-{i}": hashlib.sha256(random.Random(i).randbytes(8 << 20)).hexdigest()
        for i in range(1, 4)
    }
    got = {_id_of(r): _hash_of(r) for r in run.results()}
    assert got == expected
    assert sorted(run.outcomes()) == [(i, "saved", "-") for i in sorted(expected)]
    assert glob.glob(f"/dev/shm/stoqd-{daemon.pid}-*") == []


def test_huge_payloads_leave_the_spool_empty_while_running(make_run: Callable[..., Run]) -> None:
    spool_parent = temp_dir("stoqd-spool-")
    run = make_run(
        {
            "core": {"providers": "huge, hang"},
            "stoqd": {"spool_dir": str(spool_parent)},
            "huge": {"count": 4, "size": 1 << 20, "outcomes": "{dir}/outcomes"},
        }
    )
    daemon = run.start()
    daemon.wait_for(
        lambda s: next(p for p in s["providers"] if p["name"] == "huge")["saved"] == 4,
        what="4 huge payloads saved",
    )
    spools = list(spool_parent.iterdir())
    assert [p.name.startswith(f"stoqd-{daemon.pid}-") for p in spools] == [True]
    assert list(spools[0].iterdir()) == []  # every spooled payload removed once saved
    daemon.close()
    assert list(spool_parent.iterdir()) == []  # and the spool itself at exit
    spool_parent.rmdir()


def test_payloads_a_killed_provider_spooled_but_never_handed_over_are_removed(
    make_run: Callable[..., Run],
) -> None:
    spool_parent = temp_dir("stoqd-spool-")
    run = make_run({
        "core": {"providers": "huge, hang"},
        "stoqd": {"spool_dir": str(spool_parent), "inline_max_bytes": 1024},
        "huge": {"count": 2, "size": 64 << 10, "die_holding": 3, "marker": "{dir}/died",
                 "outcomes": "{dir}/outcomes"},
    })  # fmt: skip
    daemon = run.start()
    daemon.wait_for(
        lambda s: next(p for p in s["providers"] if p["name"] == "huge")["state"] == "EXHAUSTED"
        and next(p for p in s["providers"] if p["name"] == "huge")["saved"] == 2,
        what="the second run's 2 payloads saved",
    )  # fmt: skip
    crashed = [e for e in daemon.events() if e["event"] == "backoff" and e["provider"] == "huge"]
    assert [e["exit"] for e in crashed] == ["killed by SIGKILL"]
    (spool,) = spool_parent.iterdir()
    assert list(spool.iterdir()) == []  # the three held by the killed run too
    daemon.close()
    spool_parent.rmdir()


def test_the_spool_of_a_sigkilled_daemon_is_removed_at_the_next_start(
    make_run: Callable[..., Run],
) -> None:
    """On tmpfs a leftover spool is RAM lost until reboot; a live daemon's is never touched."""
    spool_parent = temp_dir("stoqd-spool-")
    run = make_run({"core": {"providers": "hang"}, "stoqd": {"spool_dir": str(spool_parent)}})
    killed = run.start()
    killed.wait_for(lambda s: s["providers"][0]["state"] == "RUNNING", what="RUNNING")
    [left] = list(spool_parent.iterdir())
    (left / "payload").write_bytes(b"x" * 1024)  # as if spooled when the kill came
    killed.signal(signal.SIGKILL)
    killed.wait_exit()
    neighbour = spool_parent / f"stoqd-{os.getpid()}-0000live"  # a running daemon's
    neighbour.mkdir()
    second = run.start()
    second.wait_for(lambda s: s["providers"][0]["state"] == "RUNNING", what="RUNNING")
    spools = sorted(p.name for p in spool_parent.iterdir())
    assert left.name not in spools
    assert neighbour.name in spools and len(spools) == 2
    second.close()
    neighbour.rmdir()
    shutil.rmtree(spool_parent, ignore_errors=True)


def test_put_file_payloads_are_read_by_the_worker(make_run: Callable[..., Run]) -> None:
    run = make_run(
        {
            "core": {"providers": "files"},
            "files": {"source_dir": "{dir}/incoming", "outcomes": "{dir}/outcomes"},
        }
    )
    source = Path(run.path("incoming"))
    source.mkdir()
    contents = {f"file-{i}.bin": os.urandom(1000 * i) for i in range(1, 6)}
    contents["big.bin"] = os.urandom(3 << 20)
    for name, data in contents.items():
        (source / name).write_bytes(data)
    daemon = run.start()
    assert daemon.wait_exit() == 0, daemon.log()
    got = {}
    for result in run.results():
        meta = result["results"][0]["payload_meta"]["extra_data"]
        got[meta["id"]] = (_hash_of(result), meta["filename"], meta["path"])
    assert got == {
        name: (hashlib.sha256(data).hexdigest(), name, str(source / name))
        for name, data in contents.items()
    }
    assert sorted(run.outcomes()) == [(name, "saved", "-") for name in sorted(contents)]


def test_a_failing_connector_is_reported_failed_to_the_provider(
    make_run: Callable[..., Run],
) -> None:
    run = make_run(
        {
            "core": {"providers": "source", "connectors": "jsonl, flaky_connector"},
            "source": {"count": 6, "outcomes": "{dir}/outcomes"},
            "flaky_connector": {"fail_ids": "item-2, item-5"},
        }
    )
    daemon = run.start()
    assert daemon.wait_exit() == 0, daemon.log()
    outcomes = {o[0]: (o[1], o[2]) for o in run.outcomes()}
    rejected = "connector flaky_connector failed: OSError: flaky_connector: database rejected"
    assert outcomes == {
        "item-1": ("saved", "-"),
        "item-2": ("failed", f"{rejected} item-2"),
        "item-3": ("saved", "-"),
        "item-4": ("saved", "-"),
        "item-5": ("failed", f"{rejected} item-5"),
        "item-6": ("saved", "-"),
    }
    failed = [e for e in daemon.events() if e["event"] == "failed"]
    assert len(failed) == 2


def test_a_raising_worker_is_an_error_in_a_saved_result(make_run: Callable[..., Run]) -> None:
    run = make_run(
        {
            "core": {"providers": "source", "always_dispatch": "hash, raiser"},
            "source": {
                "count": 3,
                "special": "2",
                "special_prefix": "RAISE",
                "outcomes": "{dir}/outcomes",
            },
        }
    )
    daemon = run.start()
    assert daemon.wait_exit() == 0, daemon.log()
    assert sorted(run.outcomes()) == [(f"item-{i}", "saved", "-") for i in (1, 2, 3)]
    errors = {
        r["results"][0]["payload_meta"]["extra_data"]["id"]: r["errors"] for r in run.results()
    }
    assert errors["item-1"] == errors["item-3"] == {}
    assert errors["item-2"] == {"raiser": ["ValueError: raiser: cannot parse 12 bytes"]}


def test_put_file_paths_a_worker_cannot_read_are_failed(make_run: Callable[..., Run]) -> None:
    run = make_run({})
    missing, directory, fifo = run.dir / "missing.bin", run.dir / "a-dir", run.dir / "a-fifo"
    directory.mkdir()
    os.mkfifo(fifo)
    run.configure({
        "core": {"providers": "files"},
        "files": {"source_dir": "{dir}/incoming", "outcomes": "{dir}/outcomes",
                  "extra_paths": f"{missing}, {directory}, {fifo}"},
    })  # fmt: skip
    (run.dir / "incoming").mkdir()
    (run.dir / "incoming" / "good.bin").write_bytes(b"readable")
    daemon = run.start()
    assert daemon.wait_exit() == 0, daemon.log()
    assert sorted(run.outcomes()) == sorted([
        ("good.bin", "saved", "-"),
        (str(missing), "failed", f"cannot read {missing}: No such file or directory"),
        (str(directory), "failed", f"cannot read {directory}: not a regular file"),
        (str(fifo), "failed", f"cannot read {fifo}: not a regular file"),
    ])  # fmt: skip
    assert sorted(run.failure_records()) == sorted([
        [f"cannot read {missing}: No such file or directory"],
        [f"cannot read {directory}: not a regular file"],
        [f"cannot read {fifo}: not a regular file"],
    ])  # fmt: skip
    assert run.saved_ids() == {"good.bin": 1}


def test_a_provider_that_puts_nothing_is_exhausted(make_run: Callable[..., Run]) -> None:
    run = make_run({"core": {"providers": "source"}, "source": {"count": 0}})
    daemon = run.start()
    assert daemon.wait_exit() == 0, daemon.log()
    assert run.results() == []
    assert [e["put"] for e in daemon.events() if e["event"] == "exhausted"] == [0]


def test_logs_are_key_value_lines_on_a_terminal(make_run: Callable[..., Run]) -> None:
    run = make_run({
        "core": {"providers": "crash_after", "log_syntax": "auto"},
        "stoqd": {"startretries": 0},
        "crash_after": {"count": 1, "crash_after": 1, "marker": "{dir}/crashed"},
    })  # fmt: skip
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "stoqd", "-c", str(run.config)],
        stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal, start_new_session=True,
    )  # fmt: skip
    os.close(terminal)
    output = b""
    try:
        while True:  # until every process holding the terminal has exited
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: the last writer closed the terminal
                break
            if not chunk:
                break
            output += chunk
        assert process.wait(timeout=60) == 1  # the provider is FATAL after its crash
    finally:
        os.close(controller)
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    lines = output.decode(errors="replace").splitlines()
    assert lines and not [line for line in lines if line.startswith("{")]
    fatal = [line for line in lines if " fatal " in line and "provider=crash_after" in line]
    assert len(fatal) == 1 and "proc=supervisor" in fatal[0] and "[error" in fatal[0]
    crashed = [line for line in lines if "ingest_failed" in line]
    assert crashed and "proc=provider:crash_after" in crashed[0]
    assert any(" running " in line and "worker=1" in line for line in lines)


def test_an_oversized_payload_is_treated_alike_inline_or_spooled(
    make_run: Callable[..., Run],
) -> None:
    outcomes = {}
    for size in (200_000, 300_000):  # under and over inline_max_bytes (256K)
        run = make_run({
            "core": {"providers": "huge", "max_payload_size": "100K"},
            "huge": {"count": 1, "size": size, "outcomes": "{dir}/outcomes"},
        }, name=f"size-{size}")  # fmt: skip
        assert run.start().wait_exit() == 0, run.daemon.log()
        outcomes[size] = run.outcomes()
        errors = [e for r in run.results() for msgs in r["errors"].values() for e in msgs]
        assert errors and all("/dev/shm" not in e for e in errors), errors
    assert outcomes[200_000] == [("huge-1", "saved", "-")]
    assert outcomes[300_000] == outcomes[200_000]
