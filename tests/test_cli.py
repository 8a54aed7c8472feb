"""End-to-end ``stoq`` and ``stoqd`` runs: the real commands from the venv, in subprocesses,
asserting what a user sees on stdout, stderr and in the exit code."""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Dict

import pytest

from stoqd.cli import build_parser, plugin_opt
from stoqd.framework.loader import ENTRY_POINT_GROUP

V2_PLUGINS = Path(__file__).resolve().parent / "fixtures" / "stoq_v2_plugins"
LEVELS = "DEBUG, INFO, WARNING, ERROR, CRITICAL"
V2_NAMES = ["example_archiver", "example_connector", "example_provider", "example_worker"]
_HEAD = (
    "from stoq import DecoratorResponse, DispatcherResponse, ExtractedPayload, "
    "WorkerResponse\n"
    "from stoq.plugins import ConnectorPlugin, DecoratorPlugin, DispatcherPlugin, "
    "WorkerPlugin\n\n\n"
)
PLUGINS = {
    "cli_dispatcher": (
        "class Dispatcher(DispatcherPlugin):\n"
        "    def get_dispatches(self, payload, request_meta):\n"
        "        return DispatcherResponse(['example_worker'])\n"
    ),
    "cli_decorator": (
        "class Decorator(DecoratorPlugin):\n"
        "    def decorate(self, response):\n"
        "        return DecoratorResponse({'payloads': len(response.results)})\n"
    ),
    "cli_failing": (
        "class Failing(ConnectorPlugin):\n"
        "    def save(self, response):\n"
        "        raise OSError('disk full')\n"
    ),
    "cli_unwrap": (
        "class Unwrap(WorkerPlugin):\n"
        "    def scan(self, payload, request_meta):\n"
        "        self.log.info('unwrapping %d bytes', len(payload.content))\n"
        "        if payload.content.startswith(b'wrap:'):\n"
        "            return WorkerResponse(extracted=[ExtractedPayload(payload.content[5:])])\n"
        "        return None\n"
    ),
}


@pytest.fixture(scope="module")
def cli_plugins(tmp_path_factory: pytest.TempPathFactory, write_plugin) -> Path:
    root = tmp_path_factory.mktemp("cli_plugins")
    for name, body in PLUGINS.items():
        write_plugin(root, name, _HEAD + body)
    return root


def known_listing(*extra: str) -> str:
    names = {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)} | set(extra)
    return ", ".join(sorted(names))


def ok_json(done: Any) -> Dict[str, Any]:
    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    return json.loads(done.stdout)


# -- scanning a file or stdin ---------------------------------------------------------


def test_scan_file_prints_the_result_as_json(stoq_cmd, tmp_path: Path) -> None:
    sample = tmp_path / "sample.txt"
    sample.write_bytes(b"hello world")
    data = ok_json(stoq_cmd("scan", sample, "--plugin-dir", V2_PLUGINS, "-a", "example_worker"))
    assert list(data) == ["time", "results", "request_meta", "errors", "decorators", "scan_id"]
    [result] = data["results"]
    assert result["size"] == 11
    assert result["payload_meta"]["extra_data"] == {"filename": "sample.txt"}
    assert result["workers"] == [
        {
            "example_worker": {
                "greeting": "hello from the .stoq file",
                "length": 11,
                "sha1": hashlib.sha1(b"hello world").hexdigest(),
            }
        }
    ]
    assert data["request_meta"] == {"archive_payloads": True, "source": None, "extra_data": {}}


@pytest.mark.parametrize("file_args", [[], ["-"]])
def test_scan_stdin(stoq_cmd, file_args: list) -> None:
    done = stoq_cmd(
        "scan", *file_args, "--plugin-dir", V2_PLUGINS, "-a", "example_worker", stdin=b"abc"
    )
    [result] = ok_json(done)["results"]
    assert result["size"] == 3
    assert result["payload_meta"]["extra_data"] == {}
    assert result["workers"][0]["example_worker"]["length"] == 3


def test_flags_before_the_subcommand(stoq_cmd, cli_plugins: Path) -> None:
    done = stoq_cmd(
        "--plugin-dir", V2_PLUGINS, "--plugin-dir", cli_plugins, "--log-level", "WARNING",
        "scan", "-a", "example_worker", "cli_unwrap", stdin=b"ab",
    )  # fmt: skip
    workers = ok_json(done)["results"][0]["plugins_run"]["workers"]
    assert workers == [["example_worker", "cli_unwrap"]]


def test_empty_input_is_scanned(stoq_cmd) -> None:
    done = stoq_cmd("scan", "--plugin-dir", V2_PLUGINS, "-a", "example_worker", stdin=b"")
    assert ok_json(done)["results"][0]["size"] == 0


def test_hash_and_mimetype(stoq_cmd, tmp_path: Path) -> None:
    sample = tmp_path / "sample.txt"
    sample.write_bytes(b"plain text\n")
    [result] = ok_json(stoq_cmd("scan", sample, "-a", "hash", "mimetype"))["results"]
    assert result["plugins_run"]["workers"] == [["hash", "mimetype"]]
    assert result["workers"][0]["hash"]["sha256"] == hashlib.sha256(b"plain text\n").hexdigest()
    assert result["workers"][0]["hash"]["md5"] == hashlib.md5(b"plain text\n").hexdigest()
    assert result["workers"][0]["mimetype"]["mimetype"] == "text/plain"


def test_repeated_list_flags_add_up(stoq_cmd) -> None:
    done = stoq_cmd("scan", "-a", "hash", "-a", "mimetype", stdin=b"x")
    assert ok_json(done)["results"][0]["plugins_run"]["workers"] == [["hash", "mimetype"]]


# -- every plugin flag ------------------------------------------------------------------


def test_connector_saves_and_prints_nothing(stoq_cmd, tmp_path: Path) -> None:
    out = tmp_path / "results.jsonl"
    done = stoq_cmd(
        "scan", "--plugin-dir", V2_PLUGINS, "-a", "example_worker", "-C", "example_connector",
        "--plugin-opts", f"example_connector:output_file={out}", stdin=b"saved",
    )  # fmt: skip
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    [line] = out.read_text().splitlines()
    assert json.loads(line)["results"][0]["workers"][0]["example_worker"]["length"] == 5


def test_dispatcher_decorator_and_archiver_flags(stoq_cmd, tmp_path, cli_plugins) -> None:
    archive = tmp_path / "archive"
    archive.mkdir()
    done = stoq_cmd(
        "scan", "--plugin-dir", V2_PLUGINS, cli_plugins, "-R", "cli_dispatcher",
        "-D", "cli_decorator", "-A", "example_archiver", "-S", "example_archiver",
        "--plugin-opts", f"example_archiver:archive_dir={archive}", stdin=b"keep me",
    )  # fmt: skip
    data = ok_json(done)
    sha1 = hashlib.sha1(b"keep me").hexdigest()
    assert data["results"][0]["plugins_run"] == {
        "workers": [["example_worker"]],
        "archivers": ["example_archiver"],
    }
    assert data["results"][0]["archivers"] == {"example_archiver": {"sha1": sha1}}
    assert data["decorators"] == {"cli_decorator": {"payloads": 1}}
    assert (archive / sha1).read_bytes() == b"keep me"


def test_start_dispatch(stoq_cmd, cli_plugins) -> None:
    done = stoq_cmd(
        "scan", "--plugin-dir", V2_PLUGINS, cli_plugins, "-s", "example_worker",
        "-a", "cli_unwrap", "--log-level", "WARNING", stdin=b"wrap:inner",
    )  # fmt: skip
    data = ok_json(done)
    assert [r["plugins_run"]["workers"] for r in data["results"]] == [
        [["example_worker", "cli_unwrap"]],
        [["cli_unwrap"]],
    ]


def test_plugin_opts_values_may_hold_colons_and_equals(stoq_cmd) -> None:
    done = stoq_cmd(
        "scan", "--plugin-dir", V2_PLUGINS, "-a", "example_worker",
        "--plugin-opts", "example_worker:greeting=url=http://h:8080/?a=b", stdin=b"x",
    )  # fmt: skip
    greeting = ok_json(done)["results"][0]["workers"][0]["example_worker"]["greeting"]
    assert greeting == "url=http://h:8080/?a=b"


def test_plugin_opts_split_on_first_colon_and_equals() -> None:
    assert plugin_opt("w:k=a:b=c") == ("w", "k", "a:b=c")
    assert plugin_opt("w:k=") == ("w", "k", "")


def test_plugin_opts_win_over_stoq_cfg(stoq_cmd, tmp_path: Path) -> None:
    cfg = tmp_path / "stoq.cfg"
    cfg.write_text("[core]\nalways_dispatch = example_worker\n[example_worker]\ngreeting = cfg\n")
    common = ["scan", "--config-file", cfg, "--plugin-dir", V2_PLUGINS]
    from_cfg = ok_json(stoq_cmd(*common, stdin=b"x"))
    assert from_cfg["results"][0]["workers"][0]["example_worker"]["greeting"] == "cfg"
    opts = ["--plugin-opts", "example_worker:greeting=cli"]
    from_cli = ok_json(stoq_cmd(*common, *opts, stdin=b"x"))
    assert from_cli["results"][0]["workers"][0]["example_worker"]["greeting"] == "cli"


def test_request_source_and_extra(stoq_cmd) -> None:
    done = stoq_cmd(
        "scan", "--request-source", "analyst", "--request-extra", "case=42", "query=a=b",
        "--request-extra", "note=x:y", stdin=b"x",
    )  # fmt: skip
    assert ok_json(done)["request_meta"] == {
        "archive_payloads": True,
        "source": "analyst",
        "extra_data": {"case": "42", "query": "a=b", "note": "x:y"},
    }


def test_max_recursion_from_the_command_line_wins_over_the_file(
    stoq_cmd, tmp_path: Path, cli_plugins: Path
) -> None:
    cfg = tmp_path / "stoq.cfg"
    cfg.write_text("[core]\nmax_recursion = 5\nlog_level = WARNING\n")
    common = ["scan", "--config-file", cfg, "--plugin-dir", cli_plugins, "-a", "cli_unwrap"]
    deep = ok_json(stoq_cmd(*common, stdin=b"wrap:wrap:x"))
    assert len(deep["results"]) == 3
    shallow = ok_json(stoq_cmd(*common, "--max-recursion", "1", stdin=b"wrap:wrap:x"))
    assert len(shallow["results"]) == 2
    [error] = shallow["errors"]["stoq"]
    assert error.endswith("extracted by cli_unwrap not scanned: max_recursion 1 reached")


def test_log_level_controls_plugin_log_lines(stoq_cmd, cli_plugins: Path) -> None:
    common = ["scan", "--plugin-dir", cli_plugins, "-a", "cli_unwrap"]
    chatty = stoq_cmd(*common, "--log-level", "info", stdin=b"abc")
    assert chatty.returncode == 0
    assert "unwrapping 3 bytes" in chatty.stderr
    quiet = stoq_cmd(*common, "--log-level", "WARNING", stdin=b"abc")
    assert (quiet.returncode, quiet.stderr) == (0, "")


# -- errors a user can make -----------------------------------------------------------


def test_unknown_plugin(stoq_cmd) -> None:
    done = stoq_cmd("scan", "--plugin-dir", V2_PLUGINS, "-a", "example_workr", stdin=b"x")
    assert (done.returncode, done.stdout) == (78, "")
    assert done.stderr == (
        "stoq: -a/--always-dispatch: unknown plugin example_workr (did you mean "
        f"example_worker?) (known plugins: {known_listing(*V2_NAMES)})\n"
    )


def test_unknown_plugins_in_several_flags_reported_together(stoq_cmd) -> None:
    done = stoq_cmd("scan", "-C", "jsonn", "-S", "zzz", "--plugin-opts", "hsah:x=1", stdin=b"x")
    listing = known_listing()
    assert done.returncode == 78
    assert done.stderr == (
        f"stoq: -S/--source-archivers: unknown plugin zzz (known plugins: {listing})\n"
        "stoq: -C/--connectors: unknown plugin jsonn (did you mean jsonl?) "
        f"(known plugins: {listing})\n"
        "stoq: --plugin-opts: unknown plugin hsah (did you mean hash?) "
        f"(known plugins: {listing})\n"
    )


def test_file_swallowed_by_a_list_flag_gets_a_hint(stoq_cmd, tmp_path: Path) -> None:
    sample = tmp_path / "sample.bin"
    sample.write_bytes(b"x")
    done = stoq_cmd("scan", "-a", "hash", str(sample))
    assert done.returncode == 78
    assert done.stderr == (
        f"stoq: -a/--always-dispatch: unknown plugin {sample} (known plugins: "
        f"{known_listing()}); a file? put FILE right after 'scan', before the plugin flags\n"
    )


def test_missing_file(stoq_cmd, tmp_path: Path) -> None:
    done = stoq_cmd("scan", tmp_path / "nope.bin", "-a", "hash")
    assert (done.returncode, done.stdout) == (66, "")
    assert done.stderr == f"stoq: cannot read {tmp_path / 'nope.bin'}: No such file or directory\n"


def test_directory_as_file(stoq_cmd, tmp_path: Path) -> None:
    done = stoq_cmd("scan", tmp_path)
    assert (done.returncode, done.stderr) == (66, f"stoq: cannot read {tmp_path}: Is a directory\n")


def test_input_over_max_payload_size(stoq_cmd, tmp_path: Path) -> None:
    cfg = tmp_path / "stoq.cfg"
    cfg.write_text("[core]\nmax_payload_size = 10\n")
    big = tmp_path / "big.bin"
    big.write_bytes(b"x" * 11)
    done = stoq_cmd("scan", big, "--config-file", cfg)
    assert (done.returncode, done.stdout) == (65, "")
    assert done.stderr == f"stoq: {big}: 11 bytes exceeds max_payload_size 10\n"
    done = stoq_cmd("scan", "--config-file", cfg, stdin=b"x" * 11)
    assert (done.returncode, done.stderr) == (
        65,
        "stoq: stdin: more than max_payload_size 10 bytes\n",
    )
    assert (
        ok_json(stoq_cmd("scan", "--config-file", cfg, stdin=b"x" * 10))["results"][0]["size"] == 10
    )
    # A device has no size to check first: it is read up to the limit, then refused.
    done = stoq_cmd("scan", "/dev/zero", "--config-file", cfg)
    assert (done.returncode, done.stderr) == (
        65,
        "stoq: /dev/zero: more than max_payload_size 10 bytes\n",
    )


def test_a_fifo_is_read_like_a_pipe(stoq_cmd, tmp_path: Path) -> None:
    """As with `stoq scan <(command)`: the writer may come later; its bytes are the payload."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)

    def write_later() -> None:
        time.sleep(0.5)
        fifo.write_bytes(b"from a pipe")

    writer = threading.Thread(target=write_later, daemon=True)
    writer.start()
    result = ok_json(stoq_cmd("scan", fifo, "-a", "hash", timeout=20))["results"][0]
    writer.join(timeout=20)
    assert result["workers"][0]["hash"]["sha1"] == hashlib.sha1(b"from a pipe").hexdigest()


def test_no_input_on_a_terminal(tmp_path: Path, clean_env) -> None:
    import subprocess
    import sys

    controller, terminal = os.openpty()
    try:
        done = subprocess.run(
            [str(Path(sys.executable).parent / "stoq"), "scan"],
            stdin=terminal,
            capture_output=True,
            env=clean_env(),
            cwd=tmp_path,
            timeout=60,
        )
    finally:
        os.close(terminal)
        os.close(controller)
    assert done.returncode == 64
    assert done.stderr == b"stoq: nothing to scan: give FILE, or pipe data on stdin\n"


def test_plugin_that_rejects_its_options(stoq_cmd) -> None:
    done = stoq_cmd("scan", "--plugin-dir", V2_PLUGINS, "-C", "example_connector", stdin=b"x")
    assert (done.returncode, done.stdout) == (78, "")
    assert done.stderr == "stoq: plugin example_connector: option output_file is required\n"


def test_missing_plugin_dir(stoq_cmd, tmp_path: Path) -> None:
    done = stoq_cmd("scan", "--plugin-dir", tmp_path / "gone", stdin=b"x")
    assert (done.returncode, done.stdout) == (78, "")
    assert done.stderr == f"stoq: plugin directory {tmp_path / 'gone'} does not exist\n"


def test_missing_config_file(stoq_cmd) -> None:
    done = stoq_cmd("scan", "--config-file", "missing.cfg", stdin=b"x")
    assert (done.returncode, done.stderr) == (78, "missing.cfg: configuration file not found\n")


def test_failing_connector_exits_1_with_one_line(stoq_cmd, tmp_path, cli_plugins) -> None:
    out = tmp_path / "out.jsonl"
    done = stoq_cmd(
        "scan", "--plugin-dir", V2_PLUGINS, cli_plugins, "-C", "cli_failing", "example_connector",
        "--plugin-opts", f"example_connector:output_file={out}", stdin=b"x",
    )  # fmt: skip
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == "stoq: connector cli_failing failed: OSError: disk full\n"
    assert len(out.read_text().splitlines()) == 1  # the other connector still saved


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--plugin-opts", "hash"], "argument --plugin-opts: 'hash' is not NAME:KEY=VALUE"),
        (["--plugin-opts", "h:a"], "argument --plugin-opts: 'h:a' is not NAME:KEY=VALUE"),
        (["--request-extra", "novalue"], "argument --request-extra: 'novalue' is not KEY=VALUE"),
        (["--max-recursion", "-1"], "argument --max-recursion: '-1' must be 0 or more"),
        (["--max-recursion", "deep"], "argument --max-recursion: 'deep' is not a whole number"),
        (["--log-level", "loud"], "argument --log-level: 'loud' is not one of " + LEVELS),
    ],
)  # fmt: skip
def test_malformed_flags(stoq_cmd, args: list, message: str) -> None:
    done = stoq_cmd("scan", *args, stdin=b"x")
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1] == f"stoq scan: error: {message}"


def test_help_documents_the_config_default(stoq_cmd) -> None:
    done = stoq_cmd("--help")
    assert done.returncode == 0
    assert "--config-file FILE, else $STOQ_CONFIG when set, else built-in defaults" in done.stdout


# -- stoq list ------------------------------------------------------------------------


def test_list_shows_the_v2_plugins(stoq_cmd) -> None:
    done = stoq_cmd("list", "--plugin-dir", V2_PLUGINS)
    assert done.returncode == 0
    rows = [re.split(r"\s{2,}", line, maxsplit=2) for line in done.stdout.splitlines()]
    assert rows[0] == ["NAME", "KIND", "DESCRIPTION"]
    table = {row[0]: row[1:] for row in rows[1:]}
    assert table["example_worker"] == ["worker", "Greets every payload and measures it"]
    assert table["example_connector"] == [
        "connector",
        "Appends each result as one JSON line to a file",
    ]
    assert table["example_archiver"] == [
        "archiver",
        "Stores payloads in a directory by SHA1 and reads them back",
    ]
    assert table["example_provider"] == ["provider", "Puts one payload"]
    assert table["hash"][0] == "worker"
    assert sorted(table) == sorted(known_listing(*V2_NAMES).split(", "))


def test_list_json(stoq_cmd) -> None:
    done = stoq_cmd("list", "--json", "--plugin-dir", V2_PLUGINS)
    listing = json.loads(done.stdout)
    assert listing["example_provider"] == {
        "kind": "provider",
        "description": "Puts one payload",
        "origin": str(V2_PLUGINS / "example_provider" / "example_provider.stoq"),
    }
    assert listing["hash"]["origin"] == "entry point stoqd.builtin.hash"


def test_list_shows_why_a_plugin_cannot_load(stoq_cmd, tmp_path: Path, write_plugin) -> None:
    write_plugin(tmp_path / "p", "cli_broken", "raise ImportError('needs libfoo')\n")
    done = stoq_cmd("list", "--plugin-dir", tmp_path / "p")
    [line] = [line for line in done.stdout.splitlines() if line.startswith("cli_broken")]
    origin = tmp_path / "p" / "cli_broken" / "cli_broken.stoq"
    assert re.split(r"\s{2,}", line, maxsplit=2) == [
        "cli_broken",
        "unloadable",
        f"plugin cli_broken: cannot import {origin}: ImportError: needs libfoo",
    ]


# -- stoq run -------------------------------------------------------------------------


def test_run_parses_providers_both_ways() -> None:
    args = build_parser().parse_args(["run", "-P", "a", "b", "-P", "c", "-a", "hash"])
    assert args.providers == ["a", "b", "c"]
    assert args.always_dispatch == ["hash"]


def test_run_the_seed_provider(stoq_cmd, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    done = stoq_cmd(
        "run", "-P", "example_provider", "-a", "example_worker", "-C", "example_connector",
        "--plugin-dir", V2_PLUGINS, "--plugin-opts", f"example_connector:output_file={out}",
        "--request-source", "seed", "--log-level", "WARNING",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    [line] = out.read_text().splitlines()
    data = json.loads(line)
    assert data["request_meta"]["source"] == "seed"
    [result] = data["results"]
    assert result["size"] == len(b"This is a payload")
    assert result["workers"][0]["example_worker"]["length"] == 17


def test_run_unknown_provider(stoq_cmd) -> None:
    done = stoq_cmd("run", "-P", "dirmn")
    assert done.returncode == 78
    assert done.stderr == (
        "stoq: -P/--providers: unknown plugin dirmn (did you mean dirmon?) "
        f"(known plugins: {known_listing()})\n"
    )


def test_run_without_providers(stoq_cmd) -> None:
    done = stoq_cmd("run")
    assert (done.returncode, done.stderr) == (
        64,
        "stoq: nothing to run: give -P NAME or set [core] providers\n",
    )


# -- stoqd ----------------------------------------------------------------------------


def test_stoqd_check_config_ok(run_cmd, tmp_path: Path) -> None:
    cfg = tmp_path / "stoq.cfg"
    cfg.write_text(
        f"[core]\nproviders = example_provider\nconnectors = example_connector\n"
        f"plugin_dir_list = {V2_PLUGINS}\nlog_dir = /var/log/stoq\n"
        "[example_connector]\noutput_file = ${here}/out.jsonl\n"
    )
    done = run_cmd("stoqd", "-c", cfg, "--check-config")
    assert (done.returncode, done.stdout) == (0, "configuration OK\n")
    assert done.stderr == f"{cfg}: [core] log_dir: ignored; stoqd logs to stderr\n"


def test_stoqd_check_config_problems(run_cmd, tmp_path: Path) -> None:
    cfg = tmp_path / "stoq.cfg"
    cfg.write_text("[core]\nproviders = dirmn\n[stoqd]\nworker = 2\n")
    done = run_cmd("stoqd", "--config", cfg, "--check-config")
    assert (done.returncode, done.stdout) == (78, "")
    assert done.stderr == f"{cfg}: [stoqd] worker: unknown key (did you mean workers?)\n"
    cfg.write_text("[core]\nproviders = dirmn\n")
    done = run_cmd("stoqd", "--config", cfg, "--check-config")
    assert done.stderr == (
        f"{cfg}: [core] providers: unknown plugin dirmn (did you mean dirmon?) "
        f"(known plugins: {known_listing()})\n"
    )


def test_stoqd_check_config_needs_a_provider(run_cmd, tmp_path: Path) -> None:
    cfg = tmp_path / "stoq.cfg"
    cfg.write_text("[core]\nconnectors = stdout\n")
    done = run_cmd("stoqd", "-c", cfg, "--check-config")
    assert (done.returncode, done.stdout) == (78, "")
    assert done.stderr == f"{cfg}: [core] providers: no provider configured\n"


def test_stoqd_check_config_loads_plugins(run_cmd, tmp_path: Path) -> None:
    cfg = tmp_path / "stoq.cfg"
    cfg.write_text(
        f"[core]\nproviders = example_provider\nconnectors = example_connector\n"
        f"plugin_dir_list = {V2_PLUGINS}\n"
    )
    done = run_cmd("stoqd", "-c", cfg, "--check-config")
    assert (done.returncode, done.stdout) == (78, "")
    assert done.stderr == f"{cfg}: plugin example_connector: option output_file is required\n"


def test_stoqd_reports_every_plugin_problem_naming_file_and_section(
    run_cmd, tmp_path: Path
) -> None:
    """Checked before anything runs, all at once: a misspelt key, a bad value, and a key
    no plugin reads (a warning: a stoQ v2 plugin may read its options later)."""
    cfg = tmp_path / "stoq.cfg"
    cfg.write_text(
        "[core]\nproviders = dirscan\nconnectors = jsonl\nalways_dispatch = hash\n"
        "[dirscan]\nsource_dir = /tmp\n"
        "[hash]\nalgorithms = md5, bogus\n"
        "[jsonl]\noutput_file = /dev/null\nfsynk = true\ncolour = blue\n"
    )
    errors = [
        f"{cfg}: [jsonl] fsynk: not an option of plugin jsonl (did you mean fsync?)",
        f"{cfg}: [hash] option algorithms: unknown algorithm 'bogus' (choose from ",
    ]
    unread = f"{cfg}: [jsonl] colour: plugin jsonl did not read this option (its options: "
    check = run_cmd("stoqd", "-c", cfg, "--check-config")
    assert (check.returncode, check.stdout) == (78, "")
    lines = check.stderr.splitlines()
    assert [line[: len(want)] for line, want in zip(lines[1:], errors, strict=True)] == errors
    assert lines[0].startswith(f"warning: {unread}")
    daemon = run_cmd("stoqd", "-c", cfg)  # the daemon's own start-up: the same, then 78
    assert daemon.returncode == 78
    plain = [line for line in daemon.stderr.splitlines() if not line.startswith("{")]
    assert [line[: len(want)] for line, want in zip(plain, errors, strict=True)] == errors
    logged = [json.loads(line) for line in daemon.stderr.splitlines() if line.startswith("{")]
    assert [e["detail"][: len(unread)] for e in logged if e["event"] == "config_unread_option"] == [
        unread
    ]


def test_a_misspelt_provider_option_makes_it_fatal_at_once_and_exits_78(
    run_cmd, tmp_path: Path
) -> None:
    cfg = tmp_path / "stoq.cfg"
    cfg.write_text(
        f"[core]\nproviders = dirscan\n[dirscan]\nsource_dir = {tmp_path}\nactoin = delete\n"
        "[stoqd]\ncontrol_socket = run/s.sock\n"
    )
    done = run_cmd("stoqd", "-c", cfg)
    assert done.returncode == 78, done.stderr
    events = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    fatal = [e for e in events if e["event"] == "fatal"]
    assert [(e["provider"], e["error"]) for e in fatal] == [
        (
            "dirscan",
            f"StoqPluginException: {cfg}: [dirscan] actoin: not an option of plugin dirscan "
            "(did you mean action?)",
        )
    ]
    assert not [e for e in events if e["event"] == "backoff"]  # not a restart loop


def test_a_near_miss_key_of_a_stoq_v2_plugin_is_only_a_warning(run_cmd, tmp_path: Path) -> None:
    """A v2 plugin reads plugin_opts directly, maybe later: stoqd cannot know its keys."""
    cfg = tmp_path / "stoq.cfg"
    cfg.write_text(
        f"[core]\nproviders = example_provider\nconnectors = example_connector\n"
        f"plugin_dir_list = {V2_PLUGINS}\n"
        f"[example_connector]\noutput_file = {tmp_path / 'r.jsonl'}\noutput_fil = x\n"
    )
    done = run_cmd("stoqd", "-c", cfg, "--check-config")
    assert (done.returncode, done.stdout) == (0, "configuration OK\n")
    assert done.stderr == (
        f"warning: {cfg}: [example_connector] output_fil: plugin example_connector did not "
        "read this option (its options: output_file; did you mean output_file?)\n"
    )


def test_check_config_reports_a_misspelt_provider_option(run_cmd, tmp_path: Path) -> None:
    cfg = tmp_path / "stoq.cfg"
    cfg.write_text("[core]\nproviders = dirscan\n[dirscan]\nsource_dir = /tmp\nactoin = delete\n")
    done = run_cmd("stoqd", "-c", cfg, "--check-config")
    assert (done.returncode, done.stdout) == (78, "")
    assert done.stderr == (
        f"{cfg}: [dirscan] actoin: not an option of plugin dirscan (did you mean action?)\n"
    )


def test_stoqd_config_default_comes_from_the_environment(run_cmd, clean_env, tmp_path) -> None:
    missing = tmp_path / "etc" / "stoq.cfg"
    done = run_cmd("stoqd", "--check-config", env=clean_env(STOQ_CONFIG=str(missing)))
    assert (done.returncode, done.stderr) == (78, f"{missing}: configuration file not found\n")


@pytest.mark.skipif(Path("/etc/stoqd/stoq.cfg").exists(), reason="a real /etc/stoqd is here")
def test_stoqd_config_default_is_etc(run_cmd) -> None:
    done = run_cmd("stoqd", "--check-config")
    assert (done.returncode, done.stderr) == (
        78,
        "/etc/stoqd/stoq.cfg: configuration file not found\n",
    )


def test_stoqd_runs_the_seed_provider_until_exhausted(run_cmd, tmp_path: Path) -> None:
    cfg = tmp_path / "stoq.cfg"
    cfg.write_text(
        f"[core]\nproviders = example_provider\nconnectors = example_connector\n"
        f"always_dispatch = hash\nplugin_dir_list = {V2_PLUGINS}\nlog_level = WARNING\n"
        "[stoqd]\nworkers = 1\n"
        "[example_connector]\noutput_file = ${here}/out.jsonl\n"
    )
    done = run_cmd("stoqd", "-c", cfg)
    assert done.returncode == 0, done.stderr
    [line] = (tmp_path / "out.jsonl").read_text().splitlines()
    [result] = json.loads(line)["results"]
    expected = hashlib.sha256(b"This is a payload").hexdigest()
    assert result["workers"][0]["hash"]["sha256"] == expected
