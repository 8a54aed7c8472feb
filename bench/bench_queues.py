"""Benchmark the queue providers against their bare clients, in one run.

For each source, N messages of S bytes (20,000 x 4 KiB by default):

- rabbitmq: a private RabbitMQ node (tests/services.py). *bare*: a pika consumer with the
  same prefetch that only acknowledges. *stoqd*: the real daemon, ``rabbitmq`` provider ->
  ``hash`` -> ``jsonl``, each message acknowledged after its result is saved.
- pubsub: the Pub/Sub emulator. *bare*: a streaming-pull subscriber with the same flow
  control that only acknowledges. *stoqd*: the ``pubsub`` provider, same pipeline.
- zmq: *bare*: a PULL socket that only receives. *stoqd*: the ``zmq`` provider (PULL,
  bound), same pipeline, counted when the results are saved (ZeroMQ has no ack).

Messages are published before the consumer starts (for zmq the sender runs alongside);
the clock runs from the first message consumed (bare) or the provider's first ``put``
(stoqd) to the last ack or save, read from ``stoqctl status`` over the control socket
every 50 ms. Files live on tmpfs (/dev/shm). Numbers are printed, never asserted.

Run: ``.venv/bin/python bench/bench_queues.py [--messages N] [--size S] [--only NAME]``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the broker fixtures' classes, without pytest

from stoqd.ctl import request  # noqa: E402
from stoqd.testing import Daemon, write_config  # noqa: E402

PREFETCH = 200
WORKERS = 2
RAM = "/dev/shm" if os.path.isdir("/dev/shm") else None


def status(daemon: Daemon) -> Dict[str, Any]:
    answer = request(str(daemon.socket), {"cmd": "status"}, timeout=5.0)
    return answer.get("status", answer)  # type: ignore[no-any-return]


def provider_stats(daemon: Daemon, name: str) -> Dict[str, Any]:
    for provider in status(daemon).get("providers", []):
        if provider["name"] == name:
            return provider.get("stats") or {}
    return {}


def run_daemon(name: str, options: Dict[str, Any], count: int, counter: str,
               feed: Optional[Callable[[], None]] = None) -> float:  # fmt: skip
    """Messages/s of stoqd consuming ``count`` messages with provider ``name``."""
    root = Path(tempfile.mkdtemp(prefix="stoqd-bq-", dir=RAM))
    config = write_config(root, {
        "core": {"providers": name, "connectors": "jsonl", "always_dispatch": "hash",
                 "max_queue": PREFETCH * 2, "log_level": "WARNING"},
        "stoqd": {"workers": WORKERS},
        name: options,
        "jsonl": {"output_file": "${here}/results.jsonl"},
        "hash": {"algorithms": "sha256"},
    })  # fmt: skip
    daemon = Daemon(config)
    try:
        first: Optional[float] = None
        deadline = time.monotonic() + 600
        feeder: Optional[threading.Thread] = None
        while time.monotonic() < deadline:
            if daemon.process.poll() is not None:
                raise RuntimeError(f"stoqd exited:\n{daemon.log()[-3000:]}")
            try:
                stats = provider_stats(daemon, name)
            except Exception:  # not up yet
                stats = {}
            if feed is not None and feeder is None and stats.get("connection"):
                feeder = threading.Thread(target=feed, daemon=True)
                feeder.start()
            done = stats.get(counter) or 0
            if first is None and (stats.get("received") or 0) > 0:
                first = time.monotonic()
            if done >= count:
                assert first is not None
                return count / (time.monotonic() - first)
            time.sleep(0.05)
        raise RuntimeError(f"{name}: timed out; last stats {stats}")
    finally:
        daemon.close()
        shutil.rmtree(root, ignore_errors=True)


# -- RabbitMQ ---------------------------------------------------------------------------


def bench_rabbitmq(count: int, size: int) -> Tuple[float, float]:
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
        with pika.BlockingConnection(params) as link:
            channel = link.channel()
            channel.basic_qos(prefetch_count=PREFETCH)
            seen = 0
            started = 0.0
            for method, _, _ in channel.consume("bare", inactivity_timeout=30):
                if method is None:
                    raise RuntimeError("bare consumer: queue ran dry")
                if seen == 0:
                    started = time.monotonic()
                channel.basic_ack(method.delivery_tag)
                seen += 1
                if seen == count:
                    break
            bare = count / (time.monotonic() - started)
            channel.cancel()
        fill("stoqd")
        options = {"host": "127.0.0.1", "port": node.port, "queue": "stoqd",
                   "prefetch": PREFETCH}  # fmt: skip
        return bare, run_daemon("rabbitmq", options, count, "acked")
    finally:
        node.close()
        shutil.rmtree(base, ignore_errors=True)


# -- Pub/Sub emulator -------------------------------------------------------------------


def bench_pubsub(count: int, size: int) -> Tuple[float, float]:
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
        return bare, run_daemon("pubsub", options, count, "acked")
    finally:
        emulator.close()
        shutil.rmtree(base, ignore_errors=True)


# -- ZeroMQ -----------------------------------------------------------------------------


def bench_zmq(count: int, size: int) -> Tuple[float, float]:
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
        stoqd = run_daemon("zmq", {"endpoint": endpoint}, count, "saved", feed=sender(endpoint))
        return bare, stoqd
    finally:
        context.destroy(linger=0)
        shutil.rmtree(base, ignore_errors=True)


BENCHES: Dict[str, Callable[[int, int], Tuple[float, float]]] = {
    "rabbitmq": bench_rabbitmq,
    "pubsub": bench_pubsub,
    "zmq": bench_zmq,
}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--only", choices=sorted(BENCHES), action="append")
    parser.add_argument("--quick", action="store_true", help="2,000 messages")
    args = parser.parse_args(argv)
    count = 2_000 if args.quick else args.messages
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"{count} messages of {args.size} bytes; prefetch/flow control {PREFETCH}; "
          f"{WORKERS} workers; hash (sha256) -> jsonl on tmpfs; {os.cpu_count()} cores; "
          f"load average {load}")  # fmt: skip
    rows = []
    failed = False
    for name in args.only or list(BENCHES):
        try:
            bare, stoqd = BENCHES[name](count, args.size)
            rows.append((name, f"{bare:,.0f}", f"{stoqd:,.0f}", f"{stoqd / bare:.0%}"))
        except Exception as exc:  # one source failing does not hide the others' numbers
            failed = True
            rows.append((name, "error", "error", f"{type(exc).__name__}: {exc}"[:120]))
        print(f"  {name}: done", flush=True)
    header = ("source", "bare client msg/s", "stoqd msg/s", "stoqd / bare")
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(4)]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
