"""Real brokers for the queue provider tests: a private RabbitMQ node and the Pub/Sub emulator.

Both are started without systemd, on free loopback ports, with their own temporary state,
only when a test asks for them, and once per session. A missing server skips the tests
that need it with a message naming the Debian package; with ``STOQD_REQUIRE_SERVICES=1``
(set by ``.ci/run``) the same message fails them instead, so CI cannot pass by skipping.

Fixtures (``mq_`` prefixed; import them into a conftest):

- ``mq_rabbitmq``: a running :class:`RabbitNode` (``.url``, ``.port``, ``.stop()``, ``.start()``).
- ``mq_pubsub``: a running :class:`PubsubEmulator` (``.host``, ``.env``) with
  ``PUBSUB_EMULATOR_HOST`` set in this process for the session.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterator, List, NoReturn, Optional

import pytest

RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")
EMULATOR = Path("/usr/lib/google-cloud-sdk/platform/pubsub-emulator/bin/cloud-pubsub-emulator")


def missing_service(message: str) -> NoReturn:
    """Skip (on a user's machine) or fail (on CI) a test whose service is not installed."""
    if os.environ.get("STOQD_REQUIRE_SERVICES") == "1":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def _port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int, low: int = 20000, high: int = 32000) -> List[int]:
    """``count`` distinct free loopback ports below the kernel's ephemeral range.

    RabbitMQ's CLI listens on 35672-35682 and the kernel hands out 32768-60999 to
    outgoing connections, so the broker's ports are drawn from below both.
    """
    ports: List[int] = []
    while len(ports) < count:
        port = random.randint(low, high)
        if port not in ports and _port_is_free(port):
            ports.append(port)
    return ports


def _wait_for_amqp(port: int, timeout: float, process: subprocess.Popen, log: Path) -> None:
    import pika  # only the RabbitMQ tests need it

    params = pika.ConnectionParameters("127.0.0.1", port, connection_attempts=1, socket_timeout=2)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None and process.returncode != 0:
            raise RuntimeError(f"rabbitmq-server exited {process.returncode}:\n{_tail(log)}")
        try:
            pika.BlockingConnection(params).close()
            return
        except pika.exceptions.AMQPError:
            time.sleep(0.2)
    raise RuntimeError(f"rabbitmq on 127.0.0.1:{port} not ready after {timeout}s:\n{_tail(log)}")


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"


# -- RabbitMQ ---------------------------------------------------------------------------


def _make_certificates(base: Path) -> Path:
    """A throw-away CA, a server certificate for ``localhost`` (the TLS listener) and a
    client certificate (``client.pem``, ``client.key``), which the listener requires."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=base, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
            "/CN=stoqd test CA", "-keyout", "ca.key", "-out", "ca.pem")  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
            "-keyout", "server.key", "-out", "server.csr")  # fmt: skip
    (base / "ext.cnf").write_text("subjectAltName = DNS:localhost, IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", "ext.cnf",
            "-out", "server.pem")  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=stoqd test client",
            "-keyout", "client.key", "-out", "client.csr")  # fmt: skip
    openssl("x509", "-req", "-in", "client.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-out", "client.pem")  # fmt: skip
    for name in ("server.key", "server.pem", "ca.pem", "client.key", "client.pem"):
        (base / name).chmod(0o644)  # read by the node (same user here), shown to tests
    return base / "ca.pem"


class RabbitNode:
    """A RabbitMQ node of our own: its data dir, cookie, epmd port and AMQP port.

    ``stop()`` and ``start()`` keep the data directory, so durable queues and persistent
    messages survive a restart, as they do on a real broker.
    """

    def __init__(self, base: Path) -> None:
        self.base = base
        self.port, self.dist_port, self.epmd_port, self.tls_port = free_ports(4)
        self.node = f"stoqdtest{self.port}@localhost"
        self.pid_file = base / "rabbit.pid"
        self.log = base / "server.log"
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"
        cookie = base / ".erlang.cookie"
        cookie.write_text(f"stoqdtest{random.getrandbits(64):x}")
        cookie.chmod(0o400)
        (base / "enabled_plugins").write_text("[].\n")
        self.ca_file = _make_certificates(base)
        (base / "rabbitmq.conf").write_text(
            "loopback_users = none\n"
            f"listeners.ssl.default = 127.0.0.1:{self.tls_port}\n"
            f"ssl_options.cacertfile = {base / 'ca.pem'}\n"
            f"ssl_options.certfile = {base / 'server.pem'}\n"
            f"ssl_options.keyfile = {base / 'server.key'}\n"
            "ssl_options.verify = verify_peer\n"
            "ssl_options.fail_if_no_peer_cert = true\n"
        )
        dist = "-kernel inet_dist_use_interface {127,0,0,1}"
        self.env: Dict[str, str] = {
            **os.environ,
            "HOME": str(base),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(base / "log"),
            "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(self.pid_file),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            # A private epmd: ending it at the end cannot disturb any other Erlang node.
            "ERL_EPMD_PORT": str(self.epmd_port),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": dist,
            "RABBITMQ_CTL_ERL_ARGS": dist,
        }

    def _ctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(RABBIT_BIN / "rabbitmqctl"), "-n", self.node, *args],
            env=self.env, capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip

    def start(self) -> None:
        """Start the node and wait until it accepts AMQP connections."""
        with open(self.log, "ab") as log:
            process = subprocess.Popen(
                [str(RABBIT_BIN / "rabbitmq-server"), "-detached"],
                env=self.env, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        # Readiness: an AMQP handshake succeeds (faster than ``rabbitmqctl wait``, whose
        # own Erlang VM takes seconds to boot).
        _wait_for_amqp(self.port, 120, process, self.log)

    def stop(self) -> None:
        """Stop the node (its data stays) and wait until it is gone."""
        self._ctl("stop", str(self.pid_file), timeout=120)

    def close(self) -> None:
        self.stop()
        subprocess.run(
            ["epmd", "-port", str(self.epmd_port), "-kill"],
            env=self.env, capture_output=True, timeout=30,
        )  # fmt: skip

    def ctl(self, *args: str) -> str:
        """``rabbitmqctl`` against this node; its output, or RuntimeError."""
        done = self._ctl(*args)
        if done.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout


@pytest.fixture(scope="session")
def mq_rabbitmq() -> Iterator[RabbitNode]:
    """A private RabbitMQ node for the session (``guest``/``guest`` on loopback)."""
    if not (RABBIT_BIN / "rabbitmq-server").exists():
        missing_service(
            "RabbitMQ is not installed: install the Debian package rabbitmq-server "
            "(make test does it as root)"
        )
    base = Path(tempfile.mkdtemp(prefix="stoqd-rabbit-", dir="/tmp"))
    node = RabbitNode(base)
    try:
        node.start()
    except Exception:
        node.close()
        raise
    yield node
    node.close()
    shutil.rmtree(base, ignore_errors=True)


# -- Google Pub/Sub emulator --------------------------------------------------------------


class PubsubEmulator:
    """The official Pub/Sub emulator (Java), in its own process group."""

    def __init__(self, base: Path) -> None:
        self.base = base
        (self.port,) = free_ports(1)
        self.host = f"127.0.0.1:{self.port}"
        self.env = {"PUBSUB_EMULATOR_HOST": self.host}
        self.log = base / "emulator.log"
        self.process: Optional[subprocess.Popen] = None

    def start(self, timeout: float = 60) -> None:
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [str(EMULATOR), "--host=127.0.0.1", f"--port={self.port}"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "HOME": str(self.base)},
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"pubsub emulator exited:\n{_tail(self.log)}")
            if f"listening on {self.port}" in self.log.read_text(errors="replace"):
                return
            time.sleep(0.1)
        raise RuntimeError(f"pubsub emulator not ready after {timeout}s:\n{_tail(self.log)}")

    def close(self) -> None:
        if self.process is None:
            return
        # The launcher script starts java as a child: end the whole group.
        for signum in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.process.pid, signum)
            except ProcessLookupError:
                break
            try:
                self.process.wait(10)
                break
            except subprocess.TimeoutExpired:
                continue


@pytest.fixture(scope="session")
def mq_pubsub() -> Iterator[PubsubEmulator]:
    """The Pub/Sub emulator for the session, with ``PUBSUB_EMULATOR_HOST`` set."""
    if not EMULATOR.exists():
        missing_service(
            "the Pub/Sub emulator is not installed: install the package "
            "google-cloud-cli-pubsub-emulator"
        )
    base = Path(tempfile.mkdtemp(prefix="stoqd-pubsub-", dir="/tmp"))
    emulator = PubsubEmulator(base)
    previous = os.environ.get("PUBSUB_EMULATOR_HOST")
    try:
        emulator.start()
        os.environ["PUBSUB_EMULATOR_HOST"] = emulator.host
        yield emulator
    finally:
        emulator.close()
        if previous is None:
            os.environ.pop("PUBSUB_EMULATOR_HOST", None)
        else:
            os.environ["PUBSUB_EMULATOR_HOST"] = previous
        shutil.rmtree(base, ignore_errors=True)
