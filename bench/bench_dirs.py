"""Benchmark the directory providers through the real daemon, on tmpfs.

Every number comes from ``python -m stoqd -c CFG`` (``stoqd.testing.Daemon``) with the
watched tree, the results and the daemon's state on /dev/shm, so the disk takes no part.
Workers: one per core; ``hash`` and ``mimetype`` on every file; results to ``jsonl``.
Each measurement is run 3 times (``--runs``) and the median printed with the others.

1. burst: N files of 4 KiB, written beforehand outside the tree, renamed into the watched
   directory as fast as Python can; files/s from the first rename to the last result line.
2. large: 20 files of 50 MiB renamed in; MiB/s from the first rename to the last
   result, and the daemon's peak memory (sums over all its processes of RSS and of PSS,
   sampled every 20 ms) and the largest single process's peak (VmHWM).
3. latency: files written in place (open, write 4 KiB, close) at 200 files/s for 5 s;
   time from each close to its result line appearing in the jsonl (polled every 1 ms).
4. slow writers: 200 files, each written in 5 chunks 20 ms apart by 20 writers at once;
   a result is partial when its sha256 differs from the file's final content.
5. dirscan: N pre-existing 4 KiB files; ``stoqd -c`` with dirscan from start to exit
   (the daemon exits when dirscan is exhausted), files/s; also first-to-last result.
6. walk memory: dirscan over a tree of empty files (skipped: nothing is scanned, the walk
   is what is measured); the provider process's peak RSS for 100k and 1M files.
7. ceiling: the scanning alone, with no daemon: this one process reads each file and
   calls what the ``hash`` and ``mimetype`` workers call (hashlib, libmagic), then writes
   a JSON line. CPU time per file, and what every core of the machine doing nothing else
   would reach: the most any daemon could do here with these two workers.

Run: ``.venv/bin/python bench/bench_dirs.py`` (``--quick`` for a smoke run). Numbers are
printed, never asserted.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from stoqd.testing import Daemon, write_config

MIB = 1 << 20
PAGE = os.sysconf("SC_PAGE_SIZE")
SHM = Path("/dev/shm")


# -- the machine ----------------------------------------------------------------------


def machine_facts() -> Dict[str, str]:
    """The limits a reader needs beside the numbers."""
    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kib = int(line.split()[1])
    inotify = {
        name: Path(f"/proc/sys/fs/inotify/{name}").read_text().strip()
        for name in ("max_queued_events", "max_user_watches", "max_user_instances")
    }
    shm = shutil.disk_usage(SHM)
    try:
        import watchdog.version

        watchdog_version = watchdog.version.VERSION_STRING
    except ImportError:
        watchdog_version = "?"
    return {
        "cpus (nproc)": str(len(os.sched_getaffinity(0))),
        "cpu model": model,
        "memory": f"{mem_kib / (1 << 20):.1f} GiB",
        "tmpfs /dev/shm": f"{shm.total / (1 << 30):.1f} GiB, {shm.free / (1 << 30):.1f} free",
        "inotify": ", ".join(f"{k}={v}" for k, v in inotify.items()),
        "python": platform.python_version(),
        "watchdog": watchdog_version,
        "kernel": platform.release(),
    }


# -- the daemon's processes -----------------------------------------------------------


TICK = os.sysconf("SC_CLK_TCK")


def session_memory(sid: int, with_pss: bool = True) -> Dict[int, Tuple[int, int, float, int]]:
    """pid -> (VmRSS, VmHWM in bytes, CPU seconds, PSS in bytes) for every live process of
    ``sid``. RSS counts a page shared by several processes (the forkserver's preloaded
    modules, shared libraries) once in each; PSS splits it among them, so a sum of PSS
    is the memory the daemon as a whole holds."""
    found: Dict[int, Tuple[int, int, float, int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_text()
            fields = raw[raw.rindex(")") + 2 :].split()
            if int(fields[3]) != sid:
                continue
            cpu = (int(fields[11]) + int(fields[12])) / TICK
            rss = hwm = 0
            for line in Path(f"/proc/{entry}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1]) * 1024
            found[int(entry)] = (rss, hwm, cpu, _pss(entry) if with_pss else 0)
        except (OSError, ValueError, IndexError):
            continue
    return found


def _pss(pid: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


class MemorySampler:
    """Samples a daemon's memory every ``every`` seconds on a thread."""

    def __init__(self, sid: int, every: float = 0.02) -> None:
        self.sid = sid
        self.every = every
        self.peak_total = 0
        self.peak_pss = 0
        self._samples = 0
        self.peak_hwm: Dict[int, int] = {}
        self.cpu: Dict[int, float] = {}  # last seen CPU seconds per pid
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            # PSS costs the kernel a walk of every mapping (~2.5 ms for a 200 MiB
            # process): read it on one sample in ten, not to slow what is measured.
            self._samples += 1
            memory = session_memory(self.sid, with_pss=self._samples % 10 == 1)
            self.peak_total = max(self.peak_total, sum(m[0] for m in memory.values()))
            self.peak_pss = max(self.peak_pss, sum(m[3] for m in memory.values()))
            for pid, (_, hwm, cpu, _) in memory.items():
                self.peak_hwm[pid] = max(self.peak_hwm.get(pid, 0), hwm)
                self.cpu[pid] = cpu
            self._stop.wait(self.every)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def cpu_per_file(self, roles: Dict[str, List[int]], files: int) -> Dict[str, float]:
        """CPU microseconds per file of each role (supervisor, provider, workers)."""
        return {
            f"{role} CPU us/file": sum(self.cpu.get(pid, 0.0) for pid in pids) / files * 1e6
            for role, pids in roles.items()
        }


def roles_of(daemon: Daemon) -> Dict[str, List[int]]:
    """The daemon's processes by role, from its status."""
    status = daemon.status()
    return {
        "supervisor": [status["daemon"]["pid"]],
        "provider": [p["pid"] for p in status["providers"] if p.get("pid")],
        "workers": [w["pid"] for w in status["workers"] if w.get("pid")],
    }


# -- results as they appear -----------------------------------------------------------


class ResultTail:
    """Follows a jsonl file; records when each result line was first seen."""

    def __init__(self, path: Path, parse: bool = False, every: float = 0.001) -> None:
        self.path = path
        self.parse = parse
        self.every = every
        self.count = 0
        self.seen: List[Tuple[float, Optional[Dict[str, Any]]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        offset, rest = 0, b""
        while not self._stop.is_set():
            try:
                with open(self.path, "rb") as handle:
                    handle.seek(offset)
                    chunk = handle.read()
            except FileNotFoundError:
                chunk = b""
            if chunk:
                now = time.time()
                offset += len(chunk)
                lines = (rest + chunk).split(b"\n")
                rest = lines.pop()
                for line in lines:
                    self.seen.append((now, json.loads(line) if self.parse else None))
                self.count = len(self.seen)
            else:
                self._stop.wait(self.every)

    def wait(self, count: int, timeout: float) -> float:
        """Wait until ``count`` results were seen; the wall time the last one was seen."""
        deadline = time.monotonic() + timeout
        while self.count < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.count} of {count} results after {timeout}s")
            time.sleep(0.002)
        return self.seen[count - 1][0]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


# -- set-ups ---------------------------------------------------------------------------


def workspace(name: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"stoqd-bench-{name}-", dir=SHM))


def start_daemon(base: Path, provider: str, options: Dict[str, Any]) -> Daemon:
    (base / "src").mkdir(exist_ok=True)
    config = write_config(
        base,
        {
            "core": {
                "providers": provider,
                "connectors": "jsonl",
                "always_dispatch": "hash, mimetype",
                "log_level": "WARNING",
                "max_payload_size": "1G",
            },
            "stoqd": {"workers": 0, "spool_dir": str(base / "spool")},
            provider: {"source_dir": str(base / "src"), **options},
            "jsonl": {"output_file": str(base / "results.jsonl")},
        },
    )
    return Daemon(config)


def wait_watching(daemon: Daemon) -> None:
    daemon.wait_for(
        lambda s: s["providers"] and "mode" in s["providers"][0].get("stats", {}),
        timeout=30,
        what="dirmon watching",
    )


def stop(daemon: Daemon) -> None:
    daemon.close()


def staged_files(directory: Path, count: int, size: int) -> List[Path]:
    directory.mkdir()
    paths = []
    for index in range(count):
        path = directory / f"f{index:07}"
        path.write_bytes(os.urandom(size))
        paths.append(path)
    return paths


# -- the measurements -----------------------------------------------------------------


def bench_burst(count: int) -> Dict[str, float]:
    base = workspace("burst")
    try:
        staged = staged_files(base / "stage", count, 4096)
        daemon = start_daemon(base, "dirmon", {"action": "delete"})
        wait_watching(daemon)
        roles = roles_of(daemon)
        sampler = MemorySampler(daemon.pid, every=0.05)
        time.sleep(0.2)
        idle = dict(sampler.cpu)
        tail = ResultTail(base / "results.jsonl")
        src = base / "src"
        started = time.time()
        for path in staged:
            os.rename(path, src / path.name)
        renamed = time.time()
        last = tail.wait(count, timeout=600)
        tail.stop()
        time.sleep(0.2)
        sampler.stop()
        stop(daemon)
        sampler.cpu = {pid: cpu - idle.get(pid, 0.0) for pid, cpu in sampler.cpu.items()}
        return {
            "files/s": count / (last - started),
            "rename files/s": count / (renamed - started),
            **sampler.cpu_per_file(roles, count),
        }
    finally:
        shutil.rmtree(base, ignore_errors=True)


def bench_large(count: int, size: int) -> Dict[str, float]:
    base = workspace("large")
    try:
        staged = staged_files(base / "stage", count, size)
        daemon = start_daemon(base, "dirmon", {"action": "delete"})
        wait_watching(daemon)
        sampler = MemorySampler(daemon.pid)
        tail = ResultTail(base / "results.jsonl")
        src = base / "src"
        started = time.time()
        for path in staged:
            os.rename(path, src / path.name)
        last = tail.wait(count, timeout=600)
        tail.stop()
        sampler.stop()
        stop(daemon)
        return {
            "MiB/s": count * size / MIB / (last - started),
            "peak RSS MiB (sum)": sampler.peak_total / MIB,
            "peak PSS MiB (sum)": sampler.peak_pss / MIB,
            "peak process MiB": max(sampler.peak_hwm.values()) / MIB,
        }
    finally:
        shutil.rmtree(base, ignore_errors=True)


def bench_latency(rate: float, seconds: float) -> Dict[str, float]:
    base = workspace("latency")
    try:
        daemon = start_daemon(base, "dirmon", {"action": "delete"})
        wait_watching(daemon)
        tail = ResultTail(base / "results.jsonl", parse=True)
        src = base / "src"
        closed: Dict[str, float] = {}
        count = int(rate * seconds)
        begin = time.monotonic()
        for index in range(count):
            # Pace on the clock so that a slow write does not lower the rate after it.
            delay = begin + index / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            path = src / f"l{index:06}"
            with open(path, "wb") as handle:
                handle.write(os.urandom(4096))
            closed[str(path)] = time.time()
        tail.wait(count, timeout=120)
        tail.stop()
        stop(daemon)
        latencies = sorted(
            (seen - closed[result["results"][0]["payload_meta"]["extra_data"]["path"]]) * 1000
            for seen, result in tail.seen
            if result is not None
        )
        return {
            "p50 ms": statistics.median(latencies),
            "p99 ms": latencies[int(len(latencies) * 0.99) - 1],
            "max ms": latencies[-1],
        }
    finally:
        shutil.rmtree(base, ignore_errors=True)


def bench_slow_writers(count: int, writers: int) -> Dict[str, float]:
    base = workspace("slow")
    try:
        daemon = start_daemon(base, "dirmon", {"action": "keep"})
        wait_watching(daemon)
        tail = ResultTail(base / "results.jsonl", parse=True)
        src = base / "src"
        final: Dict[str, str] = {}
        lock = threading.Lock()

        def writer(numbers: List[int]) -> None:
            for number in numbers:
                path = src / f"s{number:04}"
                digest = hashlib.sha256()
                with open(path, "wb") as handle:
                    for _ in range(5):
                        chunk = os.urandom(2000)
                        handle.write(chunk)
                        handle.flush()
                        digest.update(chunk)
                        time.sleep(0.02)
                with lock:
                    final[str(path)] = digest.hexdigest()

        threads = [
            threading.Thread(target=writer, args=(list(range(i, count, writers)),))
            for i in range(writers)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        tail.wait(count, timeout=120)
        time.sleep(1.0)  # room for a duplicate to show up, if there were one
        tail.stop()
        stop(daemon)
        partial = duplicates = 0
        seen: Dict[str, int] = {}
        for _, result in tail.seen:
            assert result is not None
            payload = result["results"][0]
            path = payload["payload_meta"]["extra_data"]["path"]
            seen[path] = seen.get(path, 0) + 1
            if payload["workers"][0]["hash"]["sha256"] != final[path]:
                partial += 1
        duplicates = sum(n - 1 for n in seen.values())
        return {
            "partial": partial,
            "duplicates": duplicates,
            "missing": count - len(seen),
            "of": count,
        }
    finally:
        shutil.rmtree(base, ignore_errors=True)


def bench_dirscan(count: int) -> Dict[str, float]:
    base = workspace("dirscan")
    try:
        (base / "src").mkdir()
        for index in range(count):
            (base / "src" / f"f{index:07}").write_bytes(os.urandom(4096))
        tail = ResultTail(base / "results.jsonl", parse=True)
        started = time.time()
        daemon = start_daemon(base, "dirscan", {})
        sampler = MemorySampler(daemon.pid, every=0.05)
        roles: Dict[str, List[int]] = {}
        while not roles.get("provider") and daemon.process.poll() is None:
            try:
                roles = roles_of(daemon)
            except Exception:  # not listening yet
                time.sleep(0.02)
        code = daemon.wait_exit(600)
        ended = time.time()
        sampler.stop()
        tail.wait(count, timeout=10)
        tail.stop()
        stop(daemon)
        if code != 0:
            raise RuntimeError(f"stoqd exited {code}")
        times = sorted(r["time"] for _, r in tail.seen if r is not None)
        span = (
            datetime.fromisoformat(times[-1]) - datetime.fromisoformat(times[0])
        ).total_seconds()
        return {
            "start-to-exit files/s": count / (ended - started),
            "first-to-last result files/s": count / span if span else float("nan"),
            "seconds": ended - started,
            **sampler.cpu_per_file(roles, count),
            "provider alone files/s": provider_alone(base / "src"),
        }
    finally:
        shutil.rmtree(base, ignore_errors=True)


def provider_alone(src: Path) -> float:
    """dirscan's own rate: its ingest in this process against stoqd.testing's recording
    queue, which answers every file at once (no daemon, no scanning)."""
    from stoqd.framework.loader import PluginRegistry
    from stoqd.testing import RecordingQueue

    plugin = PluginRegistry().load("dirscan", {"source_dir": str(src)})
    queue = RecordingQueue()
    started = time.perf_counter()
    plugin.ingest(queue)  # type: ignore[attr-defined]
    return len(queue.puts) / (time.perf_counter() - started)


def bench_walk_memory(count: int) -> Dict[str, float]:
    base = workspace("walk")
    try:
        src = base / "src"
        src.mkdir()
        per_dir = 1000
        for start in range(0, count, per_dir):
            directory = src / f"d{start // per_dir:05}"
            directory.mkdir()
            for index in range(min(per_dir, count - start)):
                os.close(os.open(directory / f"e{index:04}", os.O_CREAT | os.O_WRONLY, 0o644))
        started = time.time()
        daemon = start_daemon(base, "dirscan", {})
        sampler = MemorySampler(daemon.pid, every=0.05)
        provider_pid = None
        while provider_pid is None and daemon.process.poll() is None:
            try:
                providers = daemon.status()["providers"]
                provider_pid = providers[0]["pid"] if providers else None
            except Exception:
                time.sleep(0.05)
        code = daemon.wait_exit(1800)
        ended = time.time()
        sampler.stop()
        stop(daemon)
        if code != 0:
            raise RuntimeError(f"stoqd exited {code}")
        return {
            "files": count,
            "walk files/s": count / (ended - started),
            "provider peak RSS MiB": sampler.peak_hwm.get(provider_pid or -1, 0) / MIB,
        }
    finally:
        shutil.rmtree(base, ignore_errors=True)


def bench_ceiling(count: int, size: int) -> Dict[str, float]:
    """The scan work of ``count`` files of ``size`` random bytes, in this process alone.

    What the daemon cannot go below: the same library calls as the ``hash`` (its default
    algorithms) and ``mimetype`` workers on the same bytes, and a result line, with none
    of the daemon's passing around. CPU time, so other work on the machine does not count.
    """
    import magic

    from stoqd.builtin.hash import DEFAULT_ALGORITHMS, digests
    from stoqd.builtin.mimetype import DEFAULT_MAX_BYTES
    from stoqd.framework.helpers import compact_json

    base = workspace("ceiling")
    try:
        paths = staged_files(base / "src", count, size)
        mime = magic.Magic(mime=True)
        cores = len(os.sched_getaffinity(0))
        with open(base / "results.jsonl", "wb") as out:
            started = time.process_time()
            for path in paths:
                content = path.read_bytes()
                result = {
                    "hash": digests(content, DEFAULT_ALGORITHMS),
                    "mimetype": mime.from_buffer(content[:DEFAULT_MAX_BYTES]),
                }
                out.write(compact_json(result, newline=True))  # as the jsonl connector
            cpu = time.process_time() - started
        per_file = cpu / count
        return {
            "CPU us per file": per_file * 1e6,
            "files/s, one core": 1 / per_file,
            f"files/s, {cores} cores": cores / per_file,
            f"MiB/s, {cores} cores": cores * size / MIB / per_file,
        }
    finally:
        shutil.rmtree(base, ignore_errors=True)


# -- running and printing -------------------------------------------------------------


def median_of(runs: int, measure: Callable[[], Dict[str, float]]) -> Dict[str, Any]:
    samples = [measure() for _ in range(runs)]
    keys = samples[0].keys()
    return {key: (statistics.median(s[key] for s in samples), [s[key] for s in samples])
            for key in keys}  # fmt: skip


def show(title: str, target: str, result: Dict[str, Any]) -> None:
    # Other work on the machine (load average > cores) lowers every number here.
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"\n{title}   (target: {target}; load average after: {load})")
    for key, (median, values) in result.items():
        runs = ", ".join(f"{v:,.1f}" for v in values)
        print(f"  {key:32} {median:>12,.1f}   runs: {runs}")
    sys.stdout.flush()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small counts, one run each")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", nargs="+", help="burst large latency slow dirscan walk ceiling")
    parser.add_argument("--walk-files", type=int, default=1_000_000)
    args = parser.parse_args()
    runs = 1 if args.quick else args.runs
    scale = 10 if args.quick else 1
    only = set(args.only or ["burst", "large", "latency", "slow", "dirscan", "walk", "ceiling"])

    print("stoqd directory providers benchmark", time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    for key, value in machine_facts().items():
        print(f"  {key:16} {value}")
    print(f"  runs             median of {runs}")

    if "ceiling" in only:
        # First, so a reader sees what the machine allows before what stoqd does.
        n = 5000 // scale
        show(f"ceiling: hash+mimetype+JSON line of {n} x 4 KiB, no daemon", "(the limit here)",
             median_of(runs, lambda: bench_ceiling(n, 4096)))  # fmt: skip
        n = 4 // (2 if args.quick else 1)
        show(f"ceiling: the same for {n} x 50 MiB", "(the limit here)",
             median_of(runs, lambda: bench_ceiling(n, 50 * MIB)))  # fmt: skip
    if "burst" in only:
        n = 5000 // scale
        show(f"dirmon: {n} x 4 KiB renamed in, hash+mimetype -> jsonl", ">= 10,000 files/s",
             median_of(runs, lambda: bench_burst(n)))  # fmt: skip
    if "large" in only:
        n = 20 // (2 if args.quick else 1)
        show(f"dirmon: {n} x 50 MiB renamed in", ">= 550 MB/s, peak <= 250 MiB",
             median_of(runs, lambda: bench_large(n, 50 * MIB)))  # fmt: skip
    if "latency" in only:
        show("dirmon: close -> result line at 200 files/s for 5 s", "p99 <= 50 ms",
             median_of(runs, lambda: bench_latency(200, 5 if not args.quick else 1)))  # fmt: skip
    if "slow" in only:
        n = 200 // (4 if args.quick else 1)
        show(f"dirmon: {n} slow writers (5 chunks, 20 ms apart, 20 at once)", "0 partial",
             median_of(runs, lambda: bench_slow_writers(n, 20)))  # fmt: skip
    if "dirscan" in only:
        n = 5000 // scale
        show(f"dirscan: {n} x 4 KiB pre-existing, stoqd start to exit", ">= 15,000 files/s",
             median_of(runs, lambda: bench_dirscan(n)))  # fmt: skip
    if "walk" in only:
        small = 100_000 // scale
        show(f"dirscan walk: {small:,} empty files (skipped)", "constant memory",
             median_of(1, lambda: bench_walk_memory(small)))  # fmt: skip
        big = args.walk_files // scale
        show(f"dirscan walk: {big:,} empty files (skipped)", "constant memory",
             median_of(1, lambda: bench_walk_memory(big)))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
