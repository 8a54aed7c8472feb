"""Benchmark the real daemon: throughput, provider restart latency, idle memory.

Every number comes from ``python -m stoqd -c CFG`` started through ``stoqd.testing.Daemon``,
with its files on tmpfs (/dev/shm) so the disk does not take part. Three measurements:

1. Throughput: ``memprovider`` (bench/plugins) puts N payloads of S bytes, through the
   ``hash`` worker into ``jsonl``; the daemon exits 0 when the provider is exhausted and
   everything is saved. Reported for 1 and 2 scanning workers: payloads/s over the span of
   the results' ``time`` fields and over the whole run, and cores used (CPU seconds of the
   daemon and every descendant divided by wall seconds).
2. Restart latency: an idle provider is SIGKILLed; the time until ``status`` shows it
   RUNNING again with a new pid, polled every 10 ms on the control socket.
3. Idle memory: 5 idle providers and 2 workers, settled; RSS and PSS summed over the
   supervisor, the forkserver and every child.

Run: ``.venv/bin/python bench/bench_daemon.py`` (``--quick`` for a smoke run). Numbers are
printed, never asserted. See bench/README.md for what each column means.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from stoqd.ctl import DaemonDown, request
from stoqd.testing import Daemon, write_config

PLUGIN_DIR = Path(__file__).resolve().parent / "plugins"
TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
MIB = 1 << 20
PR_SET_CHILD_SUBREAPER = 36
KILL_TARGET_S = 1.5
MEMORY_TARGET_MIB = 250.0


# -- the machine and the process tree ---------------------------------------------------


def machine_facts() -> Dict[str, str]:
    """What a reader needs to compare these numbers with their own machine's."""
    mem_kib = _meminfo().get("MemTotal", 0)
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpus (nproc)": str(len(os.sched_getaffinity(0))),
        "cpu model": model or platform.processor() or "unknown",
        "memory": f"{mem_kib / (1 << 20):.1f} GiB",
        "python": platform.python_version(),
        "kernel": platform.release(),
        "files on": "tmpfs (/dev/shm)",
    }


def _meminfo() -> Dict[str, int]:
    values: Dict[str, int] = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            values[key] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return values


def become_subreaper() -> None:
    """Adopt orphaned descendants so their CPU time reaches our RUSAGE_CHILDREN.

    The supervisor does not wait for multiprocessing's forkserver, and the forkserver's
    children are orphaned when it exits first; as a subreaper we reap them all, and the
    kernel adds each reaped process's CPU time (and its reaped children's) to ours.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")


def reap_orphans(timeout: float = 10.0) -> None:
    """Wait for every descendant we adopted until none is left (or ``timeout``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            time.sleep(0.02)


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass
class Proc:
    pid: int
    ppid: int
    cpu: float  # seconds of user + system time so far
    waited: float  # seconds it was ready to run but waited for a CPU (schedstat)
    cmdline: str


def session_procs(sid: int) -> Dict[int, Proc]:
    """Every live process of session ``sid`` (the daemon is its session leader)."""
    found: Dict[int, Proc] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_text()
            # The command name may hold spaces and parentheses: split after the last ')'.
            fields = raw[raw.rindex(")") + 2 :].split()
            if int(fields[3]) != sid:
                continue
            waited = int(Path(f"/proc/{entry}/schedstat").read_text().split()[1]) / 1e9
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError, IndexError):
            continue  # it exited while we read it
        cpu = (int(fields[11]) + int(fields[12])) / TICK
        found[int(entry)] = Proc(int(entry), int(fields[1]), cpu, waited, cmdline)
    return found


def roles(daemon: Daemon) -> Dict[int, str]:
    """Which pid is which, from the daemon's own ``spawned`` log events."""
    named = {daemon.pid: "supervisor"}
    for event in daemon.events():
        if event.get("event") == "spawned" and "child_pid" in event:
            kind = "provider" if "provider" in event else "worker"
            named[int(event["child_pid"])] = kind
    return named


def role_of(proc: Proc, named: Dict[int, str]) -> str:
    if proc.pid in named:
        return named[proc.pid]
    # multiprocessing's helpers, started by the supervisor with their own command line
    if "forkserver" in proc.cmdline:
        return "forkserver"
    if "resource_tracker" in proc.cmdline:
        return "resource tracker"
    return "other"


class CpuSampler:
    """Samples the CPU time of every process of the daemon's session, per role.

    Only for the breakdown: a process's last sample may miss up to one interval of CPU
    before it exits. The total comes from RUSAGE_CHILDREN, which misses nothing.
    """

    def __init__(self, sid: int, interval: float = 0.1) -> None:
        self.sid = sid
        self.interval = interval
        self.last: Dict[int, Proc] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for pid, proc in session_procs(self.sid).items():
                # Keep the first parent and command line seen: at the end orphans are
                # re-parented to us, and a zombie's command line reads empty.
                known = self.last.get(pid)
                self.last[pid] = (
                    proc if known is None else replace(proc, ppid=known.ppid, cmdline=known.cmdline)
                )
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def by_role(self, named: Dict[int, str]) -> Dict[str, float]:
        """CPU seconds per role, plus ``waited``: seconds all of them waited for a CPU."""
        totals: Dict[str, float] = {"waited": 0.0}
        for proc in self.last.values():
            role = role_of(proc, named)
            totals[role] = totals.get(role, 0.0) + proc.cpu
            totals["waited"] += proc.waited
        return totals


# -- configurations ---------------------------------------------------------------------


def new_dir(prefix: str) -> Path:
    """A fresh directory on tmpfs (the root disk slows down after mass deletes)."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    return Path(tempfile.mkdtemp(prefix=prefix, dir=base))


def daemon_config(
    directory: Path,
    providers: List[str],
    workers: int,
    always_dispatch: List[str],
    extra: Optional[Dict[str, Dict[str, Any]]] = None,
) -> Path:
    sections: Dict[str, Dict[str, Any]] = {
        "core": {
            "providers": providers,
            "connectors": ["jsonl"],
            "always_dispatch": always_dispatch,
            "plugin_dir_list": [str(PLUGIN_DIR)],
            "log_syntax": "json",
        },
        "stoqd": {"workers": workers, "spool_dir": str(directory / "spool")},
        "jsonl": {"output_file": directory / "results.jsonl"},
    }
    for name, values in (extra or {}).items():
        sections.setdefault(name, {}).update(values)
    return write_config(directory, sections)


def status(daemon: Daemon) -> Dict[str, Any]:
    """The status snapshot, straight from the control socket (no stoqctl process)."""
    answer = request(str(daemon.socket), {"cmd": "status"}, timeout=5.0)
    return answer.get("status", answer)  # type: ignore[no-any-return]


def wait_status(
    daemon: Daemon,
    predicate: Callable[[Dict[str, Any]], bool],
    timeout: float = 30.0,
    poll: float = 0.01,
) -> Dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon.process.poll() is not None:
            raise RuntimeError(f"stoqd exited ({daemon.process.returncode}):\n{daemon.log()}")
        try:
            snapshot = status(daemon)
            if predicate(snapshot):
                return snapshot
        except (DaemonDown, OSError, ValueError):
            pass
        time.sleep(poll)
    raise TimeoutError(f"stoqd did not reach the expected state in {timeout}s:\n{daemon.log()}")


def iso_seconds(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


# -- 1. throughput ----------------------------------------------------------------------


@dataclass
class Throughput:
    workers: int
    count: int
    size: int
    wall: float  # daemon start to exit
    span: float  # first to last result's time field
    cpu: float  # CPU seconds of the daemon and all its descendants
    cpu_roles: Dict[str, float] = field(default_factory=dict)
    load: float = 0.0  # the machine's 1-minute load average when the run ended

    @property
    def rate_span(self) -> float:
        return (self.count - 1) / self.span if self.span > 0 else float("nan")

    @property
    def rate_wall(self) -> float:
        return self.count / self.wall

    @property
    def cores(self) -> float:
        return self.cpu / self.wall


def run_throughput(workers: int, count: int, size: int) -> Throughput:
    directory = new_dir("stoqd-bench-tp-")
    try:
        config = daemon_config(
            directory,
            ["memprovider"],
            workers,
            ["hash"],
            {"memprovider": {"count": count, "size": size}},
        )
        cpu_before = children_cpu()
        started = time.monotonic()
        daemon = Daemon(config)
        sampler = CpuSampler(daemon.pid)
        try:
            code = daemon.wait_exit(timeout=600)
            wall = time.monotonic() - started
        finally:
            sampler.stop()
            named = roles(daemon)
            daemon.close()
        reap_orphans()
        cpu = children_cpu() - cpu_before
        if code != 0:
            raise RuntimeError(f"stoqd exited {code}:\n{daemon.log()}")
        first, last, lines = _result_times(directory / "results.jsonl")
        if lines != count:
            raise RuntimeError(f"expected {count} results, found {lines}")
        if count < 2:  # a baseline run: no span to speak of
            first = last = 0.0
        return Throughput(
            workers,
            count,
            size,
            wall,
            last - first,
            cpu,
            sampler.by_role(named),
            os.getloadavg()[0],
        )
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _result_times(path: Path) -> Tuple[float, float, int]:
    first, last, lines = float("inf"), float("-inf"), 0
    if not path.exists():  # nothing was saved
        return first, last, lines
    with open(path, "rb") as handle:
        for line in handle:
            moment = iso_seconds(json.loads(line)["time"])
            first, last, lines = min(first, moment), max(last, moment), lines + 1
    return first, last, lines


@dataclass
class Marginal:
    """What payloads cost beyond starting and stopping the daemon (a count=0 baseline)."""

    cpu: float  # CPU seconds per payload, all processes
    roles: Dict[str, float]  # CPU seconds per payload, per role

    @classmethod
    def of(cls, run: Throughput, baseline: Throughput) -> Marginal:
        roles = {
            role: max(0.0, (run.cpu_roles.get(role, 0.0) - baseline.cpu_roles.get(role, 0.0)))
            / run.count
            for role in run.cpu_roles
        }
        return cls(max(0.0, run.cpu - baseline.cpu) / run.count, roles)


def median_throughput(runs: List[Throughput]) -> Throughput:
    """The run with the median rate, so its columns stay consistent with each other."""
    ordered = sorted(runs, key=lambda r: r.rate_span)
    return ordered[len(ordered) // 2]


# -- 2. restart after SIGKILL -------------------------------------------------------------


@dataclass
class Restart:
    total: float  # SIGKILL to RUNNING with a new pid, as status shows it
    detect: float  # SIGKILL to the supervisor logging backoff
    backoff: float  # the delay it chose
    boot: float  # spawned to running (fork from the forkserver, load, ready)


def run_restarts(trials: int) -> Tuple[List[Restart], Dict[str, Any]]:
    directory = new_dir("stoqd-bench-kill-")
    daemon = Daemon(daemon_config(directory, ["idle1"], 1, ["hash"]))
    try:
        snapshot = wait_status(daemon, lambda s: _provider(s, "idle1")["state"] == "RUNNING")
        settings = {"startsecs": 1.0, "backoff_initial": 0.25}  # stoqd's defaults
        results = []
        for _ in range(trials):
            # Stay up past startsecs, so each kill is a first failure, as in production.
            wait_status(
                daemon,
                lambda s: (_provider(s, "idle1")["uptime"] or 0) > settings["startsecs"] + 0.2,
            )
            old_pid = _provider(status(daemon), "idle1")["pid"]
            killed_wall = time.time()
            killed = time.monotonic()
            os.kill(old_pid, signal.SIGKILL)
            wait_status(
                daemon,
                lambda s: (
                    _provider(s, "idle1")["state"] == "RUNNING"
                    and _provider(s, "idle1")["pid"] not in (None, old_pid)
                ),
            )
            total = time.monotonic() - killed
            results.append(_restart_breakdown(daemon, total, killed_wall))
        return results, {
            "restarts": _provider(status(daemon), "idle1")["restarts"],
            "first_state": _provider(snapshot, "idle1")["state"],
        }
    finally:
        daemon.close()
        reap_orphans()
        shutil.rmtree(directory, ignore_errors=True)


def _provider(snapshot: Dict[str, Any], name: str) -> Dict[str, Any]:
    return next(p for p in snapshot["providers"] if p["name"] == name)


def _restart_breakdown(daemon: Daemon, total: float, killed_wall: float) -> Restart:
    """Split the restart into detection, backoff and boot using the daemon's log."""
    events = [
        e
        for e in daemon.events()
        if e.get("provider") == "idle1" and iso_seconds(e["timestamp"]) >= killed_wall - 0.001
    ]
    moments = {}
    retry_in = float("nan")
    for event in events:
        moments.setdefault(event["event"], iso_seconds(event["timestamp"]))
        if event["event"] == "backoff":
            retry_in = float(event.get("retry_in", "nan"))
    detect = moments.get("backoff", float("nan")) - killed_wall
    boot = moments.get("running", float("nan")) - moments.get("spawned", float("nan"))
    return Restart(total, detect, retry_in, boot)


# -- 3. idle memory -----------------------------------------------------------------------


@dataclass
class Usage:
    """Memory of one or more processes, in MiB."""

    rss: float = 0.0  # resident: shared pages counted in every process that maps them
    pss: float = 0.0  # proportional: shared pages divided among the processes sharing them
    uss: float = 0.0  # unique: pages only this process has (what it costs to add one)
    processes: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(self.rss + other.rss, self.pss + other.pss, self.uss + other.uss,
                     self.processes + other.processes)  # fmt: skip


@dataclass
class Memory:
    total: Usage
    by_role: Dict[str, Usage]


IDLE_PROVIDERS = [f"idle{i}" for i in range(1, 6)]
DIRMON_PROVIDERS = [f"dirmon{i}" for i in range(1, 6)]  # stoqd's dirmon under 5 names


def run_memory(providers: List[str], settle: float) -> Memory:
    directory = new_dir("stoqd-bench-mem-")
    extra: Dict[str, Dict[str, Any]] = {}
    for name in providers:
        if name.startswith("dirmon"):  # each watches its own empty directory
            (directory / name).mkdir()
            extra[name] = {"source_dir": directory / name}
    # The workers load what etc/stoq.cfg's default loads: hash and mimetype into jsonl.
    config = daemon_config(directory, providers, 2, ["hash", "mimetype"], extra)
    daemon = Daemon(config)
    try:
        wait_status(
            daemon,
            lambda s: (
                all(p["state"] == "RUNNING" for p in s["providers"])
                and all(w["state"] == "idle" for w in s["workers"])
            ),
            poll=0.1,
        )
        time.sleep(settle)
        named = roles(daemon)
        by_role: Dict[str, Usage] = {}
        total = Usage()
        for proc in session_procs(daemon.pid).values():
            usage = memory_of(proc.pid)
            role = role_of(proc, named)
            by_role[role] = by_role.get(role, Usage()) + usage
            total = total + usage
        return Memory(total, by_role)
    finally:
        daemon.close()
        reap_orphans()
        shutil.rmtree(directory, ignore_errors=True)


def memory_of(pid: int) -> Usage:
    """RSS, PSS and USS of ``pid`` from /proc/PID/smaps_rollup (which counts in kB)."""
    kib: Dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("Rss", "Pss", "Private_Clean", "Private_Dirty"):
                kib[key] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        return Usage()
    uss = kib.get("Private_Clean", 0) + kib.get("Private_Dirty", 0)
    return Usage(kib.get("Rss", 0) / 1024, kib.get("Pss", 0) / 1024, uss / 1024, 1)


# -- output -------------------------------------------------------------------------------


def table(rows: List[List[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        lines.append(
            "  ".join(
                cell.ljust(w) if i == 0 else cell.rjust(w)
                for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            ).rstrip()
        )
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def size_text(size: int) -> str:
    if size >= MIB and size % MIB == 0:
        return f"{size // MIB} MiB"
    if size >= 1024 and size % 1024 == 0:
        return f"{size // 1024} KiB"
    return f"{size} B"


def throughput_table(
    results: Dict[Tuple[int, int, int], List[Throughput]], baselines: Dict[int, Throughput]
) -> str:
    rows = [
        ["payloads", "workers", "payloads/s", "MiB/s", "wall s", "cores used", "cores steady",
         "CPU us/payload", "supervisor", "provider", "workers ", "waited", "load"]
    ]  # fmt: skip
    for (count, size, workers), runs in results.items():
        best = median_throughput(runs)
        marginal = Marginal.of(best, baselines[workers])
        per_item = {k: v * 1e6 for k, v in marginal.roles.items()}
        rows.append([
            f"{count} x {size_text(size)}", str(workers),
            f"{best.rate_span:,.0f}", f"{best.rate_span * size / MIB:,.1f}",
            f"{best.wall:.2f}", f"{best.cores:.2f}", f"{best.rate_span * marginal.cpu:.2f}",
            f"{marginal.cpu * 1e6:,.0f}",
            f"{per_item.get('supervisor', 0):,.0f}", f"{per_item.get('provider', 0):,.0f}",
            f"{per_item.get('worker', 0):,.0f}",
            f"{best.cpu_roles.get('waited', 0) / best.wall:.2f}", f"{best.load:.1f}",
        ])  # fmt: skip
    return table(rows)


def print_memory(kind: str, memories: List[Memory]) -> None:
    memory = sorted(memories, key=lambda m: m.total.pss)[len(memories) // 2]
    verdict = "met" if memory.total.rss <= MEMORY_TARGET_MIB else "MISSED"
    print(
        f"3. Idle memory, 5 {kind} providers + 2 workers (hash, mimetype), "
        f"{memory.total.processes} processes (median of {len(memories)} by PSS; "
        f"target <= {MEMORY_TARGET_MIB:.0f} MiB RSS: {verdict})"
    )
    rows = [["process", "count", "RSS MiB", "PSS MiB", "USS MiB"]]
    for role in ("supervisor", "forkserver", "resource tracker", "provider", "worker", "other"):
        if role in memory.by_role:
            u = memory.by_role[role]
            rows.append([role, str(u.processes), f"{u.rss:.1f}", f"{u.pss:.1f}", f"{u.uss:.1f}"])
    u = memory.total
    rows.append(["total", str(u.processes), f"{u.rss:.1f}", f"{u.pss:.1f}", f"{u.uss:.1f}"])
    print(table(rows))
    print()


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: fewer payloads, one run each"
    )
    parser.add_argument("--runs", type=int, default=3, help="runs per throughput cell (median)")
    parser.add_argument("--count", type=int, default=20000, help="small payloads per run")
    parser.add_argument("--large-count", type=int, default=200, help="1 MiB payloads per run")
    parser.add_argument("--kills", type=int, default=5, help="SIGKILL trials (median)")
    parser.add_argument(
        "--budget", type=float, default=180.0,
        help="seconds after which throughput cells stop repeating runs",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, help="also write the raw numbers here")
    args = parser.parse_args(argv)
    if args.quick:
        args.runs, args.count, args.large_count, args.kills = 1, 2000, 50, 3
    become_subreaper()
    began = time.monotonic()
    facts = machine_facts()
    print("stoqd daemon benchmark")
    print(table([["machine", ""], *[[k, v] for k, v in facts.items()]]))
    print(flush=True)

    # Starting and stopping the daemon costs CPU whatever it scans: measure it once per
    # pool size, so the per-payload columns show only what payloads cost.
    baselines = {workers: run_throughput(workers, 0, 4096) for workers in (1, 2)}
    cells = [(args.count, 4096), (args.large_count, MIB)]
    throughput: Dict[Tuple[int, int, int], List[Throughput]] = {}
    for count, size in cells:
        for workers in (1, 2):
            runs: List[Throughput] = []
            while len(runs) < args.runs:
                runs.append(run_throughput(workers, count, size))
                if time.monotonic() - began > args.budget:
                    break  # a loaded machine: fewer runs rather than a run of many minutes
            throughput[(count, size, workers)] = runs
            best = median_throughput(runs)
            print(
                f"  throughput {count} x {size_text(size)}, {workers} worker(s): "
                f"{best.rate_span:,.0f} payloads/s, {best.cores:.2f} cores "
                f"({len(runs)} run(s))",
                flush=True,
            )
    print()
    runs_done = sorted({len(runs) for runs in throughput.values()})
    print(
        "1. Throughput: memprovider -> hash -> jsonl "
        f"(median of {'/'.join(map(str, runs_done))} by payloads/s; baseline: "
        f"{baselines[1].wall:.2f} s, {baselines[1].cpu:.2f} CPU s for 1 worker, "
        f"{baselines[2].wall:.2f} s, {baselines[2].cpu:.2f} CPU s for 2, with no payload)"
    )
    print(throughput_table(throughput, baselines))
    print()

    restarts, _ = run_restarts(args.kills)
    total = statistics.median(r.total for r in restarts)
    print(
        f"2. SIGKILL of a provider -> RUNNING again (median of {len(restarts)}, "
        f"target <= {KILL_TARGET_S} s: {'met' if total <= KILL_TARGET_S else 'MISSED'})"
    )
    rows = [["trial", "total s", "detected s", "backoff s", "boot s"]]
    for n, r in enumerate(restarts, 1):
        rows.append(
            [str(n), f"{r.total:.3f}", f"{r.detect:.3f}", f"{r.backoff:.3f}", f"{r.boot:.3f}"]
        )
    rows.append(
        [
            "median",
            f"{total:.3f}",
            f"{statistics.median(r.detect for r in restarts):.3f}",
            f"{statistics.median(r.backoff for r in restarts):.3f}",
            f"{statistics.median(r.boot for r in restarts):.3f}",
        ]
    )
    print(table(rows))
    print()

    memories: Dict[str, List[Memory]] = {}
    for kind, providers in (("idle", IDLE_PROVIDERS), ("dirmon", DIRMON_PROVIDERS)):
        memories[kind] = [run_memory(providers, settle=2.0) for _ in range(args.runs)]
        print_memory(kind, memories[kind])
    print(f"bench_daemon.py took {time.monotonic() - began:.0f} s")

    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": facts,
                    "baselines": {w: asdict(r) for w, r in baselines.items()},
                    "throughput": {
                        f"{c}x{s}/{w}w": [asdict(r) for r in runs]
                        for (c, s, w), runs in throughput.items()
                    },
                    "restart": [asdict(r) for r in restarts],
                    "memory": {k: [asdict(m) for m in v] for k, v in memories.items()},
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
