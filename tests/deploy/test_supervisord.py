"""deploy/supervisor/stoqd.conf under a real supervisord (PyPI ``supervisor``).

The shipped program section is used as is; only what names this machine changes in the
test's copy: the command (this venv's stoqd on a test config), the user (whoever runs the
tests), the working directory and the log file.
"""

from __future__ import annotations

import configparser
import getpass
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List

import pytest
from deploy_helpers import DEPLOY, held_config

from stoqd.config import SCHEMA

CONF = DEPLOY / "supervisor" / "stoqd.conf"
BIN = Path(sys.executable).parent


def program() -> Dict[str, str]:
    parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=(";",))
    parser.read(CONF)
    return dict(parser["program:stoqd"])


def test_program_section_keys() -> None:
    section = program()
    assert section["command"] == "/opt/stoqd/bin/stoqd -c /etc/stoqd/stoq.cfg"
    assert section["stopsignal"] == "TERM"
    assert section["stopasgroup"] == "false"  # stoqd drains and stops its own children
    assert section["killasgroup"] == "true"  # ... but nothing outlives a SIGKILL
    assert section["autorestart"] == "unexpected"
    assert section["exitcodes"].split(",") == ["0", "78"]
    assert section["redirect_stderr"] == "true"
    graceful = next(s for s in SCHEMA if s.key == "graceful_timeout").default
    assert int(section["stopwaitsecs"]) > float(graceful)


class Supervisord:
    """supervisord -n with the shipped program, in ``directory``."""

    def __init__(self, directory: Path, stoq_cfg: Path) -> None:
        self.directory = directory
        self.stoqd_log = directory / "stoqd.log"
        self.log = directory / "supervisord.log"
        self.conf = directory / "supervisord.conf"
        self.conf.write_text(self._main_conf() + "\n" + self._program(stoq_cfg))
        self.process = subprocess.Popen(
            [str(BIN / "supervisord"), "-n", "-c", str(self.conf)],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    def _main_conf(self) -> str:
        d = self.directory
        return (
            f"[unix_http_server]\nfile={d}/supervisor.sock\n\n"
            f"[supervisord]\nlogfile={self.log}\npidfile={d}/supervisord.pid\n"
            f"childlogdir={d}\nnodaemon=true\n\n"
            "[rpcinterface:supervisor]\n"
            "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n\n"
            f"[supervisorctl]\nserverurl=unix://{d}/supervisor.sock\n"
        )

    def _program(self, stoq_cfg: Path) -> str:
        replace = {
            "command": f"{BIN / 'stoqd'} -c {stoq_cfg}",
            "user": getpass.getuser(),
            "directory": str(self.directory),
            "stdout_logfile": str(self.stoqd_log),
        }
        lines = []
        for line in CONF.read_text().splitlines():
            key = line.split("=", 1)[0].strip()
            lines.append(f"{key}={replace[key]}" if key in replace and "=" in line else line)
        return "\n".join(lines) + "\n"

    def ctl(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "supervisorctl"), "-c", str(self.conf), *args],
            capture_output=True, text=True, timeout=90,
        )  # fmt: skip

    def wait(self, predicate: Callable[[], bool], what: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            assert self.process.poll() is None, self.log.read_text()
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}\n{self.stoqd_log_text()}")

    def stoqd_log_text(self) -> str:
        return self.stoqd_log.read_text() if self.stoqd_log.exists() else "(no stoqd log)"

    def events(self) -> List[dict]:
        return [json.loads(x) for x in self.stoqd_log_text().splitlines() if x.startswith("{")]

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(60)


@pytest.fixture
def supervisord(short_dir: Path) -> Iterator[Supervisord]:
    trigger = str(short_dir / "go")
    sup = Supervisord(short_dir, held_config(short_dir, count=1, slow=True, trigger=trigger))
    yield sup
    sup.close()


def _stoqctl_status(stoq_cfg: Path) -> dict:
    done = subprocess.run(
        [str(BIN / "stoqctl"), "-c", str(stoq_cfg), "status", "--json"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    return json.loads(done.stdout) if done.returncode in (0, 3) and done.stdout else {}


def test_start_running_then_stop_drains_in_flight_work(supervisord: Supervisord) -> None:
    stoq_cfg = supervisord.directory / "stoq.cfg"
    results = supervisord.directory / "results.jsonl"
    supervisord.wait(lambda: " RUNNING " in supervisord.ctl("status", "stoqd").stdout,
                     "supervisorctl status RUNNING")  # fmt: skip
    status = supervisord.ctl("status")
    assert status.returncode == 0, status.stdout
    assert status.stdout.split()[:3] == ["stoqd", "RUNNING", "pid"]

    # Now the provider puts its one payload, which spends 3 s in slowpoke: stop then,
    # with work in flight.
    (supervisord.directory / "go").touch()
    supervisord.wait(
        lambda: any(w.get("current") for w in _stoqctl_status(stoq_cfg).get("workers", [])),
        "a worker busy with the payload",
    )
    status_now = _stoqctl_status(stoq_cfg)  # one request: the 3 s scan is still running
    assert not results.exists()
    children = [p["pid"] for p in status_now["providers"]]
    children += [w["pid"] for w in status_now["workers"]]

    stop = supervisord.ctl("stop", "stoqd")
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert stop.stdout.strip() == "stoqd: stopped"

    # Drained: the in-flight result was saved, stoqd exited 0 on SIGTERM, no child is left.
    (saved,) = [json.loads(line) for line in results.read_text().splitlines()]
    assert saved["results"][0]["workers"][0]["slowpoke"] == {"slept": True}
    stopping = [e for e in supervisord.events() if e.get("event") == "stopping"]
    assert stopping and stopping[0]["reason"] == "signal SIGTERM"
    daemon_exits = [
        e["exit"]
        for e in supervisord.events()
        if e.get("event") == "exited" and "worker" not in e and "provider" not in e
    ]
    assert daemon_exits == [0]
    assert "stopped: stoqd (exit status 0)" in supervisord.log.read_text()
    for pid in children:
        assert not Path(f"/proc/{pid}").exists(), f"child {pid} outlived stoqd"

    after = supervisord.ctl("status", "stoqd")
    assert after.returncode == 3  # LSB: program not running
    assert after.stdout.split()[:2] == ["stoqd", "STOPPED"]
