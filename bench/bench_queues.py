"""Benchmark the queue providers against their bare clients, in one run.

For each source, N messages of S bytes (20,000 x 4 KiB by default):

- rabbitmq: a private RabbitMQ node (tests/services.py). *bare*: a pika consumer with the
  same prefetch that only acknowledges. *stoqd*: the real daemon, ``rabbitmq`` provider ->
  ``hash`` -> ``jsonl``, each message acknowledged after its result is saved.
- pubsub: the Pub/Sub emulator. *bare*: a streaming-pull subscriber with the same flow
  control that only acknowledges. *stoqd*: the ``pubsub`` provider, same pipeline.
- zmq: *bare*: a PULL socket that only receives. *stoqd*: the ``zmq`` provider (PULL,
  bound), same pipeline, counted when the results are saved (ZeroMQ has no ack).

Messages are published before the consumer starts (for zmq the sender runs alongside).
Bare: the clock runs from the first message consumed to the last ack, in this process.
stoqd: it runs from the first saved result to the last (their ``time``), (N - 1) / that
span, as ``bench_daemon.py`` counts; the run ends when ``stoqctl status`` (asked every
250 ms) shows every message acked (zmq: saved). Files live on tmpfs (/dev/shm). Numbers
are printed, never asserted.

Over the same interval the CPU time of each process is read from ``/proc/PID/stat`` and
printed per role, in microseconds per message: the daemon's supervisor, provider and
workers, the broker (RabbitMQ's Erlang VM) and, for the bare client, this script itself.
For stoqd the processes are sampled every 50 ms from the provider's start, and their CPU
time at the first and last result is interpolated between the samples around them. (Before
2026-11-25 the span began when status first showed a message received, which the provider
reports every 0.5 s: it missed the first few hundred milliseconds of the busiest CPU, so
the CPU per message read 10-15% low.)
With ``--repeat N`` each source runs N times and the run with the median stoqd rate is
shown.

For rabbitmq a *ceiling* follows: the CPU per message that no consumer of this shape can go
below on this machine, and the rate all its cores would reach at that cost doing nothing
else. It adds three measured parts: the broker (in stoqd's run, which acks several
messages at once), the bare pika client (receive and ack) and stoqd's own scan and save of
a message (``hash`` -> ``jsonl`` through the same framework objects, in this one process,
with nothing passed between processes).

Run: ``.venv/bin/python bench/bench_queues.py [--messages N] [--size S] [--only NAME]
[--repeat N] [--prefetch N]`` (stoqd's ``max_queue`` is twice the prefetch, at least 100).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the broker fixtures' classes, without pytest

import orjson  # noqa: E402
from bench_daemon import iso_seconds, machine_facts  # noqa: E402  (this script's directory is on the path)

from stoqd.ctl import request  # noqa: E402
from stoqd.testing import Daemon, write_config  # noqa: E402

PREFETCH = 200  # --prefetch: messages a consumer holds unacknowledged, bare and stoqd alike
WORKERS = 2
RAM = "/dev/shm" if os.path.isdir("/dev/shm") else None
TICK = os.sysconf("SC_CLK_TCK")
# Seconds between status requests once the daemon's processes are known (the CPU is still
# sampled every 50 ms): each request is work for the supervisor, which asking 20 times a
# second made about 4% of its CPU, where a monitoring system asks every few seconds.
STATUS_EVERY = 0.25

CpuRoles = Dict[str, float]  # role -> CPU microseconds per message


@dataclass
class Measured:
    """One source's numbers: messages/s and CPU per message by role, bare and stoqd."""

    bare: float
    stoqd: float
    bare_cpu: CpuRoles = field(default_factory=dict)
    stoqd_cpu: CpuRoles = field(default_factory=dict)
    scan_cpu: Optional[float] = None  # scan and save of one message in one process, CPU µs


def cpu_seconds(pid: int) -> Optional[float]:
    """User + system CPU seconds of process ``pid`` (all its threads), or None if gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()  # the command name may hold spaces
    return (int(fields[11]) + int(fields[12])) / TICK


def self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def snapshot(pids: Dict[int, str]) -> Dict[int, float]:
    return {pid: cpu for pid in pids if (cpu := cpu_seconds(pid)) is not None}


def per_message(pids: Dict[int, str], before: Dict[int, float], after: Dict[int, float],
                count: int) -> CpuRoles:  # fmt: skip
    """CPU microseconds per message by role between two snapshots."""
    roles: CpuRoles = {}
    for pid, role in pids.items():
        if pid in before and pid in after:
            roles[role] = roles.get(role, 0.0) + (after[pid] - before[pid]) * 1e6 / count
    return roles


def daemon_roles(daemon: Daemon, others: Dict[int, str]) -> Dict[int, str]:
    """Pid -> role for the daemon's processes (from its status) and ``others``."""
    snap = status(daemon)
    pids = {daemon.pid: "supervisor", **others}
    for provider in snap.get("providers", []):
        if provider.get("pid"):
            pids[int(provider["pid"])] = "provider"
    for worker in snap.get("workers", []):
        if worker.get("pid"):
            pids[int(worker["pid"])] = "workers"
    return pids


def broker_pids(pid_file: Path) -> Dict[int, str]:
    try:
        return {int(pid_file.read_text().strip()): "broker"}
    except (OSError, ValueError):
        return {}


def format_cpu(roles: CpuRoles) -> str:
    order = ["supervisor", "provider", "workers", "broker", "bench (bare client)"]
    names = [r for r in order if r in roles] + sorted(set(roles) - set(order))
    total = sum(roles.values())
    cells = ", ".join(f"{name} {roles[name]:,.0f}" for name in names)
    return f"{cells}; total {total:,.0f}"


def status(daemon: Daemon) -> Dict[str, Any]:
    answer = request(str(daemon.socket), {"cmd": "status"}, timeout=5.0)
    return answer.get("status", answer)  # type: ignore[no-any-return]


def provider_stats(daemon: Daemon, name: str) -> Dict[str, Any]:
    for provider in status(daemon).get("providers", []):
        if provider["name"] == name:
            return provider.get("stats") or {}
    return {}


def run_daemon(name: str, options: Dict[str, Any], count: int, counter: str,
               feed: Optional[Callable[[], None]] = None,
               others: Optional[Dict[int, str]] = None) -> Tuple[float, CpuRoles]:  # fmt: skip
    """Messages/s of stoqd consuming ``count`` messages with provider ``name``, and the
    CPU per message of its processes (and of ``others``, pid -> role) meanwhile."""
    root = Path(tempfile.mkdtemp(prefix="stoqd-bq-", dir=RAM))
    config = write_config(root, {
        "core": {"providers": name, "connectors": "jsonl", "always_dispatch": "hash",
                 "max_queue": max(100, PREFETCH * 2), "log_level": "WARNING"},
        "stoqd": {"workers": WORKERS},
        name: options,
        "jsonl": {"output_file": "${here}/results.jsonl"},
        "hash": {"algorithms": "sha256"},
    })  # fmt: skip
    daemon = Daemon(config)
    try:
        pids: Dict[int, str] = {}
        samples: List[Tuple[float, Dict[int, float]]] = []  # (time.time(), CPU per pid)
        deadline = time.monotonic() + 600
        feeder: Optional[threading.Thread] = None
        stats: Dict[str, Any] = {}
        asked_at = 0.0
        while time.monotonic() < deadline:
            if daemon.process.poll() is not None:
                raise RuntimeError(f"stoqd exited:\n{daemon.log()[-3000:]}")
            if not pids or time.monotonic() - asked_at >= STATUS_EVERY:
                asked_at = time.monotonic()
                try:
                    stats = provider_stats(daemon, name)
                except Exception:  # not up yet
                    stats = {}
            if feed is not None and feeder is None and stats.get("connection"):
                feeder = threading.Thread(target=feed, daemon=True)
                feeder.start()
            if not pids:  # from the provider's start, every process's CPU is sampled
                try:
                    roles = daemon_roles(daemon, others or {})
                except Exception:  # not up yet
                    roles = {}
                if {"provider", "workers"} <= set(roles.values()):
                    pids = roles
            if pids:
                samples.append((time.time(), snapshot(pids)))
            if (stats.get(counter) or 0) >= count:
                samples.append((time.time(), snapshot(pids)))
                # Results saved before the first sample (rare: a fast start) are left out.
                moments = [t for t in result_times(root / "results.jsonl") if t >= samples[0][0]]
                first, last = moments[0], moments[-1]
                before, after = cpu_at(samples, first), cpu_at(samples, last)
                spans = len(moments) - 1
                return spans / (last - first), per_message(pids, before, after, spans)
            time.sleep(0.05)
        raise RuntimeError(f"{name}: timed out; last stats {stats}")
    finally:
        daemon.close()
        shutil.rmtree(root, ignore_errors=True)


def result_times(path: Path) -> List[float]:
    """Every result's ``time`` (epoch seconds), in order."""
    lines = path.read_bytes().splitlines()
    return sorted(iso_seconds(orjson.loads(line)["time"]) for line in lines)


def cpu_at(samples: List[Tuple[float, Dict[int, float]]], moment: float) -> Dict[int, float]:
    """Each process's CPU seconds at ``moment``, between the two samples around it."""
    for (t0, cpu0), (t1, cpu1) in itertools.pairwise(samples):
        if t0 <= moment <= t1:
            share = (moment - t0) / (t1 - t0) if t1 > t0 else 0.0
            return {pid: cpu0[pid] + (cpu1[pid] - cpu0[pid]) * share
                    for pid in cpu0 if pid in cpu1}  # fmt: skip
    raise RuntimeError(f"no samples around {moment}")  # not expected: see run_daemon


# -- RabbitMQ ---------------------------------------------------------------------------


def bench_rabbitmq(count: int, size: int) -> Measured:
    import pika
    from services import RabbitNode

    base = Path(tempfile.mkdtemp(prefix="stoqd-bq-rabbit-", dir="/tmp"))
    node = RabbitNode(base)
    node.start()
    try:
        params = pika.ConnectionParameters("127.0.0.1", node.port)

        def fill(queue: str) -> None:
            with pika.BlockingConnection(params) as link:
                channel = link.channel()
                channel.exchange_declare("stoqd.dead-letter", "direct", durable=True)
                channel.queue_declare(f"{queue}.dead", durable=True)
                channel.queue_bind(f"{queue}.dead", "stoqd.dead-letter", routing_key=queue)
                channel.queue_declare(queue, durable=True, arguments={
                    "x-dead-letter-exchange": "stoqd.dead-letter",
                    "x-dead-letter-routing-key": queue})  # fmt: skip
                body = os.urandom(size)
                for number in range(count):
                    channel.basic_publish("", queue, body[:-8] + number.to_bytes(8, "big"),
                                          pika.BasicProperties(message_id=str(number)))  # fmt: skip

        fill("bare")
        broker = broker_pids(node.pid_file)
        with pika.BlockingConnection(params) as link:
            channel = link.channel()
            channel.basic_qos(prefetch_count=PREFETCH)
            seen = 0
            started = 0.0
            before, mine = {}, 0.0
            for method, _, _ in channel.consume("bare", inactivity_timeout=30):
                if method is None:
                    raise RuntimeError("bare consumer: queue ran dry")
                if seen == 0:
                    started = time.monotonic()
                    before, mine = snapshot(broker), self_cpu()
                channel.basic_ack(method.delivery_tag)
                seen += 1
                if seen == count:
                    break
            bare = count / (time.monotonic() - started)
            bare_cpu = per_message(broker, before, snapshot(broker), count)
            bare_cpu["bench (bare client)"] = (self_cpu() - mine) * 1e6 / count
            channel.cancel()
        fill("stoqd")
        options = {"host": "127.0.0.1", "port": node.port, "queue": "stoqd",
                   "prefetch": PREFETCH}  # fmt: skip
        stoqd, stoqd_cpu = run_daemon("rabbitmq", options, count, "acked", others=broker)
        return Measured(bare, stoqd, bare_cpu, stoqd_cpu, scan_and_save_cpu(count, size))
    finally:
        node.close()
        shutil.rmtree(base, ignore_errors=True)


# -- Pub/Sub emulator -------------------------------------------------------------------


def bench_pubsub(count: int, size: int) -> Measured:
    from services import PubsubEmulator

    base = Path(tempfile.mkdtemp(prefix="stoqd-bq-pubsub-", dir="/tmp"))
    emulator = PubsubEmulator(base)
    emulator.start()
    os.environ["PUBSUB_EMULATOR_HOST"] = emulator.host
    try:
        from google.cloud import pubsub_v1

        publisher = pubsub_v1.PublisherClient()
        subscriber = pubsub_v1.SubscriberClient()

        def fill(name: str) -> None:
            topic = publisher.topic_path("bench", f"topic-{name}")
            publisher.create_topic(name=topic)
            subscriber.create_subscription(
                name=subscriber.subscription_path("bench", f"sub-{name}"), topic=topic,
                ack_deadline_seconds=60,
            )  # fmt: skip
            body = os.urandom(size)
            futures = [publisher.publish(topic, body[:-8] + n.to_bytes(8, "big"))
                       for n in range(count)]  # fmt: skip
            concurrent.futures.wait(futures)

        fill("bare")
        seen = [0]
        started = [0.0]
        finished = threading.Event()
        lock = threading.Lock()

        def on_message(message: Any) -> None:
            message.ack()
            with lock:
                if seen[0] == 0:
                    started[0] = time.monotonic()
                seen[0] += 1
                if seen[0] >= count:
                    finished.set()

        flow = pubsub_v1.types.FlowControl(max_messages=PREFETCH)
        future = subscriber.subscribe(subscriber.subscription_path("bench", "sub-bare"),
                                      on_message, flow_control=flow)  # fmt: skip
        if not finished.wait(600):
            raise RuntimeError(f"bare subscriber: {seen[0]} of {count}")
        bare = count / (time.monotonic() - started[0])
        future.cancel()
        fill("stoqd")
        options = {"project_id": "bench", "subscription": "sub-stoqd", "max_messages": PREFETCH}
        stoqd, stoqd_cpu = run_daemon("pubsub", options, count, "acked")
        return Measured(bare, stoqd, stoqd_cpu=stoqd_cpu)
    finally:
        emulator.close()
        shutil.rmtree(base, ignore_errors=True)


# -- ZeroMQ -----------------------------------------------------------------------------


def bench_zmq(count: int, size: int) -> Measured:
    import zmq

    context = zmq.Context()
    body = os.urandom(size)

    def sender(endpoint: str) -> Callable[[], None]:
        def send() -> None:
            push = context.socket(zmq.PUSH)
            push.connect(endpoint)
            for number in range(count):
                push.send(body[:-8] + number.to_bytes(8, "big"))
            push.close(linger=-1)

        return send

    base = Path(tempfile.mkdtemp(prefix="stoqd-bq-zmq-", dir="/tmp"))
    try:
        pull = context.socket(zmq.PULL)
        pull.bind(f"ipc://{base}/bare.sock")
        threading.Thread(target=sender(f"ipc://{base}/bare.sock"), daemon=True).start()
        pull.recv()
        started = time.monotonic()
        for _ in range(count - 1):
            pull.recv()
        bare = count / (time.monotonic() - started)
        pull.close()
        endpoint = f"ipc://{base}/stoqd.sock"
        stoqd, stoqd_cpu = run_daemon("zmq", {"endpoint": endpoint}, count, "saved",
                                      feed=sender(endpoint))  # fmt: skip
        return Measured(bare, stoqd, stoqd_cpu=stoqd_cpu)
    finally:
        context.destroy(linger=0)
        shutil.rmtree(base, ignore_errors=True)


BENCHES: Dict[str, Callable[[int, int], Measured]] = {
    "rabbitmq": bench_rabbitmq,
    "pubsub": bench_pubsub,
    "zmq": bench_zmq,
}


def scan_and_save_cpu(count: int, size: int) -> float:
    """CPU µs per message of what a worker does with it, in this process alone: the same
    framework objects and plugins as ``run_daemon`` (``hash`` sha256 -> ``jsonl`` on
    tmpfs), a Payload with a provider's metadata, and nothing sent between processes."""
    from stoqd.framework.core import Stoq
    from stoqd.framework.data import Payload, PayloadMeta, RequestMeta

    root = Path(tempfile.mkdtemp(prefix="stoqd-bq-scan-", dir=RAM))
    try:
        stoq = Stoq(
            plugin_opts={"jsonl": {"output_file": str(root / "results.jsonl")},
                         "hash": {"algorithms": "sha256"}},
            always_dispatch=["hash"], connectors=["jsonl"],
        )  # fmt: skip
        stoq.load_scan_plugins()
        body = os.urandom(size)
        started = time.process_time()
        for number in range(count):
            extra = {"queue": "stoqd", "routing_key": "stoqd", "message_id": str(number)}
            payload = Payload(body, PayloadMeta(extra_data=extra))
            failures = stoq.save(stoq.scan_unsaved(payload, RequestMeta(source="bench")))
            if failures:
                raise RuntimeError(f"scan and save failed: {failures}")
        return (time.process_time() - started) * 1e6 / count
    finally:
        shutil.rmtree(root, ignore_errors=True)


def ceiling_line(name: str, run: Measured) -> Optional[str]:
    """The cost no consumer of this shape goes below, and its rate on every core."""
    broker = run.stoqd_cpu.get("broker")
    client = run.bare_cpu.get("bench (bare client)")
    if run.scan_cpu is None or broker is None or client is None:
        return None
    total = broker + client + run.scan_cpu
    cores = len(os.sched_getaffinity(0))
    return (f"  {name} ceiling: broker {broker:.0f} (stoqd's run) + pika client {client:.0f} "
            f"(bare run) + scan and save {run.scan_cpu:.0f} (one process) = {total:.0f} CPU "
            f"µs per message: {cores * 1e6 / total:,.0f} msg/s on {cores} cores, with "
            f"nothing between processes")  # fmt: skip


def load_average() -> str:
    return ", ".join(f"{x:.1f}" for x in os.getloadavg())


def measure(name: str, count: int, size: int, repeat: int) -> Measured:
    """Run one source ``repeat`` times; the run with the median stoqd rate."""
    runs: List[Measured] = []
    for number in range(1, repeat + 1):
        run = BENCHES[name](count, size)
        runs.append(run)
        print(f"  {name} run {number}: bare {run.bare:,.0f} msg/s, "
              f"stoqd {run.stoqd:,.0f} msg/s ({run.stoqd / run.bare:.0%}); "
              f"load average {load_average()}", flush=True)  # fmt: skip
    return sorted(runs, key=lambda run: run.stoqd)[(len(runs) - 1) // 2]


def cpu_lines(name: str, run: Measured) -> Iterable[str]:
    if run.bare_cpu:
        yield f"  {name} bare:  {format_cpu(run.bare_cpu)}"
    if run.stoqd_cpu:
        yield f"  {name} stoqd: {format_cpu(run.stoqd_cpu)}"
    ceiling = ceiling_line(name, run)
    if ceiling:
        yield ceiling


def main(argv: Optional[List[str]] = None) -> int:
    global PREFETCH
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--only", choices=sorted(BENCHES), action="append")
    parser.add_argument("--quick", action="store_true", help="2,000 messages")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs per source; the median stoqd rate is shown")  # fmt: skip
    parser.add_argument("--prefetch", type=int, default=PREFETCH,
                        help=f"prefetch / flow control of both consumers ({PREFETCH})")  # fmt: skip
    args = parser.parse_args(argv)
    PREFETCH = max(1, args.prefetch)
    count = 2_000 if args.quick else args.messages
    # The processor named: the same code ran at half these rates on another 2-core host.
    print(f"{count} messages of {args.size} bytes; prefetch/flow control {PREFETCH}; "
          f"{WORKERS} workers; hash (sha256) -> jsonl on tmpfs; {os.cpu_count()} cores "
          f"({machine_facts()['cpu model']}); load average {load_average()}")  # fmt: skip
    rows = []
    cpu: List[str] = []
    failed = False
    for name in args.only or list(BENCHES):
        try:
            run = measure(name, count, args.size, max(1, args.repeat))
            rows.append((name, f"{run.bare:,.0f}", f"{run.stoqd:,.0f}",
                         f"{run.stoqd / run.bare:.0%}"))  # fmt: skip
            cpu.extend(cpu_lines(name, run))
        except Exception as exc:  # one source failing does not hide the others' numbers
            failed = True
            rows.append((name, "error", "error", f"{type(exc).__name__}: {exc}"[:120]))
        print(f"  {name}: done", flush=True)
    header = ("source", "bare client msg/s", "stoqd msg/s", "stoqd / bare")
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(4)]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)))
    if cpu:
        print("CPU microseconds per message by process role, over the measured interval:")
        print("\n".join(cpu))
    print(f"load average at the end {load_average()}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
