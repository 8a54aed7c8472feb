"""dirscan at unit level: a real tree walked once, against a recording queue."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stoqd.framework.exceptions import StoqPluginException

from .conftest import DirQueue, dir_results


def deep_tree(root: Path, depth: int = 60, per_level: int = 3) -> list:
    """A chain ``depth`` directories deep with ``per_level`` files at every level, and a
    few sibling directories along the way."""
    files = []
    level = root
    for index in range(depth):
        for number in range(per_level):
            path = level / f"file{number}"
            path.write_bytes(f"{index}/{number}".encode())
            files.append(path)
        if index % 10 == 0:
            side = level / "side"
            side.mkdir()
            (side / "leaf").write_bytes(b"leaf")
            files.append(side / "leaf")
        level = level / f"d{index}"
        level.mkdir()
    return files


def test_deep_tree_every_file_once_then_returns(dir_tree, dir_plugin, dir_run):
    src = dir_tree["src"]
    files = deep_tree(src)
    queue = DirQueue()
    plugin = dir_plugin("dirscan", source_dir=src, action="move", done_dir=dir_tree["done"])
    runner = dir_run(plugin, queue)
    runner.join(60)
    assert runner.error is None
    assert sorted(queue.paths()) == sorted(str(p) for p in files)
    for put, path in ((p, Path(p.path)) for p in queue.puts):
        assert (dir_tree["done"] / path.relative_to(src)).read_bytes() == put.content
    assert queue.stats["saved"] == len(files)
    assert queue.stats["walking"] is False
    assert not (src / ".stoqd" / "dirscan.ledger").exists()  # a complete run forgets


def test_filters_and_hostile_entries(dir_tree, dir_plugin, dir_run):
    src = dir_tree["src"]
    (src / "tmp").mkdir()
    (src / "tmp" / "partial").write_bytes(b"p")
    (src / ".hidden").write_bytes(b"h")
    (src / "download.part").write_bytes(b"p")
    (src / "notes.txt").write_bytes(b"n")
    (src / "report.pdf").write_bytes(b"r")
    os.mkfifo(src / "pipe.pdf")
    os.symlink("/etc/passwd", src / "passwd.pdf")
    writer = open(src / "growing.pdf", "wb")
    writer.write(b"half")
    writer.flush()
    try:
        queue = DirQueue()
        plugin = dir_plugin("dirscan", source_dir=src, include="*.pdf, *.txt", exclude="notes*")
        runner = dir_run(plugin, queue)
        runner.join(30)
    finally:
        writer.close()
    assert queue.paths() == [str(src / "report.pdf")]
    assert queue.stats["skipped_by_reason"] == {
        "FIFO": 1,
        "symbolic link leading outside source_dir": 1,
        "still open for writing": 1,
    }


def test_failed_files_move_to_failed_dir_and_the_rest_are_deleted(dir_tree, dir_plugin, dir_run):
    src = dir_tree["src"]
    for name in ("ok1", "bad", "ok2"):
        (src / name).write_bytes(name.encode())
    queue = DirQueue(outcome=lambda put: "failed" if put.path.endswith("bad") else "saved")
    plugin = dir_plugin("dirscan", source_dir=src, action="delete", failed_dir=dir_tree["failed"])
    dir_run(plugin, queue).join(30)
    assert sorted(os.listdir(src)) == [".stoqd"]
    assert sorted(os.listdir(dir_tree["failed"])) == ["bad", "bad.error.json"]
    assert json.loads((dir_tree["failed"] / "bad.error.json").read_text())["error"] == (
        "test failure"
    )


def test_an_interrupted_run_resumes_where_it_stopped(dir_tree, dir_plugin, dir_run):
    src = dir_tree["src"]
    for index in range(20):
        (src / f"f{index:02}").write_bytes(b"%d" % index)
    first = DirQueue()

    def stop_after_five(put):
        if len(first.puts) >= 5:
            first.stopping.set()  # the daemon is shutting down
        return "saved"

    first.outcome = stop_after_five
    dir_run(dir_plugin("dirscan", source_dir=src), first).join(30)
    assert len(first.puts) == 5
    assert (src / ".stoqd" / "dirscan.ledger").exists()

    second = DirQueue()
    dir_run(dir_plugin("dirscan", source_dir=src), second).join(30)
    assert sorted(first.paths() + second.paths()) == sorted(
        str(src / f"f{index:02}") for index in range(20)
    )
    assert not (src / ".stoqd" / "dirscan.ledger").exists()

    third = DirQueue()  # a new run after a complete one scans everything again
    dir_run(dir_plugin("dirscan", source_dir=src), third).join(30)
    assert len(third.puts) == 20


def test_suricata_payloads_carry_their_sidecar(dir_tree, dir_plugin, dir_run):
    filestore = dir_tree["src"]
    shas = []
    for index in range(3):
        content = b"payload %d" % index
        sha = hashlib.sha256(content).hexdigest()
        shard = filestore / sha[:2]
        shard.mkdir(exist_ok=True)
        (shard / sha).write_bytes(content)
        if index < 2:
            (shard / f"{sha}.1764000000.{index}.json").write_text(json.dumps({"id": index}))
        shas.append(sha)
    queue = DirQueue()
    dir_run(dir_plugin("dirscan", source_dir=filestore), queue).join(30)
    by_name = {os.path.basename(p.path): p for p in queue.puts}
    assert sorted(by_name) == sorted(shas)
    for index, sha in enumerate(shas):
        meta = by_name[sha].meta.extra_data
        if index < 2:
            assert meta["suricata"]["fileinfo"] == {"id": index}
        else:
            assert "suricata" not in meta


def test_bad_option_is_named(dir_tree, dir_plugin):
    with pytest.raises(StoqPluginException) as raised:
        dir_plugin("dirscan", source_dir=dir_tree["src"], max_size="lots")
    assert str(raised.value) == (
        "plugin dirscan: option max_size='lots' is not a valid size: "
        "expected a size such as 1048576 or 100M"
    )


# -- through the real daemon -------------------------------------------------------------


def test_stoq_run_dirscan_ends_when_everything_is_saved(dir_workdir):
    src = dir_workdir / "src"
    files = deep_tree(src, depth=30, per_level=5)
    results = dir_workdir / "results.jsonl"
    done = subprocess.run(
        [
            str(Path(sys.executable).parent / "stoq"),
            "run", "-P", "dirscan", "-a", "hash", "-C", "jsonl",
            "--plugin-opts", f"dirscan:source_dir={src}", f"jsonl:output_file={results}",
        ],
        capture_output=True, text=True, timeout=120, cwd=dir_workdir,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    by_path = dir_results(dir_workdir)
    assert sorted(by_path) == sorted(str(p) for p in files)
    for path in files:
        (result,) = by_path[str(path)]
        assert (
            result["workers"][0]["hash"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        )


def test_daemon_with_dirscan_is_exhausted_and_exits_0(dir_workdir, dir_daemon):
    src, done = dir_workdir / "src", dir_workdir / "done"
    for index in range(30):
        (src / f"f{index}").write_bytes(b"%d" % index)
    daemon = dir_daemon(
        "dirscan", {"action": "move", "done_dir": done}, core={"always_dispatch": "hash, slow"}
    )
    status = daemon.wait_for(
        lambda s: s["providers"][0]["stats"].get("saved", 0) >= 1, what="a first result"
    )
    assert status["providers"][0]["state"] == "RUNNING"
    assert daemon.wait_exit(60) == 0
    assert len(os.listdir(done)) == 30
    assert len(dir_results(dir_workdir)) == 30
    events = [e for e in daemon.events() if e.get("provider") == "dirscan"]
    assert any(e.get("reason") == "exhausted" for e in events)


UNPRIVILEGED_RUN = """
import json, os, sys, threading
from stoqd.framework.loader import PluginRegistry
from stoqd.workqueue import Outcome
class Recorder:
    stopping = threading.Event()
    def __init__(self):
        self.puts = []
    def put_file(self, path, payload_meta=None, *, done=None, **kw):
        self.puts.append(str(path))
        done(Outcome("saved"))
    def report(self, **stats):
        self.stats = stats
queue = Recorder()
plugin = PluginRegistry().load(
    "dirscan", {"source_dir": sys.argv[1], "failed_dir": sys.argv[2], "state_dir": sys.argv[3]}
)
# Everything is imported: now become nobody (the interpreter itself lives under /root).
os.setgroups([])
os.setgid(65534)
os.setuid(65534)
plugin.ingest(queue)
print(json.dumps({"puts": queue.puts, "stats": queue.stats}))
"""


def test_unreadable_files_and_files_of_others_as_an_unprivileged_user(dir_workdir):
    """As ``nobody``: a file it may not read is handled as failed with the reason; a file
    it does not own cannot be leased, so it must have been left unchanged a while."""
    src, failed, state = dir_workdir / "src", dir_workdir / "failed", dir_workdir / "state"
    state.mkdir()
    for directory in (dir_workdir, src, failed, state):
        directory.chmod(0o777)
    (src / "secret").write_bytes(b"secret")
    (src / "secret").chmod(0o000)
    (src / "old").write_bytes(b"old")
    os.utime(src / "old", (1_700_000_000, 1_700_000_000))
    (src / "fresh").write_bytes(b"fresh")  # written just now by someone else
    # Its time a minute ahead: still "just now" however long the walk takes to reach it.
    ahead = time.time() + 60
    os.utime(src / "fresh", (ahead, ahead))
    done = subprocess.run(
        [sys.executable, "-c", UNPRIVILEGED_RUN, str(src), str(failed), str(state)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["puts"] == [str(src / "old")]
    assert report["stats"]["skipped_by_reason"] == {"modified less than 1s ago": 1}
    reason = json.loads((failed / "secret.error.json").read_text())
    assert reason["error"] == "cannot open: Permission denied"
    assert (failed / "secret").stat().st_size == 6
    assert (src / "fresh").exists()
