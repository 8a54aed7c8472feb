"""The yara plugin: matches, load-time rule errors, timeouts, and dispatch by rule meta."""

from __future__ import annotations

import io
import zipfile

import pytest

from stoq import Payload, RequestMeta, Stoq, StoqPluginException

RULES = r"""
rule greeting : text friendly
{
    meta:
        author = "tests"
        score = 7
    strings:
        $hello = "hello"
        $bin = { 00 FF 5C 0A }
    condition:
        $hello or $bin
}

rule never_matches
{
    condition:
        false
}
"""

# Every byte of a run of "a"s starts a candidate match that then walks 2,000 bytes
# looking for a "b" that never comes: billions of steps on a few MiB.
SLOW_RULES = r"""
rule slow_regex
{
    strings:
        $slow = /aa[^b]{0,2000}b/
    condition:
        $slow
}
"""


@pytest.fixture
def rules_file(tmp_path):
    def write(text: str, name: str = "rules.yar") -> str:
        path = tmp_path / name
        path.write_text(text)
        return str(path)

    return write


def test_worker_reports_matches_with_strings_rendered_safely(load, rules_file):
    yara = load("yara", worker_rules=rules_file(RULES))
    content = b"say hello, then \x00\xff\\\n"
    response = yara.scan(Payload(content), RequestMeta())
    assert response.errors == []
    assert response.results == {
        "matches": [
            {
                "rule": "greeting",
                "namespace": "default",
                "tags": ["text", "friendly"],
                "meta": {"author": "tests", "score": 7},
                "strings": [
                    {"identifier": "$hello", "offset": 4, "length": 5, "data": "hello"},
                    {
                        "identifier": "$bin",
                        "offset": 16,
                        "length": 4,
                        "data": "\\x00\\xff\\x5c\\x0a",
                    },
                ],
            }
        ]
    }


def test_no_match_gives_an_empty_list(load, rules_file):
    yara = load("yara", worker_rules=rules_file(RULES))
    assert yara.scan(Payload(b"nothing"), RequestMeta()).results == {"matches": []}


def test_strings_are_capped(load, rules_file):
    yara = load("yara", worker_rules=rules_file(RULES), max_strings="3", max_string_bytes="2")
    response = yara.scan(Payload(b"hello " * 50), RequestMeta())
    strings = response.results["matches"][0]["strings"]
    assert [s["offset"] for s in strings] == [0, 6, 12]
    assert {s["data"] for s in strings} == {"he"}


def test_default_rules_label_an_elf_binary(load):
    with open("/bin/ls", "rb") as handle:
        response = load("yara").scan(Payload(handle.read()), RequestMeta())
    assert [m["rule"] for m in response.results["matches"]] == ["stoqd_elf_executable"]


def test_syntax_error_names_file_and_line_at_load(load, rules_file):
    path = rules_file('rule broken {\n  strings: $a = "x"\n  condition: $a and\n}\n', "bad.yar")
    with pytest.raises(StoqPluginException) as info:
        load("yara", worker_rules=path)
    assert str(info.value) == (
        f"plugin yara: option worker_rules: {path}(4): syntax error, unexpected '}}'"
    )


def test_missing_rules_file_is_rejected_at_load(load, tmp_path):
    with pytest.raises(StoqPluginException) as info:
        load("yara", dispatch_rules=str(tmp_path / "absent.yar"))
    assert str(info.value) == (
        f"plugin yara: option dispatch_rules: rules file {tmp_path / 'absent.yar'} does not exist"
    )


def test_bad_timeout_is_rejected_at_load(load):
    with pytest.raises(StoqPluginException) as info:
        load("yara", timeout="0")
    assert str(info.value) == (
        "plugin yara: option timeout='0' is not a valid positive_float: must be greater than 0"
    )


def test_timeout_becomes_an_error_in_the_result(rules_file):
    stoq = Stoq(
        always_dispatch=["yara", "hash"],
        plugin_opts={"yara": {"worker_rules": rules_file(SLOW_RULES), "timeout": "1"}},
    )
    response = stoq.scan(b"a" * (3 << 20))
    assert response.errors["yara"] == [
        "worker_rules: scan timed out after 1 s; no matches reported"
    ]
    workers = response.results[0].workers[0]
    assert "yara" not in workers
    assert "sha256" in workers["hash"]  # the other worker still ran


DISPATCH_RULES = r"""
rule zip_to_decompress
{
    meta:
        plugin = "decompress"
    condition:
        uint32(0) == 0x04034b50
}

rule everything_to_hash_and_mimetype
{
    meta:
        plugin = "Hash, mimetype"
    condition:
        true
}
"""


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def test_get_dispatches_names_workers_from_rule_meta(load, rules_file):
    yara = load("yara", dispatch_rules=rules_file(DISPATCH_RULES))
    response = yara.get_dispatches(Payload(_zip({"a": b"a"})), RequestMeta())
    assert response.plugin_names == ["decompress", "hash", "mimetype"]
    assert response.meta["decompress"]["rule"] == "zip_to_decompress"
    assert response.meta["hash"]["rule"] == "everything_to_hash_and_mimetype"
    plain = yara.get_dispatches(Payload(b"text"), RequestMeta())
    assert plain.plugin_names == ["hash", "mimetype"]


def test_default_dispatch_rules_route_a_zip_to_decompress():
    stoq = Stoq(dispatchers=["yara"])
    response = stoq.scan(_zip({"inner.txt": b"inside the zip"}))
    root, child = response.results
    assert root.plugins_run["workers"] == [["decompress"]]
    assert child.extracted_by == "decompress"
    assert child.extracted_from == root.payload_id
    assert child.payload_meta.extra_data["filename"] == "inner.txt"
    assert child.size == len(b"inside the zip")
    assert child.plugins_run["workers"] == [[]]  # plain text: no dispatch rule matched
    assert not response.errors
