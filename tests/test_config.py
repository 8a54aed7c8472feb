"""stoq.cfg validation: every message a user can get, asserted as they read it."""

from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path
from typing import Dict, List

import pytest

from stoqd import config
from stoqd.config import EX_CONFIG, ConfigError
from stoqd.framework.core import Stoq
from stoqd.framework.loader import ENTRY_POINT_GROUP

V2_PLUGINS = Path(__file__).resolve().parent / "fixtures" / "stoq_v2_plugins"
V2_NAMES = ["example_archiver", "example_connector", "example_provider", "example_worker"]


def known_listing(*extra: str) -> str:
    """The "(known plugins: ...)" text: installed entry points plus the given names."""
    names = {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)} | set(extra)
    return ", ".join(sorted(names))


def write_cfg(tmp_path: Path, text: str, name: str = "stoq.cfg") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def problems_of(path: Path) -> List[str]:
    with pytest.raises(ConfigError) as caught:
        config.load(path)
    return caught.value.problems


def check_problems(path: Path, plugin_dirs: List[Path] = ()) -> List[str]:
    stoq = Stoq(config_file=str(path), plugin_dir_list=[str(d) for d in plugin_dirs])
    with pytest.raises(ConfigError) as caught:
        stoq.check()
    return caught.value.problems


# -- reading the file -----------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.cfg"
    assert problems_of(missing) == [f"{missing}: configuration file not found"]


def test_directory_instead_of_file(tmp_path: Path) -> None:
    assert problems_of(tmp_path) == [
        f"{tmp_path}: cannot read configuration file: [Errno 21] Is a directory: '{tmp_path}'"
    ]


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "stoq.cfg"
    path.write_bytes(b"[core]\nconnectors = \xff\n")
    assert problems_of(path) == [
        f"{path}: cannot read configuration file: 'utf-8' codec can't decode byte 0xff "
        "in position 20: invalid start byte"
    ]


def test_no_section_header(tmp_path: Path) -> None:
    path = write_cfg(tmp_path, "connectors = stdout\n")
    assert problems_of(path) == [
        f"{path}: line 1: not a valid INI file: a key before any [section] header"
    ]


def test_duplicate_key(tmp_path: Path) -> None:
    path = write_cfg(tmp_path, "[core]\nmax_queue = 1\nmax_queue = 2\n")
    assert problems_of(path) == [
        f"{path}: not a valid INI file: While reading from '{path}' [line  3]: "
        "option 'max_queue' in section 'core' already exists"
    ]


# -- keys and values ------------------------------------------------------------------


def test_unknown_core_key_with_did_you_mean(tmp_path: Path) -> None:
    path = write_cfg(tmp_path, "[core]\nmax_recusion = 2\n")
    assert problems_of(path) == [
        f"{path}: [core] max_recusion: unknown key (did you mean max_recursion?)"
    ]


def test_unknown_key_without_a_close_match(tmp_path: Path) -> None:
    path = write_cfg(tmp_path, "[stoqd]\nzzz = 1\n")
    assert problems_of(path) == [f"{path}: [stoqd] zzz: unknown key"]


@pytest.mark.parametrize(
    ("section", "key", "raw", "message"),
    [
        (
            "core",
            "max_queue",
            "lots",
            "'lots' is not a whole number >= 0",
        ),
        ("core", "max_recursion", "-1", "'-1' is not a whole number >= 0: must be 0 or more"),
        (
            "stoqd",
            "graceful_timeout",
            "soon",
            "'soon' is not a number of seconds >= 0",
        ),
        (
            "stoqd",
            "autostart",
            "maybe",
            "'maybe' is not true or false: not a boolean: 'maybe' "
            "(use true/false, yes/no, on/off or 1/0)",
        ),
        (
            "core",
            "log_syntax",
            "yaml",
            "'yaml' is not auto, json or text: must be auto, json or text",
        ),
        (
            "stoqd",
            "control_group",
            "nosuchgroup",
            "'nosuchgroup' is not a group name: no group named 'nosuchgroup' on this host",
        ),
        (
            "core",
            "log_level",
            "LOUD",
            "'LOUD' is not a log level: must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL",
        ),
        ("core", "max_payload_size", "-5M", "'-5M' is not a size such as 100M: must be 0 or more"),
    ],
)
def test_bad_value_of_each_kind(
    tmp_path: Path, section: str, key: str, raw: str, message: str
) -> None:
    path = write_cfg(tmp_path, f"[{section}]\n{key} = {raw}\n")
    assert problems_of(path) == [f"{path}: [{section}] {key}: {message}"]


def test_good_values_of_each_kind(tmp_path: Path) -> None:
    path = write_cfg(
        tmp_path,
        "[core]\nmax_queue = 7\nmax_payload_size = 2M\nlog_level = debug\n"
        "connectors = a , b,\n[stoqd]\ngraceful_timeout = 2.5\nautostart = False\n",
    )
    loaded = config.load(path)
    assert loaded.get("core", "max_queue") == 7
    assert loaded.get("core", "max_payload_size") == 2 * 1024 * 1024
    assert loaded.get("core", "log_level") == "DEBUG"
    assert loaded.get("core", "connectors") == ["a", "b"]
    assert loaded.get("stoqd", "graceful_timeout") == 2.5
    assert loaded.get("stoqd", "autostart") is False


def test_unknown_provider_section_key(tmp_path: Path) -> None:
    path = write_cfg(tmp_path, "[stoqd:dirmon]\nstartsec = 3\nfoo = 1\n")
    allowed = "(allowed: startsecs, startretries, backoff_initial, backoff_max, autostart)"
    assert problems_of(path) == [
        f"{path}: [stoqd:dirmon] startsec: unknown key (did you mean startsecs?) {allowed}",
        f"{path}: [stoqd:dirmon] foo: unknown key {allowed}",
    ]


def test_many_problems_reported_together(tmp_path: Path) -> None:
    path = write_cfg(
        tmp_path,
        "[core]\nmax_queue = x\nconectors = stdout\n[stoqd]\nworkers = -2\n"
        "[stoqd:p]\nbackoff_max = never\n",
    )
    assert problems_of(path) == [
        f"{path}: [core] max_queue: 'x' is not a whole number >= 0",
        f"{path}: [core] conectors: unknown key (did you mean connectors?)",
        f"{path}: [stoqd] workers: '-2' is not a whole number >= 0: must be 0 or more",
        f"{path}: [stoqd:p] backoff_max: 'never' is not a number of seconds >= 0",
    ]


# -- plugins named by the file --------------------------------------------------------


def test_unknown_plugin_in_a_list(tmp_path: Path) -> None:
    path = write_cfg(
        tmp_path, "[core]\nconnectors = example_conector\nalways_dispatch = nothing_like_it\n"
    )
    listing = known_listing(*V2_NAMES)
    assert check_problems(path, [V2_PLUGINS]) == [
        f"{path}: [core] connectors: unknown plugin example_conector "
        f"(did you mean example_connector?) (known plugins: {listing})",
        f"{path}: [core] always_dispatch: unknown plugin nothing_like_it "
        f"(known plugins: {listing})",
    ]


def test_section_for_unknown_plugin(tmp_path: Path) -> None:
    path = write_cfg(
        tmp_path, "[example_workr]\ngreeting = hi\n[stoqd:example_providr]\nstartsecs = 2\n"
    )
    listing = known_listing(*V2_NAMES)
    assert check_problems(path, [V2_PLUGINS]) == [
        f"{path}: [example_workr]: no plugin named example_workr "
        f"(did you mean example_worker?) (known plugins: {listing})",
        f"{path}: [stoqd:example_providr]: no plugin named example_providr "
        f"(did you mean example_provider?) (known plugins: {listing})",
    ]


def test_plugin_dir_list_is_relative_to_the_file(tmp_path: Path, write_plugin) -> None:
    write_plugin(
        tmp_path / "plugins",
        "cfg_dir_worker",
        "from stoq.plugins import WorkerPlugin\n\n\nclass W(WorkerPlugin):\n    pass\n",
    )
    path = write_cfg(
        tmp_path, "[core]\nplugin_dir_list = plugins\nalways_dispatch = cfg_dir_worker\n"
    )
    stoq = Stoq(config_file=str(path))
    stoq.check()  # no ConfigError: the directory was found beside the file
    assert stoq.registry.spec("cfg_dir_worker").origin == str(
        tmp_path / "plugins" / "cfg_dir_worker" / "cfg_dir_worker.stoq"
    )


def test_valid_file_passes_check(tmp_path: Path) -> None:
    path = write_cfg(
        tmp_path,
        "[core]\nconnectors = example_connector\nproviders = example_provider\n"
        "[example_connector]\noutput_file = out.jsonl\n[stoqd:example_provider]\nstartsecs = 2\n",
    )
    Stoq(config_file=str(path), plugin_dir_list=[str(V2_PLUGINS)]).check()


# -- what the file gives the rest -----------------------------------------------------


def test_here_is_the_files_directory(tmp_path: Path) -> None:
    path = write_cfg(tmp_path, "[example_connector]\noutput_file = ${here}/results.jsonl\n")
    assert config.load(path).plugin_opts == {
        "example_connector": {"output_file": f"{tmp_path}/results.jsonl"}
    }


def test_stoq_v2_log_keys_are_ignored_with_a_note(tmp_path: Path) -> None:
    path = write_cfg(
        tmp_path, "[core]\nlog_dir = /var/log/stoq\nlog_maxbytes = 1500000\nlog_backup_count = 5\n"
    )
    loaded = config.load(path)
    assert loaded.ignored == [
        f"{path}: [core] log_dir: ignored; stoqd logs to stderr",
        f"{path}: [core] log_maxbytes: ignored; stoqd logs to stderr",
        f"{path}: [core] log_backup_count: ignored; stoqd logs to stderr",
    ]


def test_provider_overrides_via_supervision(tmp_path: Path) -> None:
    path = write_cfg(
        tmp_path,
        "[stoqd]\nstartsecs = 4\nbackoff_max = 10\n"
        "[stoqd:fragile]\nstartretries = 1\nbackoff_max = 60\nautostart = no\n",
    )
    loaded = config.load(path)
    assert loaded.supervision("fragile") == {
        "startsecs": 4.0,
        "startretries": 1,
        "backoff_initial": 0.25,
        "backoff_max": 60.0,
        "autostart": False,
    }
    assert loaded.supervision("steady") == {
        "startsecs": 4.0,
        "startretries": 5,
        "backoff_initial": 0.25,
        "backoff_max": 10.0,
        "autostart": True,
    }


def test_defaults_without_a_file() -> None:
    loaded = config.load(None)
    assert loaded.path is None
    assert loaded.get("core", "max_recursion") == 3
    assert loaded.get("core", "max_payload_size") == 256 * 1024 * 1024
    assert loaded.get("stoqd", "control_socket") == "var/run/stoqd.sock"


# -- booleans from every source --------------------------------------------------------

BOOL_READER = """\
from stoq import WorkerResponse
from stoq.plugins import WorkerPlugin


class BoolReader(WorkerPlugin):
    def __init__(self, config, plugin_opts):
        super().__init__(config, plugin_opts)
        self.enabled = self.option("enabled", kind=bool)

    def scan(self, payload, request_meta):
        return WorkerResponse({"enabled": self.enabled})
"""


@pytest.fixture
def bool_plugins(tmp_path: Path, write_plugin) -> Path:
    root = tmp_path / "plugins"
    write_plugin(root, "bool_reader", BOOL_READER, {"enabled": "False"})
    return root


def _enabled(cfg: Path | None, plugin_dir: Path, cli: Dict[str, str] | None = None) -> bool:
    stoq = Stoq(
        config_file=str(cfg) if cfg else None,
        plugin_dir_list=[str(plugin_dir)],
        plugin_opts={"bool_reader": cli} if cli else None,
    )
    return stoq.load_plugin("bool_reader").enabled


def test_false_from_the_stoq_file_is_false(bool_plugins: Path) -> None:
    assert _enabled(None, bool_plugins) is False


def test_false_from_stoq_cfg_is_false(tmp_path: Path, bool_plugins: Path) -> None:
    (bool_plugins / "bool_reader" / "bool_reader.stoq").write_text(
        "[Core]\nName = bool_reader\nModule = bool_reader\n[options]\nenabled = true\n"
    )
    assert _enabled(None, bool_plugins) is True
    cfg = write_cfg(tmp_path, "[bool_reader]\nenabled = False\n")
    assert _enabled(cfg, bool_plugins) is False


def test_false_from_plugin_opts_is_false(tmp_path: Path, bool_plugins: Path) -> None:
    cfg = write_cfg(tmp_path, "[bool_reader]\nenabled = yes\n")
    assert _enabled(cfg, bool_plugins) is True
    assert _enabled(cfg, bool_plugins, {"enabled": "False"}) is False
    assert _enabled(cfg, bool_plugins, {"enabled": "0"}) is False


def test_false_from_the_command_line_is_false(stoq_cmd, tmp_path: Path, bool_plugins: Path) -> None:
    cfg = write_cfg(tmp_path, "[bool_reader]\nenabled = on\n")
    common = ["--config-file", cfg, "--plugin-dir", bool_plugins, "-a", "bool_reader"]
    on = stoq_cmd("scan", "-", *common, stdin=b"x")
    assert '"enabled": true' in on.stdout
    off = stoq_cmd("scan", "-", *common, "--plugin-opts", "bool_reader:enabled=False", stdin=b"x")
    assert '"enabled": false' in off.stdout


def test_a_value_that_is_not_a_boolean_names_plugin_and_option(
    stoq_cmd, bool_plugins: Path
) -> None:
    done = stoq_cmd(
        "scan", "-", "--plugin-dir", bool_plugins, "-a", "bool_reader",
        "--plugin-opts", "bool_reader:enabled=sometimes", stdin=b"x",
    )  # fmt: skip
    assert (done.returncode, done.stdout) == (EX_CONFIG, "")
    assert done.stderr == (
        "stoq: plugin bool_reader: option enabled='sometimes' is not a valid bool: "
        "not a boolean: 'sometimes' (use true/false, yes/no, on/off or 1/0)\n"
    )


# -- through the command line ----------------------------------------------------------


def test_config_problems_exit_78_without_traceback(stoq_cmd, tmp_path: Path) -> None:
    cfg = write_cfg(tmp_path, "[core]\nmax_queue = x\nconectors = stdout\n")
    done = stoq_cmd("scan", "-", "--config-file", cfg, stdin=b"x")
    assert done.returncode == EX_CONFIG == 78
    assert done.stdout == ""
    assert done.stderr == (
        f"{cfg}: [core] max_queue: 'x' is not a whole number >= 0\n"
        f"{cfg}: [core] conectors: unknown key (did you mean connectors?)\n"
    )


def test_stoq_config_environment_variable(run_cmd, clean_env, tmp_path: Path) -> None:
    cfg = write_cfg(tmp_path, "[core]\nalways_dispatch = nope_plugin\n")
    done = run_cmd("stoq", "scan", "-", stdin=b"x", env=clean_env(STOQ_CONFIG=str(cfg)))
    assert done.returncode == 78
    assert done.stderr == (
        f"{cfg}: [core] always_dispatch: unknown plugin nope_plugin "
        f"(known plugins: {known_listing()})\n"
    )


def test_unparsable_lines_are_named_by_number(tmp_path: Path) -> None:
    path = write_cfg(tmp_path, "[core]\nconnectors = stdout\nthis is not a key\n")
    assert problems_of(path) == [
        f"{path}: line 3: not a valid INI file: cannot parse 'this is not a key'"
    ]


def test_a_size_that_is_not_a_number(tmp_path: Path) -> None:
    path = write_cfg(tmp_path, "[core]\nmax_payload_size = big\n")
    assert problems_of(path) == [
        f"{path}: [core] max_payload_size: 'big' is not a size such as 100M: "
        "expected a number with an optional K, M or G suffix"
    ]
