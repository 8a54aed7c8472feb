"""Add sha256 hashes to deploy/docker/requirements.lock, in place, for ``--require-hashes``.

The image (python:3.11-slim-bookworm: CPython 3.11 on glibc 2.36) may be built on linux
x86_64 or aarch64, so every pin gets the hash of the file pip would pick on each of the
two, found with ``pip download --no-deps`` for that platform. A pure-Python wheel is one
file for both. A package with no wheel for a platform gets its sdist hashed instead, and
the script says so: that platform's build would then compile it from source.

Run it from the repository with the dev venv (pip comes from the running interpreter):

    .venv/bin/python deploy/docker/lock_hashes.py [--lock PATH] [--jobs N]

The pins themselves are not changed: edit or re-freeze them first (the lock's header
says how), then run this. Comment lines are kept where they are; existing hashes are
dropped and computed again. pip reads its usual configuration, so the hashes are those of
the files the configured index serves: run it against the index the image builds from.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

DEFAULT_LOCK = Path(__file__).resolve().with_name("requirements.lock")
PYTHON_VERSION = "3.11"
GLIBC_MINOR = 36  # Debian bookworm, the base image's distribution
ARCHES = ("x86_64", "aarch64")
# The legacy manylinux names that stand for a glibc version (PEP 600).
_LEGACY = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
_INDENT = "    "


@dataclass
class Pin:
    """One ``name==version`` line of the lock and the hashes that go with it."""

    name: str
    version: str
    hashes: List[str] = field(default_factory=list)

    @property
    def spec(self) -> str:
        """The requirement as pip takes it."""
        return f"{self.name}=={self.version}"


Line = Union[str, Pin]  # a comment or blank line is kept verbatim


def platform_tags(arch: str) -> List[str]:
    """Platform tags a glibc-2.36 ``arch`` machine accepts, most preferred first.

    Ordered as pip orders them natively, newest glibc first, so that ``pip download``
    picks the same wheel the image's pip will pick. (Given manylinux2014, pip moves
    manylinux2010 and manylinux1 up beside it: that changes the pick only for a release
    with a manylinux1/2010 wheel and another for glibc 2.5-2.16 but none newer.)
    """
    oldest = 17 if arch == "aarch64" else 5  # manylinux on aarch64 starts at glibc 2.17
    tags = []
    for minor in range(GLIBC_MINOR, oldest - 1, -1):
        tags.append(f"manylinux_2_{minor}_{arch}")
        if minor in _LEGACY:
            tags.append(f"{_LEGACY[minor]}_{arch}")
    tags.append(f"linux_{arch}")
    return tags


def parse_lock(text: str) -> List[Line]:
    """The lock's lines: comments verbatim, requirements as Pins (hashes included).

    Raises ValueError naming the line for anything that is not a ``==`` pin.
    """
    lines: List[Line] = []
    logical = ""
    first = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not logical and (not stripped or stripped.startswith("#")):
            lines.append(raw)
            continue
        if not logical:
            first = number
        if stripped.endswith("\\"):  # a continuation: the requirement goes on
            logical += stripped[:-1] + " "
            continue
        lines.append(_parse_requirement(logical + stripped, first))
        logical = ""
    if logical:
        raise ValueError(f"requirements.lock line {first}: continues past the end of the file")
    return lines


def _parse_requirement(logical: str, number: int) -> Pin:
    requirement, *options = logical.split()
    name, sep, version = requirement.partition("==")
    if not (sep and name and version):
        raise ValueError(f"requirements.lock line {number}: {requirement!r} is not pinned with ==")
    hashes = []
    for option in options:
        algorithm, sep, digest = option.removeprefix("--hash=").partition(":")
        if not option.startswith("--hash=") or algorithm != "sha256" or not sep:
            raise ValueError(f"requirements.lock line {number}: unexpected {option!r}")
        hashes.append(digest)
    return Pin(name, version, hashes)


def render_lock(lines: Sequence[Line]) -> str:
    """The lock's text: each pin followed by its hashes, one per continuation line."""
    out = []
    for line in lines:
        if isinstance(line, str):
            out.append(line)
            continue
        parts = [line.spec] + [f"{_INDENT}--hash=sha256:{digest}" for digest in line.hashes]
        out.append(" \\\n".join(parts))
    return "\n".join(out) + "\n"


def _pip_download(args: List[str], dest: Path) -> Optional[Path]:
    """The one file ``pip download`` saved into the empty ``dest``, or None if it failed."""
    done = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", str(dest),
         *args],
        capture_output=True, text=True,
    )  # fmt: skip
    files = sorted(dest.iterdir())
    if done.returncode != 0 or len(files) != 1:
        return None
    return files[0]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def collect(pin: Pin, workdir: Path) -> Dict[str, str]:
    """{file name: sha256} of what each architecture would install for ``pin``.

    Raises RuntimeError when neither a wheel nor an sdist can be had for an architecture.
    """
    found: Dict[str, str] = {}
    sdist: Optional[Path] = None
    for arch in ARCHES:
        dest = workdir / f"{pin.name}-{arch}"
        dest.mkdir()
        wheel_args = ["--only-binary=:all:", "--implementation", "cp",
                      "--python-version", PYTHON_VERSION]  # fmt: skip
        for tag in platform_tags(arch):
            wheel_args += ["--platform", tag]
        got = _pip_download([*wheel_args, pin.spec], dest)
        if got is None:
            if sdist is None:
                sdist_dir = workdir / f"{pin.name}-sdist"
                sdist_dir.mkdir()
                sdist = _pip_download(["--no-binary=:all:", pin.spec], sdist_dir)
            if sdist is None:
                raise RuntimeError(f"{pin.spec}: neither a wheel for {arch} nor an sdist")
            print(f"{pin.spec}: no wheel for linux {arch}; hashed the sdist", file=sys.stderr)
            got = sdist
        found[got.name] = _sha256(got)
    return found


def relock(lock: Path, jobs: int) -> List[str]:
    """Rewrite ``lock`` with fresh hashes; returns one line per file hashed."""
    lines = parse_lock(lock.read_text())
    pins = [line for line in lines if isinstance(line, Pin)]
    with tempfile.TemporaryDirectory(prefix="lock-hashes-") as tmp:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            results = list(pool.map(lambda pin: collect(pin, Path(tmp)), pins))
    report = []
    for pin, files in zip(pins, results, strict=True):
        pin.hashes = sorted(set(files.values()))
        report += [f"{name}  sha256:{digest}" for name, digest in sorted(files.items())]
    # Through a temporary file, so a crash never leaves half a lock behind.
    fresh = lock.with_name(lock.name + ".new")
    fresh.write_text(render_lock(lines))
    fresh.replace(lock)
    return report


def main(argv: Optional[List[str]] = None) -> int:
    """Command line: rewrite the lock, list the files hashed on stdout."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lock", type=Path, default=DEFAULT_LOCK, help="the lock to rewrite")
    parser.add_argument("--jobs", type=int, default=4, help="downloads at once (default 4)")
    options = parser.parse_args(argv)
    try:
        report = relock(options.lock, options.jobs)
    except (ValueError, RuntimeError, OSError) as error:
        print(f"lock_hashes: {error}", file=sys.stderr)
        return 1
    print("\n".join(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
