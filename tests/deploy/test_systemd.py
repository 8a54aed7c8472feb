"""deploy/systemd: checked by systemd's own tools, offline, against a stub root.

``systemd-analyze verify`` needs the ExecStart binary and the standard targets to exist,
so each test builds a root with them, creates the service's user and directories there
with ``systemd-sysusers`` and ``systemd-tmpfiles`` from the files we ship, and verifies
the unit inside it. ``systemd-analyze security --offline`` rates the hardening.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
from deploy_helpers import CONTAINER_SETUP, DEPLOY, needs_namespaces

from stoqd.config import SCHEMA

SYSTEMD = DEPLOY / "systemd"
UNIT = SYSTEMD / "stoqd.service"
DROPIN_EXAMPLE = SYSTEMD / "stoqd.service.d" / "override.conf.example"
MAX_EXPOSURE = 2.5

pytestmark = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not installed (Debian package: systemd)",
)


def unit_entries(path: Path) -> List[Tuple[str, str, str]]:
    """(section, key, value) in order; systemd allows repeated keys, so no dict."""
    entries, section = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        entries.append((section, key.strip(), value.strip()))
    return entries


def service(path: Path = UNIT) -> Dict[str, List[str]]:
    values: Dict[str, List[str]] = {}
    for section, key, value in unit_entries(path):
        if section == "Service":
            values.setdefault(key, []).append(value)
    return values


def seconds(span: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|sec|min|m)?", span)
    assert match, f"not a simple time span: {span!r}"
    return float(match.group(1)) * (60 if match.group(2) in ("min", "m") else 1)


def default(section: str, key: str) -> str:
    return next(s.default for s in SCHEMA if (s.section, s.key) == (section, key))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A filesystem root where stoqd.service can load: binaries, targets, user, dirs."""
    root = tmp_path / "root"
    for directory in ("etc/systemd/system", "usr/lib/systemd/system", "opt/stoqd/bin", "bin"):
        (root / directory).mkdir(parents=True)
    stub = root / "opt/stoqd/bin/stoqd"
    stub.write_text("#!/bin/sh\n")
    stub.chmod(0o755)
    shutil.copy2("/bin/kill", root / "bin/kill")
    for target in Path("/lib/systemd/system").glob("*.target"):
        shutil.copy2(target, root / "usr/lib/systemd/system" / target.name)
    run(["systemd-sysusers", f"--root={root}", str(SYSTEMD / "stoqd.sysusers")])
    run(["systemd-tmpfiles", f"--root={root}", "--create", str(SYSTEMD / "stoqd.tmpfiles")])
    shutil.copy2(UNIT, root / "etc/systemd/system/stoqd.service")
    return root


def run(argv: List[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"{' '.join(argv)}: exit {done.returncode}\n{done.stderr}"
    return done


def verify(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["systemd-analyze", "verify", "--man=no", f"--root={root}",
         "/etc/systemd/system/stoqd.service"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def exposure(*args: str) -> Tuple[float, str, subprocess.CompletedProcess]:
    done = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager",
         f"--threshold={int(MAX_EXPOSURE * 10)}", *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    match = re.search(r"Overall exposure level for stoqd\.service: (\d+\.\d+) (\w+)", done.stdout)
    assert match, f"no exposure line:\n{done.stdout}\n{done.stderr}"
    return float(match.group(1)), match.group(2), done


def test_unit_verifies_without_a_single_warning(root: Path) -> None:
    done = verify(root)
    assert done.returncode == 0, done.stderr
    # Unknown keys and bad values are only warnings to systemd: for us they are errors.
    assert done.stdout + done.stderr == ""


def test_verify_notices_a_broken_unit(root: Path) -> None:
    """The check above can fail: a typo'd key and a missing binary are both caught."""
    unit = root / "etc/systemd/system/stoqd.service"
    unit.write_text(unit.read_text().replace("KillMode=mixed", "KillMode=mixd"))
    assert "Failed to parse kill mode specification" in verify(root).stderr
    (root / "opt/stoqd/bin/stoqd").unlink()
    done = verify(root)
    assert done.returncode != 0
    assert "Command /opt/stoqd/bin/stoqd is not executable" in done.stderr


def test_hardening_exposure_is_ok() -> None:
    score, verdict, done = exposure(str(UNIT))
    assert done.returncode == 0, done.stdout
    assert score <= MAX_EXPOSURE
    assert verdict in ("OK", "SAFE")
    quoted = f'{score} "{verdict}"'  # the README and docs/operating.md quote the score
    assert quoted in (SYSTEMD / "README.md").read_text()
    assert quoted in (DEPLOY.parent / "docs" / "operating.md").read_text()


def test_example_dropin_verifies_and_stays_ok(root: Path) -> None:
    dropins = root / "etc/systemd/system/stoqd.service.d"
    dropins.mkdir()
    shutil.copy2(DROPIN_EXAMPLE, dropins / "override.conf")
    done = verify(root)
    assert done.returncode == 0 and done.stdout + done.stderr == "", done.stderr
    score, _, done = exposure(f"--root={root}", "stoqd.service")
    assert done.returncode == 0 and score <= MAX_EXPOSURE, done.stdout
    stop = seconds(service(DROPIN_EXAMPLE)["TimeoutStopSec"][0])
    assert stop > 120  # the graceful_timeout its comment says it was raised to


def test_service_keys_that_must_be_there() -> None:
    unit = service()
    single = {key: values[-1] for key, values in unit.items()}
    assert single["Type"] == "notify"
    assert single["NotifyAccess"] == "main"
    assert single["ExecStart"] == "/opt/stoqd/bin/stoqd -c /etc/stoqd/stoq.cfg"
    assert single["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert single["KillMode"] == "mixed"
    assert single["Restart"] == "on-failure"
    assert single["RestartPreventExitStatus"] == "78"  # stoqd.config.EX_CONFIG
    assert seconds(single["WatchdogSec"]) > 0
    assert single["RuntimeDirectory"] == "stoqd"
    assert single["User"] == "stoqd" and "DynamicUser" not in single
    assert single["CapabilityBoundingSet"] == ""
    assert single["ProtectSystem"] == "strict"
    for key in ("NoNewPrivileges", "PrivateTmp", "ProtectHome", "MemoryDenyWriteExecute"):
        assert single[key] == "yes", key
    assert "@system-service" in unit["SystemCallFilter"]


def test_stop_timeout_outlasts_the_graceful_timeout() -> None:
    stop = seconds(service()["TimeoutStopSec"][-1])
    assert stop > float(default("stoqd", "graceful_timeout"))
    shipped = _cfg_value(SYSTEMD / "stoq.cfg", "stoqd", "graceful_timeout")
    assert stop > float(shipped)


def test_writable_paths_are_the_ones_tmpfiles_creates(root: Path) -> None:
    writable = " ".join(service()["ReadWritePaths"]).split()
    assert sorted(writable) == [
        f"/var/lib/stoqd/{name}" for name in ("done", "failed", "incoming", "results")
    ]
    for path in writable:
        made = root / path.lstrip("/")
        assert made.is_dir(), path
        assert made.stat().st_uid == _uid(root, "stoqd"), path


def test_shipped_config_writes_only_where_the_unit_allows() -> None:
    cfg = SYSTEMD / "stoq.cfg"
    assert _cfg_value(cfg, "stoqd", "control_socket") == "/run/stoqd/stoqd.sock"
    writable = [Path(p) for p in " ".join(service()["ReadWritePaths"]).split()]
    writable.append(Path("/run") / service()["RuntimeDirectory"][-1])
    paths = [
        Path(value)
        for line in cfg.read_text().splitlines()
        if not line.startswith("#") and "=" in line
        for value in [line.partition("=")[2].strip()]
        if value.startswith("/")
    ]
    assert len(paths) >= 5  # socket, watched, done, failed, results
    for path in paths:
        assert any(path == w or w in path.parents for w in writable), f"{path} is read-only"


def test_plugins_scan_under_memory_deny_write_execute(tmp_path: Path) -> None:
    """MemoryDenyWriteExecute=yes, as the kernel enforces it (PR_SET_MDWE, Linux 6.3+)."""
    probe = subprocess.run([sys.executable, "-c", _MDWE_PROBE], capture_output=True, text=True)
    if probe.returncode == 3:
        pytest.skip(f"this kernel has no PR_SET_MDWE ({os.uname().release})")
    assert probe.returncode == 0, probe.stderr
    sample = tmp_path / "sample.elf"
    shutil.copy2("/bin/ls", sample)
    done = subprocess.run(
        [sys.executable, "-c", _MDWE_SCAN, str(sample)],
        capture_output=True, text=True, timeout=120,
        env={k: v for k, v in os.environ.items() if k != "STOQ_CONFIG"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "W+X refused" in done.stderr
    assert '"sha256": "' in done.stdout
    assert '"mimetype": "application/' in done.stdout
    assert '"rule": "stoqd_elf_executable"' in done.stdout


# Set MDWE on this process (returns 3 when the kernel lacks it), prove it holds.
_MDWE_PROBE = """
import ctypes, mmap, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
    sys.exit(3)
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
except OSError:
    print("W+X refused", file=sys.stderr)
else:
    sys.exit("W+X memory was allowed: MDWE is not in force")
"""
# ... then scan with hash, mimetype and yara through the real `stoq scan` command.
_MDWE_SCAN = (
    _MDWE_PROBE
    + """
sys.argv = ["stoq", "scan", sys.argv[1], "-a", "hash", "mimetype", "yara"]
from stoqd.cli import main
sys.exit(main())
"""
)


def _cfg_value(path: Path, section: str, key: str) -> str:
    current = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("["):
            current = line.strip("[]")
        elif current == section and line.split("=")[0].strip() == key:
            return line.partition("=")[2].strip()
    raise AssertionError(f"{path}: [{section}] {key} is not set")


def _uid(root: Path, user: str) -> int:
    for line in (root / "etc/passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == user:
            return int(fields[2])
    raise AssertionError(f"{user} not in {root}/etc/passwd")


@needs_namespaces
def test_shipped_config_passes_check_config_in_the_units_layout(short_dir: Path) -> None:
    """ExecStart with --check-config, with /etc/stoqd, /var/lib/stoqd and /run/stoqd as the
    install steps lay them out (in a private mount namespace, so the host is untouched)."""
    for volume in ("incoming", "results"):
        (short_dir / volume).mkdir()
    config_dir = short_dir / "etc"
    config_dir.mkdir()
    shutil.copy2(SYSTEMD / "stoq.cfg", config_dir / "stoq.cfg")
    binary, *args = service()["ExecStart"][-1].split()
    assert binary == "/opt/stoqd/bin/stoqd"
    done = subprocess.run(
        ["unshare", "--mount", "--pid", "--fork", "--mount-proc", "--propagation", "private",
         "bash", "-c", CONTAINER_SETUP, "unit", str(short_dir), str(config_dir),
         str(Path(sys.executable).parent / "stoqd"), *args, "--check-config"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == "configuration OK"
