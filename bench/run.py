"""Run every benchmark script in bench/ (``bench_*.py``) and print their tables.

Each script runs in its own process with this interpreter, one after the other (they
would disturb each other's timings if run at once); its output is shown as it comes.
A script that fails does not stop the others; the exit code is 1 if any failed.

    .venv/bin/python bench/run.py                  # all of them (``make bench``)
    .venv/bin/python bench/run.py daemon dirs      # bench_daemon.py and bench_dirs.py
    .venv/bin/python bench/run.py -- --quick       # pass --quick to every script
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional, Tuple

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def scripts(names: List[str]) -> List[Path]:
    """The benchmark scripts present, all of them or the ones named (``daemon`` or file)."""
    found = sorted(HERE.glob("bench_*.py"))
    if not names:
        return found
    chosen = []
    for name in names:
        stem = Path(name).stem
        stem = stem if stem.startswith("bench_") else f"bench_{stem}"
        match = [path for path in found if path.stem == stem]
        if not match:
            known = ", ".join(path.stem.removeprefix("bench_") for path in found) or "none"
            raise SystemExit(f"bench/run.py: no benchmark {name} (present: {known})")
        chosen.extend(match)
    return chosen


def run(script: Path, extra: List[str]) -> Tuple[int, float]:
    """Run one script with its output streamed; its exit code and duration."""
    print(f"==> {script.relative_to(REPO)} {' '.join(extra)}".rstrip(), flush=True)
    started = time.monotonic()
    # The repository root as working directory, so relative paths in scripts behave
    # the same whether they are run from here or by hand from the root.
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    code = subprocess.call([sys.executable, str(script), *extra], cwd=REPO, env=env)
    took = time.monotonic() - started
    print(f"<== {script.name}: exit {code} in {took:.0f} s\n", flush=True)
    return code, took


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: List[str] = []
    if "--" in argv:  # everything after -- goes to each script
        extra = argv[argv.index("--") + 1 :]
        argv = argv[: argv.index("--")]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="benchmarks to run (default: all)")
    args = parser.parse_args(argv)
    chosen = scripts(args.names)
    if not chosen:
        print("bench/run.py: no bench_*.py script in bench/", file=sys.stderr)
        return 1
    summary = [(script.name, *run(script, extra)) for script in chosen]
    print("summary")
    for name, code, took in summary:
        print(f"  {name:<24} {'ok' if code == 0 else f'FAILED (exit {code})':<18} {took:6.0f} s")
    return 0 if all(code == 0 for _, code, _ in summary) else 1


if __name__ == "__main__":
    sys.exit(main())
