"""dirmon at unit level: real files, real inotify, the provider's ingest on a thread
against a recording queue that reads each file the way a worker would."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List

import pytest
from stoqd_providers.dirmon.watcher import inotify_watches

from stoqd.framework.exceptions import StoqPluginException

from .conftest import DirQueue, dir_results


def slow_write(path: Path, chunks: int = 10, delay: float = 0.1, size: int = 1000) -> bytes:
    """Write ``chunks`` chunks ``delay`` seconds apart (a writer taking ~1 s), then close."""
    data = b""
    with open(path, "wb") as handle:
        for index in range(chunks):
            chunk = bytes([65 + index % 26]) * size
            handle.write(chunk)
            handle.flush()
            data += chunk
            time.sleep(delay)
    return data


def start(dir_plugin, dir_run, queue: DirQueue, src: Path, **opts: Any):
    plugin = dir_plugin("dirmon", source_dir=src, **opts)
    runner = dir_run(plugin, queue)
    # The first report comes once the watches are in place.
    queue.wait_for(lambda: "mode" in queue.stats, what="dirmon to start watching")
    return runner


def settle(queue: DirQueue, src: Path, name: str = "zz-marker") -> None:
    """Write a marker file and wait for it: every earlier event has been handled then."""
    marker = src / name
    marker.write_bytes(b"marker")
    queue.wait_for(lambda: str(marker) in queue.paths(), what=f"marker {name}")
    time.sleep(0.3)  # one more check of files still being written


def listing(directory: Path) -> List[str]:
    """The sorted names in ``directory``; none while it does not exist yet (a move to
    done_dir makes the file's subdirectory there when the first file arrives)."""
    try:
        return sorted(os.listdir(directory))
    except FileNotFoundError:
        return []


def puts_of(queue: DirQueue, path: Path) -> List[Any]:
    return [p for p in queue.puts if p.path == str(path)]


# -- when a file is complete -------------------------------------------------------------


def test_slow_writers_yield_exactly_one_whole_result_each(dir_tree, dir_plugin, dir_run):
    queue = DirQueue()
    runner = start(dir_plugin, dir_run, queue, dir_tree["src"])
    paths = [dir_tree["src"] / f"slow{i}.bin" for i in range(4)]
    written: Dict[Path, bytes] = {}
    threads = [
        threading.Thread(target=lambda p=p: written.__setitem__(p, slow_write(p))) for p in paths
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    settle(queue, dir_tree["src"])
    for path in paths:
        puts = puts_of(queue, path)
        assert len(puts) == 1, f"{path.name}: {len(puts)} results"
        assert puts[0].content == written[path]
        assert puts[0].meta.extra_data["filename"] == path.name
    assert runner.running()


def test_files_renamed_into_place_are_taken_once_and_temp_names_never(
    dir_tree, dir_plugin, dir_run
):
    src = dir_tree["src"]
    queue = DirQueue()
    start(dir_plugin, dir_run, queue, src)
    (src / "tmp").mkdir()
    outside = dir_tree["outside"] / "from-outside"
    outside.write_bytes(b"outside" * 100)
    os.rename(outside, src / "from-outside")
    for temp in (src / ".hidden-part", src / "inside.tmp", src / "tmp" / "file.1"):
        slow_write(temp, chunks=3, delay=0.05)
    os.rename(src / ".hidden-part", src / "from-dotfile")
    os.rename(src / "inside.tmp", src / "from-tmp-name")
    os.rename(src / "tmp" / "file.1", src / "from-tmp-dir")
    settle(queue, src)
    names = sorted(os.path.basename(p) for p in queue.paths())
    assert names == ["from-dotfile", "from-outside", "from-tmp-dir", "from-tmp-name", "zz-marker"]
    assert puts_of(queue, src / "from-outside")[0].content == b"outside" * 100


def test_files_present_at_start_are_taken_unless_disabled(dir_tree, dir_plugin, dir_run):
    src = dir_tree["src"]
    (src / "sub" / "deeper").mkdir(parents=True)
    existing = [src / "a", src / "sub" / "b", src / "sub" / "deeper" / "c"]
    for path in existing:
        path.write_bytes(path.name.encode())
    queue = DirQueue()
    start(dir_plugin, dir_run, queue, src)
    queue.wait_for(lambda: len(queue.puts) == 3, what="the three existing files")
    assert sorted(queue.paths()) == sorted(str(p) for p in existing)

    other = dir_tree["outside"]
    (other / "old").write_bytes(b"old")
    queue2 = DirQueue()
    start(dir_plugin, dir_run, queue2, other, process_existing="false")
    settle(queue2, other)
    assert queue2.paths() == [str(other / "zz-marker")]


def test_new_subdirectories_are_watched(dir_tree, dir_plugin, dir_run):
    src = dir_tree["src"]
    queue = DirQueue()
    start(dir_plugin, dir_run, queue, src)
    nested = src / "new" / "deeper"
    nested.mkdir(parents=True)
    data = slow_write(nested / "inner.bin", chunks=3, delay=0.05)
    # A whole directory moved in at once: no close events for its files.
    moved = dir_tree["outside"] / "batch"
    moved.mkdir()
    for index in range(3):
        (moved / f"m{index}").write_bytes(b"m" * (index + 1))
    os.rename(moved, src / "batch")
    queue.wait_for(lambda: len(queue.puts) == 4, what="4 files in new directories")
    assert puts_of(queue, nested / "inner.bin")[0].content == data
    settle(queue, src)
    assert len(queue.puts) == 5


def test_non_recursive_ignores_subdirectories(dir_tree, dir_plugin, dir_run):
    src = dir_tree["src"]
    (src / "sub").mkdir()
    queue = DirQueue()
    start(dir_plugin, dir_run, queue, src, recursive="false")
    (src / "sub" / "inner").write_bytes(b"x")
    (src / "top").write_bytes(b"y")
    settle(queue, src)
    assert sorted(os.path.basename(p) for p in queue.paths()) == ["top", "zz-marker"]


# -- the real producers ------------------------------------------------------------------


def test_zeek_extract_files_written_in_place(dir_tree, dir_plugin, dir_run):
    extract = dir_tree["src"] / "extract_files"
    extract.mkdir()
    queue = DirQueue()
    start(dir_plugin, dir_run, queue, dir_tree["src"], action="move", done_dir=dir_tree["done"])
    names = [f"HTTP-F{index}abcDEF.exe" for index in range(5)]
    written: Dict[str, bytes] = {}
    threads = [
        threading.Thread(
            target=lambda n=n: written.__setitem__(n, slow_write(extract / n, chunks=5, delay=0.1))
        )
        for n in names
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    queue.wait_for(lambda: len(queue.puts) == 5, what="5 extracted files")
    for name in names:
        (put,) = puts_of(queue, extract / name)
        assert put.content == written[name]
    queue.wait_for(
        lambda: listing(dir_tree["done"] / "extract_files") == sorted(names),
        what="files moved to done_dir",
    )
    assert os.listdir(extract) == []


def suricata_store(filestore: Path, content: bytes, sidecar: bool = True) -> Path:
    """Imitate Suricata's file-store v2: write under tmp/, rename into the sha256 shard,
    then write the fileinfo sidecar beside it."""
    sha = hashlib.sha256(content).hexdigest()
    (filestore / "tmp").mkdir(exist_ok=True)
    temp = filestore / "tmp" / f"file.{sha[:6]}"
    with open(temp, "wb") as handle:
        for offset in range(0, len(content), 1000):
            handle.write(content[offset : offset + 1000])
            handle.flush()
            time.sleep(0.01)
    shard = filestore / sha[:2]
    shard.mkdir(exist_ok=True)
    final = shard / sha
    os.rename(temp, final)
    if sidecar:
        info = {"timestamp": "2026-11-24T16:00:00.000000+0000", "fileinfo": {"sha256": sha}}
        (shard / f"{sha}.1764000000.{len(content)}.json").write_text(json.dumps(info))
    return final


def test_suricata_filestore_with_sidecar_attached(dir_tree, dir_plugin, dir_run):
    filestore = dir_tree["src"]
    queue = DirQueue()
    start(
        dir_plugin, dir_run, queue, filestore, action="move", done_dir=dir_tree["done"],
        sidecar_wait="5",
    )  # fmt: skip
    content = os.urandom(5000)
    final = suricata_store(filestore, content)
    sha = final.name
    queue.wait_for(lambda: len(queue.puts) == 1, what="the stored file")
    (put,) = queue.puts
    assert put.path == str(final)
    assert put.content == content
    suricata = put.meta.extra_data["suricata"]
    assert suricata["fileinfo"]["fileinfo"]["sha256"] == sha
    assert suricata["sidecar"] == f"{sha[:2]}/{sha}.1764000000.5000.json"
    queue.wait_for(
        lambda: listing(dir_tree["done"] / sha[:2]) == [sha, f"{sha}.1764000000.5000.json"],
        what="payload and sidecar moved together",
    )
    settle(queue, filestore)
    assert len(queue.puts) == 2  # the marker; never the sidecar or the tmp file
    assert os.listdir(filestore / "tmp") == []


def test_suricata_without_sidecar_and_sidecars_scanned(dir_tree, dir_plugin, dir_run):
    queue = DirQueue()
    start(dir_plugin, dir_run, queue, dir_tree["src"], sidecar_wait="0.2")
    final = suricata_store(dir_tree["src"], b"no sidecar" * 50, sidecar=False)
    queue.wait_for(lambda: len(queue.puts) == 1, what="the stored file")
    assert "suricata" not in queue.puts[0].meta.extra_data
    assert queue.puts[0].path == str(final)

    queue2 = DirQueue()
    start(dir_plugin, dir_run, queue2, dir_tree["outside"], suricata_sidecars="scan")
    final2 = suricata_store(dir_tree["outside"], b"sidecar scanned" * 50)
    queue2.wait_for(lambda: len(queue2.puts) == 2, what="the file and its sidecar")
    names = sorted(os.path.basename(p) for p in queue2.paths())
    assert names[0] == final2.name and names[1].endswith(".json")


# -- after the scan ----------------------------------------------------------------------


def test_saved_files_are_deleted_with_action_delete(dir_tree, dir_plugin, dir_run):
    src = dir_tree["src"]
    queue = DirQueue()
    start(dir_plugin, dir_run, queue, src, action="delete")
    (src / "one").write_bytes(b"1")
    queue.wait_for(lambda: not (src / "one").exists(), what="one deleted")
    assert queue.puts[0].content == b"1"


def test_failed_scans_move_to_failed_dir_with_reason_never_deleted(dir_tree, dir_plugin, dir_run):
    src = dir_tree["src"]
    failed = dir_tree["failed"]
    queue = DirQueue(outcome="failed")
    start(dir_plugin, dir_run, queue, src, action="delete", failed_dir=failed)
    (src / "sub").mkdir()
    (src / "sub" / "bad").write_bytes(b"bad")
    queue.wait_for(lambda: (failed / "sub" / "bad.error.json").exists(), what="reason file")
    assert (failed / "sub" / "bad").read_bytes() == b"bad"
    reason = json.loads((failed / "sub" / "bad.error.json").read_text())
    assert reason["error"] == "test failure"
    assert reason["file"] == "sub/bad"

    other = dir_tree["outside"]
    queue2 = DirQueue(outcome="failed")
    start(dir_plugin, dir_run, queue2, other, action="delete")
    (other / "stays").write_bytes(b"stays")
    queue2.wait_for(lambda: queue2.stats.get("failed") == 1, what="the failure")
    assert (other / "stays").read_bytes() == b"stays"


def test_kept_files_are_not_scanned_again_after_restart_unless_changed(
    dir_tree, dir_plugin, dir_run
):
    src = dir_tree["src"]
    (src / "kept").write_bytes(b"v1")
    queue = DirQueue()
    runner = start(dir_plugin, dir_run, queue, src)
    queue.wait_for(lambda: queue.stats.get("saved") == 1, what="kept saved")
    runner.stop()

    (src / "changed").write_bytes(b"c1")
    queue2 = DirQueue()
    runner2 = start(dir_plugin, dir_run, queue2, src)
    queue2.wait_for(lambda: queue2.stats.get("saved") == 1, what="changed saved")
    runner2.stop()
    assert queue2.paths() == [str(src / "changed")]

    (src / "kept").write_bytes(b"v2")
    queue3 = DirQueue()
    start(dir_plugin, dir_run, queue3, src)
    settle(queue3, src)
    assert sorted(queue3.paths()) == [str(src / "kept"), str(src / "zz-marker")]
    assert puts_of(queue3, src / "kept")[0].content == b"v2"


# -- hostile entries ---------------------------------------------------------------------


def make_hostile(directory: Path, outside: Path) -> None:
    os.mkfifo(directory / "fifo")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(directory / "socket"))
    server.close()
    os.mknod(directory / "device", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    os.symlink(directory / "nowhere", directory / "dangling")
    (outside / "secret").write_bytes(b"secret")
    os.symlink(outside / "secret", directory / "escape")
    (directory / "empty").touch()
    (directory / "big").write_bytes(b"B" * 5000)


HOSTILE_REASONS = {
    "FIFO",
    "socket",
    "device file",
    "dangling symbolic link",
    "symbolic link leading outside source_dir",
    "empty file",
}


def test_hostile_entries_are_skipped_with_a_reason_and_the_monitor_keeps_running(
    dir_tree, dir_plugin, dir_run, caplog
):
    src = dir_tree["src"]
    before = src / "before"
    before.mkdir()
    make_hostile(before, dir_tree["outside"])
    queue = DirQueue()
    runner = start(dir_plugin, dir_run, queue, src, max_size="4K", failed_dir=dir_tree["failed"])
    after = src / "after"
    after.mkdir()
    make_hostile(after, dir_tree["outside"])
    for index in range(20):  # files that vanish before anyone reads them
        vanishing = src / f"vanish{index}"
        vanishing.write_bytes(b"v")
        vanishing.unlink()
    (src / "good").write_bytes(b"good")
    settle(queue, src)
    assert runner.running() and runner.error is None
    assert sorted(os.path.basename(p) for p in queue.paths()) == ["good", "zz-marker"]
    queue.wait_for(lambda: HOSTILE_REASONS <= set(queue.stats["skipped_by_reason"]), what="reasons")
    for where in ("before", "after"):
        reason = json.loads((dir_tree["failed"] / where / "big.error.json").read_text())
        assert reason["error"] == "5000 bytes is more than max_size 4096"
        assert (dir_tree["failed"] / where / "big").stat().st_size == 5000
    assert "skipped after/fifo: FIFO (named pipe)" in caplog.text
    assert "skipped before/escape: symbolic link leading outside source_dir" in caplog.text
    assert (dir_tree["outside"] / "secret").read_bytes() == b"secret"


# -- backpressure, overflow, crashes -----------------------------------------------------


def test_full_queue_stops_claiming_and_files_wait_on_disk(dir_tree, dir_plugin, dir_run):
    src = dir_tree["src"]
    queue = DirQueue(outcome="hold", capacity=2)
    start(dir_plugin, dir_run, queue, src, action="delete")
    for index in range(6):
        (src / f"f{index}").write_bytes(b"x" * (index + 1))
    queue.wait_for(lambda: queue.stats.get("backlog") == 4, what="4 files waiting")
    assert len(queue.puts) == 2
    assert queue.stats["oldest_age"] > 0
    assert len(os.listdir(src)) == 7  # six files and the state directory
    deadline = time.monotonic() + 10
    while len(queue.puts) < 6 and time.monotonic() < deadline:
        queue.answer("saved")
        time.sleep(0.02)
    queue.answer("saved")
    queue.wait_for(lambda: os.listdir(src) == [".stoqd"], what="all deleted")
    assert sorted(p.content for p in queue.puts) == [b"x" * n for n in range(1, 7)]


MAX_QUEUED = Path("/proc/sys/fs/inotify/max_queued_events")


def test_inotify_overflow_is_detected_and_recovered_by_a_rescan(dir_tree, dir_plugin, dir_run):
    src = dir_tree["src"]
    queue = DirQueue()
    old = MAX_QUEUED.read_text()
    # The kernel reads this limit when an inotify instance is created: a tiny queue for
    # this provider's instance only, restored as soon as its watches are in place.
    # The setting is machine-wide: keep the window short for other processes.
    before = inotify_watches() or 0
    plugin = dir_plugin("dirmon", source_dir=src)
    MAX_QUEUED.write_text("1")
    try:
        dir_run(plugin, queue)
        deadline = time.monotonic() + 10
        while (inotify_watches() or 0) <= before and time.monotonic() < deadline:
            time.sleep(0.001)
    finally:
        MAX_QUEUED.write_text(old)
    queue.wait_for(lambda: "mode" in queue.stats, what="dirmon to start watching")
    for index in range(300):
        (src / f"f{index:03}").write_bytes(b"%d" % index)
    queue.wait_for(lambda: len(queue.puts) == 300, timeout=30, what="all 300 files")
    assert len(set(queue.paths())) == 300
    queue.wait_for(
        lambda: queue.stats["overflows"] >= 1 and queue.stats["rescans"] >= 2,
        what="the overflow and its rescan reported",
    )
    # The limit in force for this instance is reported.
    assert queue.stats["inotify_limits"]["max_queued_events"] == 1


CRASHING_RUN = """
import sys, threading, time
from stoqd.framework.loader import PluginRegistry
class HoldingQueue:
    stopping = threading.Event()
    def put_file(self, path, payload_meta=None, **kw):
        with open(sys.argv[2], "a") as out:
            out.write(str(path) + "\\n")
    def report(self, **stats):
        pass
plugin = PluginRegistry().load("dirmon", {"source_dir": sys.argv[1],
                                          "failed_dir": sys.argv[3]})
plugin.ingest(HoldingQueue())
"""


def test_a_file_in_flight_when_killed_is_taken_again_but_not_forever(dir_tree):
    src, failed = dir_tree["src"], dir_tree["failed"]
    log = dir_tree["outside"] / "puts.log"
    (src / "poison").write_bytes(b"poison")
    for attempt in range(1, 5):
        child = subprocess.Popen(
            [sys.executable, "-c", CRASHING_RUN, str(src), str(log), str(failed)],
        )
        try:
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                lines = log.read_text().splitlines() if log.exists() else []
                if len(lines) >= min(attempt, 3) and attempt <= 3:
                    break
                if attempt == 4 and (failed / "poison.error.json").exists():
                    break
                time.sleep(0.05)
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
    assert log.read_text().splitlines() == [str(src / "poison")] * 3
    reason = json.loads((failed / "poison.error.json").read_text())
    assert reason["error"].startswith("claimed 3 times without a result")
    assert (failed / "poison").read_bytes() == b"poison"
    assert not (src / "poison").exists()


def test_source_dir_removed_ends_ingest_with_a_clear_error(dir_tree, dir_plugin, dir_run):
    src = dir_tree["src"] / "watched"
    src.mkdir()
    queue = DirQueue()
    runner = start(dir_plugin, dir_run, queue, src, state_dir=dir_tree["outside"])
    os.rmdir(src)
    runner.join(10)
    assert str(runner.error) == f"source_dir {src} was removed or replaced"


# -- options -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "opts, message",
    [
        ({}, "plugin dirmon: option source_dir is required"),
        (
            {"source_dir": "/nonexistent/x"},
            "plugin dirmon: option source_dir: /nonexistent/x is not a directory",
        ),
        ({"action": "shred"}, "plugin dirmon: option action='shred' must be keep, delete or move"),
        ({"action": "move"}, "plugin dirmon: option done_dir is required by action=move"),
        (
            {"max_claims": "0"},
            "plugin dirmon: option max_claims='0' is not a valid positive_int: must be 1 or more",
        ),
        (
            {"suricata_sidecars": "eat"},
            "plugin dirmon: option suricata_sidecars='eat' must be attach, scan or skip",
        ),
    ],
)
def test_bad_options_are_named(dir_tree, dir_plugin, opts, message):
    opts = {"source_dir": dir_tree["src"], **opts} if "source_dir" not in opts and opts else opts
    with pytest.raises(StoqPluginException) as raised:
        dir_plugin("dirmon", **opts)
    assert str(raised.value) == message


# -- through the real daemon -------------------------------------------------------------


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_daemon_one_whole_result_per_file_from_every_kind_of_writer(dir_workdir, dir_daemon):
    src, done = dir_workdir / "src", dir_workdir / "done"
    (src / "existing").write_bytes(b"there before" * 100)
    daemon = dir_daemon("dirmon", {"action": "move", "done_dir": done})
    daemon.wait_for(
        lambda s: s["providers"][0]["stats"].get("saved") == 1, what="the existing file"
    )
    threads = [
        threading.Thread(target=slow_write, args=(src / f"slow{i}",), kwargs={"size": 3000})
        for i in range(3)
    ]
    for thread in threads:
        thread.start()
    outside = dir_workdir / "renamed"
    outside.write_bytes(os.urandom(300_000))  # larger than inline_max_bytes
    os.rename(outside, src / "renamed")
    for thread in threads:
        thread.join()
    names = ["existing", "renamed", "slow0", "slow1", "slow2"]
    daemon.wait_for(
        lambda s: sorted(os.listdir(done)) == names, what="every file moved to done_dir"
    )
    results = dir_results(dir_workdir)
    assert sorted(results) == sorted(str(src / name) for name in names)
    for name in names:
        (result,) = results[str(src / name)]
        assert result["size"] == (done / name).stat().st_size
        assert result["workers"][0]["hash"]["sha256"] == sha256_of(done / name)


def test_daemon_status_shows_backlog_and_files_wait_on_disk(dir_workdir, dir_daemon):
    src, done = dir_workdir / "src", dir_workdir / "done"
    daemon = dir_daemon(
        "dirmon",
        {"action": "move", "done_dir": done},
        core={"always_dispatch": "slow", "max_queue": 1},
        stoqd={"workers": 1},
    )
    daemon.wait_for(lambda s: "mode" in s["providers"][0]["stats"], what="dirmon watching")
    for index in range(20):
        (src / f"f{index}").write_bytes(b"%d" % index)
    status = daemon.wait_for(
        lambda s: (
            s["providers"][0]["stats"]["backlog"] >= 3
            and s["providers"][0]["stats"]["oldest_age"] > 0
            and s["providers"][0]["stats"]["queue_full"]  # once a put waited for credit
        ),
        what="a backlog reported",
    )
    assert status["providers"][0]["stats"]["queue_full"] is True
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit(30) == 0
    # Stopped early: what was saved was moved, the rest waits in src. Nothing lost.
    moved = set(os.listdir(done))
    waiting = set(os.listdir(src)) - {".stoqd"}
    assert moved | waiting == {f"f{index}" for index in range(20)}
    assert not moved & waiting
    assert waiting
    results = dir_results(dir_workdir)
    assert sorted(results) == sorted(str(src / name) for name in moved)


def test_daemon_killed_mid_scan_then_restarted_loses_nothing(dir_workdir, dir_daemon):
    src, done, failed = (dir_workdir / n for n in ("src", "done", "failed"))
    names = [f"file{index:02}" for index in range(12)]
    for name in names:
        (src / name).write_bytes(name.encode() * 1000)
    options = {"action": "move", "done_dir": done, "failed_dir": failed}
    sections = {"core": {"always_dispatch": "hash, slow"}}
    first = dir_daemon("dirmon", options, **sections)
    status = first.wait_for(
        lambda s: (
            s["providers"][0]["stats"].get("saved", 0) >= 2
            and any(w["current"] for w in s["workers"])
        ),
        what="some files saved and others being scanned",
    )
    os.killpg(first.pid, signal.SIGKILL)
    first.process.wait()
    assert status["providers"][0]["stats"]["saved"] < len(names)

    second = dir_daemon("dirmon", options, **sections)
    second.wait_for(lambda s: set(os.listdir(src)) == {".stoqd"}, timeout=60, what="src emptied")
    second.signal(signal.SIGTERM)
    assert second.wait_exit(30) == 0
    assert sorted(os.listdir(done)) == names
    assert os.listdir(failed) == []
    results = dir_results(dir_workdir)
    assert sorted(results) == sorted(str(src / name) for name in names)
    # At least once: a file whose result was saved in the instant before the kill, but
    # not yet moved, is scanned again; at most the two workers' files were in flight.
    again = [path for path, found in results.items() if len(found) > 1]
    assert len(again) <= 2 and all(len(results[path]) == 2 for path in again)
    for path, found in results.items():
        for result in found:
            name = os.path.basename(path)
            assert result["workers"][0]["hash"]["sha256"] == sha256_of(done / name)


def test_daemon_suricata_filestore_result_carries_the_fileinfo(dir_workdir, dir_daemon):
    filestore, done = dir_workdir / "src", dir_workdir / "done"
    daemon = dir_daemon("dirmon", {"action": "move", "done_dir": done})
    daemon.wait_for(lambda s: "mode" in s["providers"][0]["stats"], what="dirmon watching")
    content = os.urandom(20_000)
    final = suricata_store(filestore, content)
    sha = final.name
    daemon.wait_for(
        lambda s: s["providers"][0]["stats"].get("saved") == 1, what="the stored file saved"
    )
    ((result,),) = dir_results(dir_workdir).values()
    assert result["workers"][0]["hash"]["sha256"] == sha
    suricata = result["payload_meta"]["extra_data"]["suricata"]
    assert suricata["fileinfo"]["fileinfo"]["sha256"] == sha
    daemon.wait_for(
        lambda s: listing(done / sha[:2]) == [sha, f"{sha}.1764000000.20000.json"],
        what="file and sidecar moved",
    )


LIMITED_RUN = """
import json, os, sys, threading, time
# In this user namespace only: the machine's own limits are untouched.
with open("/proc/sys/user/max_inotify_watches", "w") as limit:
    limit.write(sys.argv[2])
with open("/proc/sys/user/max_inotify_instances", "w") as limit:
    limit.write(sys.argv[3])
from stoqd.framework.loader import PluginRegistry
from stoqd.workqueue import Outcome

class Recorder:
    stopping = threading.Event()
    puts, stats = [], {}
    def put_file(self, path, payload_meta=None, *, done=None, **kw):
        self.puts.append(str(path))
        done(Outcome("saved"))
    def report(self, **stats):
        self.stats = stats

queue = Recorder()
plugin = PluginRegistry().load("dirmon", {"source_dir": sys.argv[1], "rescan_interval": "0.3"})
thread = threading.Thread(target=plugin.ingest, args=(queue,))
thread.start()
deadline = time.time() + 20
while not queue.stats.get("rescans") and time.time() < deadline:
    time.sleep(0.02)
late = os.path.join(sys.argv[1], "a", "b", "c", "late")
with open(late, "w") as handle:
    handle.write("late")
while late not in queue.puts and time.time() < deadline:
    time.sleep(0.02)
time.sleep(1.2)  # one more report
queue.stopping.set()
thread.join(10)
print(json.dumps({"puts": queue.puts, "stats": queue.stats}))
"""


@pytest.mark.parametrize("watches, instances", [("2", "128"), ("100", "0")])
def test_inotify_watch_and_instance_limits_are_reported_and_rescans_find_files(
    dir_tree, watches, instances
):
    src = dir_tree["src"]
    (src / "a" / "b" / "c").mkdir(parents=True)
    done = subprocess.run(
        ["unshare", "--user", "--map-root-user", sys.executable, "-c", LIMITED_RUN,
         str(src), watches, instances],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["puts"] == [str(src / "a" / "b" / "c" / "late")]
    stats = report["stats"]
    if instances == "0":
        assert stats["mode"] == "rescan"
        assert "cannot watch" in done.stderr and "rescanning every 0.3s instead" in done.stderr
    else:
        assert stats["mode"] == "inotify"
        assert stats["watched_dirs"] == 2 and stats["unwatched_dirs"] == 2
        assert "only 2 of 4 directories are watched" in done.stderr
