"""The stoQ-compatible framework in-process: data classes, options, dispatch, recursion,
archivers, decorators, connectors, references. Real plugins loaded from real directories."""

from __future__ import annotations

import dataclasses
import datetime
import enum
import gc
import json
import uuid
from pathlib import Path
from typing import Any, Dict, List

import pytest

from stoq import (
    ExtractedPayload,
    Payload,
    PayloadMeta,
    RequestMeta,
    Stoq,
    StoqException,
    StoqPluginException,
    WorkerResponse,
)
from stoq.helpers import dumps, get_sha1
from stoqd.framework.data import PayloadResults, StoqResponse, new_errors
from stoqd.framework.helpers import _to_jsonable, compact_json
from stoqd.framework.loader import PluginRegistry

V2_PLUGINS = Path(__file__).resolve().parent / "fixtures" / "stoq_v2_plugins"

# Test plugins, each a real plugin file (module names are per process: keep them unique).
_HEAD = (
    "from stoq import ArchiverResponse, DecoratorResponse, DispatcherResponse, "
    "ExtractedPayload, Payload, PayloadMeta, WorkerResponse\n"
    "from stoq.plugins import ArchiverPlugin, ConnectorPlugin, DecoratorPlugin, "
    "DispatcherPlugin, WorkerPlugin\n\n\n"
)
PLUGINS: Dict[str, tuple] = {
    "fw_echo": (
        "class Echo(WorkerPlugin):\n"
        "    def scan(self, payload, request_meta):\n"
        "        return WorkerResponse({'size': len(payload.content)})\n",
        {},
    ),
    "fw_second": (
        "class Second(WorkerPlugin):\n"
        "    def scan(self, payload, request_meta):\n"
        "        return WorkerResponse({'second': True})\n",
        {},
    ),
    "fw_unwrap": (
        "class Unwrap(WorkerPlugin):\n"
        "    def scan(self, payload, request_meta):\n"
        "        if payload.content.startswith(b'wrap:'):\n"
        "            return WorkerResponse(extracted=[ExtractedPayload(payload.content[5:])])\n"
        "        return None\n",
        {},
    ),
    "fw_split": (
        "class Split(WorkerPlugin):\n"
        "    def scan(self, payload, request_meta):\n"
        "        parts = payload.content.split(b',')\n"
        "        return WorkerResponse({'parts': len(parts)},\n"
        "                              extracted=[ExtractedPayload(p) for p in parts])\n",
        {},
    ),
    "fw_raises": (
        "class Raises(WorkerPlugin):\n"
        "    def scan(self, payload, request_meta):\n"
        "        raise RuntimeError('boom\\nsecond line')\n",
        {},
    ),
    "fw_wrong_type": (
        "class WrongType(WorkerPlugin):\n"
        "    def scan(self, payload, request_meta):\n"
        "        return {'not': 'a WorkerResponse'}\n",
        {},
    ),
    "fw_bad_extract": (
        "class BadExtract(WorkerPlugin):\n"
        "    def scan(self, payload, request_meta):\n"
        "        return WorkerResponse({'ok': 1}, extracted=['text, not a payload'],\n"
        "                              errors=['partly failed'])\n",
        {},
    ),
    "fw_requires": (
        "class Requires(WorkerPlugin):\n"
        "    def scan(self, payload, request_meta):\n"
        "        ran = [n for n in payload.plugins_run['workers'][0] if n != 'fw_requires']\n"
        "        return WorkerResponse({'ran_before': ran})\n",
        {"required_workers": "fw_echo"},
    ),
    "fw_option": (
        "class Option(WorkerPlugin):\n"
        "    def __init__(self, config, plugin_opts):\n"
        "        super().__init__(config, plugin_opts)\n"
        "        self.greeting = self.option('greeting')\n"
        "        self.tries = self.option('tries', default=1, kind=int)\n",
        {"greeting": "from the .stoq file"},
    ),
    "fw_dispatcher": (
        "class Dispatcher(DispatcherPlugin):\n"
        "    def get_dispatches(self, payload, request_meta):\n"
        "        names = self.option('send_to', default=[], kind=list)\n"
        "        return DispatcherResponse(names, errors=['dispatcher note'])\n",
        {},
    ),
    "fw_chain": (
        "class Chain(DispatcherPlugin):\n"
        "    def get_dispatches(self, payload, request_meta):\n"
        "        ran = [n for run in payload.plugins_run['workers'] for n in run]\n"
        "        if 'fw_echo' not in ran:\n"
        "            return DispatcherResponse(['fw_echo'])\n"
        "        if 'fw_second' not in ran:\n"
        "            return DispatcherResponse(['fw_second'])\n"
        "        return DispatcherResponse()\n",
        {},
    ),
    "fw_archiver": (
        "class Archiver(ArchiverPlugin):\n"
        "    def archive(self, payload, request_meta):\n"
        "        return ArchiverResponse({'stored': len(payload.content)})\n"
        "    def get(self, task):\n"
        "        if task.results.get('id') == 'missing':\n"
        "            return None\n"
        "        what = task.results.get('id') or task.results.get('path')\n"
        "        return Payload(('content of ' + what).encode())\n",
        {},
    ),
    "fw_decorator": (
        "class Decorator(DecoratorPlugin):\n"
        "    def decorate(self, response):\n"
        "        return DecoratorResponse({'payloads': len(response.results)})\n",
        {},
    ),
    "fw_failing_connector": (
        "class Failing(ConnectorPlugin):\n"
        "    def save(self, response):\n"
        "        raise OSError('disk full')\n",
        {},
    ),
}


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory: pytest.TempPathFactory, write_plugin) -> Path:
    root = tmp_path_factory.mktemp("fw_plugins")
    for name, (body, options) in PLUGINS.items():
        write_plugin(root, name, _HEAD + body, options)
    return root


@pytest.fixture
def make(plugin_dir: Path):
    def build(**kwargs: Any) -> Stoq:
        dirs = kwargs.pop("plugin_dir_list", [])
        return Stoq(plugin_dir_list=[str(plugin_dir), str(V2_PLUGINS), *dirs], **kwargs)

    return build


def as_json(response: Any) -> Dict[str, Any]:
    return json.loads(str(response))


def workers_of(response: Any, index: int = 0) -> List[Dict[str, Any]]:
    return as_json(response)["results"][index]["workers"]


# -- data classes and their JSON ------------------------------------------------------


def test_scan_and_payload_ids_are_random_version_4_uuids_as_text(make) -> None:
    response = make(always_dispatch=["fw_echo"]).scan_payload(Payload(b"abc"))
    ids = [response.scan_id, response.results[0].payload_id, Payload(b"x").payload_id]
    for text in ids:
        parsed = uuid.UUID(text)
        assert (str(parsed), parsed.version, parsed.variant) == (text, 4, uuid.RFC_4122)
    many = {Payload(b"").payload_id for _ in range(10_000)}
    assert len(many) == 10_000
    # Every bit but the six fixed ones varies.
    bits = [uuid.UUID(text).int for text in many]
    varying = 0
    for value in bits[1:]:
        varying |= value ^ bits[0]
    assert bin(varying).count("1") == 122


def test_response_json_has_exactly_stoq_v2_keys(make) -> None:
    response = make(always_dispatch=["fw_echo"]).scan_payload(Payload(b"abc"))
    data = as_json(response)
    assert list(data) == ["time", "results", "request_meta", "errors", "decorators", "scan_id"]
    assert list(data["results"][0]) == [
        "payload_id",
        "size",
        "payload_meta",
        "workers",
        "plugins_run",
        "extracted_from",
        "extracted_by",
        "archivers",
    ]
    assert list(data["results"][0]["payload_meta"]) == [
        "should_archive",
        "extra_data",
        "dispatch_to",
    ]
    assert list(data["request_meta"]) == ["archive_payloads", "source", "extra_data"]
    assert data["results"][0]["workers"] == [{"fw_echo": {"size": 3}}]
    assert data["results"][0]["plugins_run"] == {"workers": [["fw_echo"]], "archivers": []}
    assert data["results"][0]["size"] == 3
    assert data["errors"] == {}


def test_data_class_defaults() -> None:
    payload = Payload(b"x")
    assert (payload.extracted_by, payload.extracted_from) == (None, None)
    assert len(payload.payload_id) == 36
    meta = PayloadMeta()
    assert (meta.should_archive, meta.extra_data, meta.dispatch_to) == (True, {}, [])
    request = RequestMeta()
    assert (request.archive_payloads, request.source, request.extra_data) == (True, None, {})
    worker = WorkerResponse()
    assert (worker.results, worker.extracted, worker.errors) == (None, [], [])
    assert ExtractedPayload(b"y").payload_meta.dispatch_to == []


def test_dumps_turns_plugin_values_into_json() -> None:
    text = dumps({"b": b"\x00ok\xff", "s": {1}, "t": (1, 2)}, compactly=True)
    assert text == '{"b":"\\u0000ok\\\\xff","s":[1],"t":[1,2]}'


class _Colour(enum.Enum):
    RED = "red"


@dataclasses.dataclass
class _Finding:
    rule: str
    _private: int = 0


def test_compact_json_writes_plugin_values_as_the_json_module_does() -> None:
    when = datetime.datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=datetime.UTC)
    value = {
        "when": when, "day": when.date(), "colour": _Colour.RED, "finding": _Finding("r1"),
        "id": uuid.UUID(int=1), 7: "int key", "float": 0.1, "text": "é",
    }  # fmt: skip
    line = compact_json(value, newline=True)
    expected = (
        '{"when":"2026-01-02T03:04:05.000006+00:00","day":"2026-01-02","colour":"red",'
        '"finding":{"rule":"r1"},"id":"00000000-0000-0000-0000-000000000001",'
        '"7":"int key","float":0.1,"text":"é"}\n'
    )
    assert line == expected.encode()
    assert json.loads(line) == json.loads(json.dumps(value, default=_to_jsonable))


@dataclasses.dataclass(slots=True)
class _HalfBuilt:
    rule: str
    score: int = dataclasses.field(init=False)  # never set


def test_a_plugin_value_that_cannot_be_written_fails_the_save_not_the_process() -> None:
    # orjson's own dataclass path dies with SIGSEGV on this value (and with SIGILL on an
    # attribute named ""); through _to_jsonable it is an exception the save reports.
    with pytest.raises(AttributeError):
        compact_json({"finding": _HalfBuilt("r1")})


def test_a_response_is_written_with_its_public_attributes_in_the_order_they_were_set() -> None:
    # Attributes a plugin or decorator added are written, private ones are not.
    response = StoqResponse(
        results=[PayloadResults.from_payload(Payload(b"x", payload_id="p1"))],
        request_meta=RequestMeta(source="unit"),
        errors=new_errors(),
        time="2026-11-25T00:00:00+00:00",
        scan_id="s1",
    )
    response.ticket = "T-1"  # type: ignore[attr-defined]
    response._cache = object()  # type: ignore[attr-defined]
    response.results[0].payload_meta._seen = True  # type: ignore[attr-defined]
    line = compact_json(response)
    assert line == (
        b'{"time":"2026-11-25T00:00:00+00:00","results":[{"payload_id":"p1","size":1,'
        b'"payload_meta":{"should_archive":true,"extra_data":{},"dispatch_to":[]},'
        b'"workers":[{}],"plugins_run":{"workers":[[]],"archivers":[]},'
        b'"extracted_from":null,"extracted_by":null,"archivers":{}}],'
        b'"request_meta":{"archive_payloads":true,"source":"unit","extra_data":{}},'
        b'"errors":{},"decorators":{},"scan_id":"s1","ticket":"T-1"}'
    )
    assert json.loads(line) == json.loads(json.dumps(response, default=_to_jsonable))


class _Score(float):  # as numpy.float64 is: orjson hands float subclasses to the default
    pass


def test_compact_json_writes_a_float_subclass_as_a_number() -> None:
    assert compact_json({"score": _Score(7.25)}) == b'{"score":7.25}'
    assert json.loads(dumps({"score": _Score(7.25)}, indent=None)) == {"score": 7.25}


def test_compact_json_falls_back_to_the_json_module_for_what_orjson_refuses() -> None:
    assert compact_json({"big": 2**70}) == b'{"big":1180591620717411303424}'
    assert compact_json(["\udc80"], newline=True) == b'["\\udc80"]\n'
    assert compact_json([float("nan")]) == b"[null]"  # the json module would write NaN


def test_request_meta_is_in_the_response(make) -> None:
    meta = RequestMeta(source="unit", extra_data={"ticket": "T-1"})
    data = as_json(make().scan_payload(Payload(b"x"), request_meta=meta))
    assert data["request_meta"] == {
        "archive_payloads": True,
        "source": "unit",
        "extra_data": {"ticket": "T-1"},
    }


# -- options: command line > stoq.cfg section > .stoq [options] ------------------------


@pytest.mark.parametrize(
    ("name", "read"),
    [
        ("example_worker", lambda plugin: plugin.greeting),  # stoQ v2 style, plugin_opts
        ("fw_option", lambda plugin: plugin.greeting),  # self.option()
    ],
)
def test_option_precedence(make, tmp_path: Path, name: str, read: Any) -> None:
    stoq_file_value = {"example_worker": "hello from the .stoq file"}.get(
        name, "from the .stoq file"
    )
    assert read(make().load_plugin(name)) == stoq_file_value
    cfg = tmp_path / "stoq.cfg"
    cfg.write_text(f"[{name}]\ngreeting = from stoq.cfg\n")
    assert read(make(config_file=str(cfg)).load_plugin(name)) == "from stoq.cfg"
    cli = {name: {"greeting": "from the command line"}}
    assert read(make(config_file=str(cfg), plugin_opts=cli).load_plugin(name)) == (
        "from the command line"
    )


def test_option_of_the_wrong_kind_names_plugin_and_option(make) -> None:
    stoq = make(plugin_opts={"fw_option": {"tries": "many"}})
    with pytest.raises(StoqPluginException) as caught:
        stoq.load_plugin("fw_option")
    assert str(caught.value) == (
        "plugin fw_option: option tries='many' is not a valid int: "
        "invalid literal for int() with base 10: 'many'"
    )


def test_required_option_missing(plugin_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "fw_option").mkdir()
    (tmp_path / "fw_option" / "fw_option.stoq").write_text(
        "[Core]\nName = fw_option\nModule = fw_option\n"
    )
    (tmp_path / "fw_option" / "fw_option.py").write_text(
        (plugin_dir / "fw_option" / "fw_option.py").read_text()
    )
    stoq = Stoq(plugin_dir_list=[str(tmp_path)])
    with pytest.raises(StoqPluginException) as caught:
        stoq.load_plugin("fw_option")
    assert str(caught.value) == "plugin fw_option: option greeting is required"


# -- dispatch -------------------------------------------------------------------------


def test_always_dispatch_reaches_every_payload(make) -> None:
    response = make(always_dispatch=["fw_echo", "fw_split"]).scan_payload(Payload(b"aa,b"))
    data = as_json(response)
    assert [r["plugins_run"]["workers"] for r in data["results"]] == [
        [["fw_echo", "fw_split"]],
        [["fw_echo", "fw_split"]],
        [["fw_echo", "fw_split"]],
    ]


def test_start_dispatch_is_for_the_first_payload_only(make) -> None:
    stoq = make(always_dispatch=["fw_split"])
    data = as_json(stoq.scan_payload(Payload(b"aa,b"), add_start_dispatch=["fw_echo"]))
    assert [r["plugins_run"]["workers"] for r in data["results"]] == [
        [["fw_echo", "fw_split"]],
        [["fw_split"]],
        [["fw_split"]],
    ]


def test_payload_meta_dispatch_to(make) -> None:
    payload = Payload(b"abc", PayloadMeta(dispatch_to=["fw_second"]))
    assert workers_of(make().scan_payload(payload)) == [{"fw_second": {"second": True}}]


def test_dispatcher_chooses_workers_and_its_errors_are_kept(make) -> None:
    stoq = make(
        dispatchers=["fw_dispatcher"],
        plugin_opts={"fw_dispatcher": {"send_to": "fw_echo, fw_second"}},
    )
    response = stoq.scan_payload(Payload(b"abcd"))
    assert workers_of(response) == [{"fw_echo": {"size": 4}, "fw_second": {"second": True}}]
    assert as_json(response)["errors"] == {"fw_dispatcher": ["dispatcher note"]}


def test_a_worker_runs_once_when_named_twice(make) -> None:
    stoq = make(
        always_dispatch=["fw_echo"],
        dispatchers=["fw_dispatcher"],
        plugin_opts={"fw_dispatcher": {"send_to": "fw_echo"}},
    )
    payload = Payload(b"abc", PayloadMeta(dispatch_to=["fw_echo"]))
    data = as_json(stoq.scan_payload(payload, add_start_dispatch=["fw_echo"]))
    assert data["results"][0]["plugins_run"]["workers"] == [["fw_echo"]]


@pytest.mark.parametrize(
    ("passes", "workers", "results"),
    [
        (1, [["fw_echo"]], [{"fw_echo": {"size": 2}}]),
        (
            2,
            [["fw_echo"], ["fw_second"]],
            [{"fw_echo": {"size": 2}}, {"fw_second": {"second": True}}],
        ),
        (
            5,
            [["fw_echo"], ["fw_second"]],
            [{"fw_echo": {"size": 2}}, {"fw_second": {"second": True}}],
        ),
    ],
)
def test_max_dispatch_passes(make, passes: int, workers: list, results: list) -> None:
    stoq = make(dispatchers=["fw_chain"], max_dispatch_passes=passes)
    data = as_json(stoq.scan_payload(Payload(b"ab")))
    assert data["results"][0]["plugins_run"]["workers"] == workers
    assert data["results"][0]["workers"] == results


def test_required_workers_run_first(make) -> None:
    data = as_json(make(always_dispatch=["fw_requires"]).scan_payload(Payload(b"abc")))
    assert data["results"][0]["plugins_run"]["workers"] == [["fw_echo", "fw_requires"]]
    assert data["results"][0]["workers"][0]["fw_requires"] == {"ran_before": ["fw_echo"]}


# -- extracted payloads ---------------------------------------------------------------


def test_extracted_payloads_scanned_up_to_max_recursion(make) -> None:
    stoq = make(always_dispatch=["fw_unwrap", "fw_echo"], max_recursion=2)
    data = as_json(stoq.scan_payload(Payload(b"wrap:wrap:wrap:core")))
    sizes = [r["size"] for r in data["results"]]
    assert sizes == [19, 14, 9]  # the root, then two levels; the third is not scanned
    ids = [r["payload_id"] for r in data["results"]]
    assert [r["extracted_from"] for r in data["results"]] == [None, ids[0], ids[1]]
    assert [r["extracted_by"] for r in data["results"]] == [None, "fw_unwrap", "fw_unwrap"]
    [error] = data["errors"]["stoq"]
    assert error.startswith("payload ")
    assert error.endswith(" extracted by fw_unwrap not scanned: max_recursion 2 reached")


def test_max_recursion_zero_scans_only_the_root(make) -> None:
    data = as_json(
        make(always_dispatch=["fw_unwrap"], max_recursion=0).scan_payload(Payload(b"wrap:x"))
    )
    assert len(data["results"]) == 1
    assert len(data["errors"]["stoq"]) == 1


def test_duplicates_are_scanned_once(make) -> None:
    data = as_json(make(always_dispatch=["fw_split"]).scan_payload(Payload(b"x,y,x,x,y")))
    assert [r["size"] for r in data["results"]] == [9, 1, 1]
    assert data["results"][0]["workers"] == [{"fw_split": {"parts": 5}}]
    assert data["errors"] == {}


def test_a_child_equal_to_the_root_is_not_scanned_again(make) -> None:
    data = as_json(make(always_dispatch=["fw_split"]).scan_payload(Payload(b"same")))
    assert len(data["results"]) == 1


# -- plugins that misbehave -----------------------------------------------------------


def test_raising_worker_is_recorded_and_the_scan_goes_on(make) -> None:
    stoq = make(always_dispatch=["fw_raises", "fw_echo", "fw_wrong_type"])
    data = as_json(stoq.scan_payload(Payload(b"abc")))
    assert data["errors"] == {
        "fw_raises": ["RuntimeError: boom"],
        "fw_wrong_type": ["returned dict, expected WorkerResponse or None"],
    }
    assert data["results"][0]["workers"] == [{"fw_echo": {"size": 3}}]
    assert data["results"][0]["plugins_run"]["workers"] == [
        ["fw_raises", "fw_echo", "fw_wrong_type"]
    ]


def test_bad_extracted_items_and_worker_errors_are_recorded(make) -> None:
    data = as_json(make(always_dispatch=["fw_bad_extract"]).scan_payload(Payload(b"abc")))
    assert data["errors"] == {
        "fw_bad_extract": ["partly failed", "extracted str without bytes content; skipped"]
    }
    assert data["results"][0]["workers"] == [{"fw_bad_extract": {"ok": 1}}]


def test_unknown_and_wrong_kind_plugins_are_recorded_once(make) -> None:
    payload = Payload(b"abc", PayloadMeta(dispatch_to=["no_such_worker", "fw_archiver"]))
    data = as_json(make(always_dispatch=["fw_echo"]).scan_payload(payload))
    assert data["errors"]["fw_archiver"] == ["plugin fw_archiver is not a WorkerPlugin"]
    [unknown] = data["errors"]["no_such_worker"]
    assert unknown.startswith("unknown plugin no_such_worker (known plugins: ")
    assert data["results"][0]["workers"] == [{"fw_echo": {"size": 3}}]


def test_max_payload_size(make) -> None:
    stoq = make(always_dispatch=["fw_echo"], max_payload_size=4)
    payload = Payload(b"12345")
    data = as_json(stoq.scan_payload(payload))
    assert data["errors"] == {
        "stoq": [f"payload {payload.payload_id} not scanned: 5 bytes exceeds max_payload_size 4"]
    }
    assert data["results"][0]["plugins_run"]["workers"] == [[]]
    assert workers_of(stoq.scan_payload(Payload(b"1234"))) == [{"fw_echo": {"size": 4}}]


# -- archivers, decorators, connectors ------------------------------------------------


def test_destination_archivers(make, tmp_path: Path) -> None:
    stoq = make(
        always_dispatch=["fw_split"],
        dest_archivers=["fw_archiver", "example_archiver"],
        plugin_opts={"example_archiver": {"archive_dir": str(tmp_path)}},
    )
    data = as_json(stoq.scan_payload(Payload(b"ab,c")))
    assert [r["archivers"] for r in data["results"]] == [
        {"fw_archiver": {"stored": 4}, "example_archiver": {"sha1": get_sha1(b"ab,c")}},
        {"fw_archiver": {"stored": 2}, "example_archiver": {"sha1": get_sha1(b"ab")}},
        {"fw_archiver": {"stored": 1}, "example_archiver": {"sha1": get_sha1(b"c")}},
    ]
    assert data["results"][0]["plugins_run"]["archivers"] == ["fw_archiver", "example_archiver"]
    assert (tmp_path / get_sha1(b"ab")).read_bytes() == b"ab"


def test_should_archive_false_and_archive_payloads_false(make) -> None:
    stoq = make(dest_archivers=["fw_archiver"])
    kept = Payload(b"x", PayloadMeta(should_archive=False))
    assert as_json(stoq.scan_payload(kept))["results"][0]["archivers"] == {}
    data = as_json(stoq.scan_payload(Payload(b"y"), RequestMeta(archive_payloads=False)))
    assert data["results"][0]["archivers"] == {}
    assert data["results"][0]["plugins_run"]["archivers"] == []


def test_decorators_see_the_whole_response(make) -> None:
    stoq = make(always_dispatch=["fw_split"], decorators=["fw_decorator"])
    data = as_json(stoq.scan_payload(Payload(b"a,b,c")))
    assert data["decorators"] == {"fw_decorator": {"payloads": 4}}


def test_a_failing_connector_is_reported_and_others_still_save(make, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    stoq = make(
        connectors=["fw_failing_connector", "example_connector"],
        plugin_opts={"example_connector": {"output_file": str(out)}},
    )
    response = stoq.scan_payload(Payload(b"abc"))
    assert response.errors["stoq"] == ["connector fw_failing_connector failed: OSError: disk full"]
    [line] = out.read_text().splitlines()
    assert json.loads(line)["scan_id"] == response.scan_id


def test_scan_saves_bytes_through_connectors(make, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    stoq = make(
        connectors=["example_connector"],
        always_dispatch=["example_worker"],
        plugin_opts={"example_connector": {"output_file": str(out)}},
    )
    response = stoq.scan(b"hello", PayloadMeta(extra_data={"filename": "h.txt"}))
    saved = json.loads(out.read_text())
    assert saved["scan_id"] == response.scan_id
    assert saved["results"][0]["payload_meta"]["extra_data"] == {"filename": "h.txt"}
    assert saved["results"][0]["workers"][0]["example_worker"]["sha1"] == get_sha1(b"hello")


# -- references through source archivers ----------------------------------------------


def test_resolve_dict_reference(make) -> None:
    payload = make(source_archivers=["fw_archiver"]).resolve({"fw_archiver": {"id": "abc"}})
    assert payload.content == b"content of abc"
    assert payload.payload_meta.extra_data == {"archiver": {"fw_archiver": {"id": "abc"}}}


def test_resolve_json_text_reference(make, tmp_path: Path) -> None:
    (tmp_path / get_sha1(b"stored")).write_bytes(b"stored")
    stoq = make(
        source_archivers=["example_archiver"],
        plugin_opts={"example_archiver": {"archive_dir": str(tmp_path)}},
    )
    reference = json.dumps({"example_archiver": {"sha1": get_sha1(b"stored")}})
    assert stoq.resolve(reference).content == b"stored"


def test_resolve_plain_text_goes_to_each_source_archiver(make) -> None:
    payload = make(source_archivers=["fw_archiver"]).resolve("/some/where")
    assert payload.content == b"content of /some/where"
    assert payload.payload_meta.extra_data == {"archiver": {"fw_archiver": {"path": "/some/where"}}}


@pytest.mark.parametrize(
    ("kwargs", "reference", "message"),
    [
        (
            {},
            "/some/where",
            "reference '/some/where' needs a source archiver; none is configured "
            "([core] source_archivers)",
        ),
        (
            {},
            '{"fw_archiver": ',
            "reference is not valid JSON: Expecting value: line 1 column 16 (char 15)",
        ),
        ({}, '{"fw_archiver": 3}', 'reference must be {"ARCHIVER": {...}}'),
        (
            {},  # a message may not pick any installed plugin
            {"fw_archiver": {"id": "abc"}},
            "reference names archiver 'fw_archiver', which is not in [core] source_archivers "
            "(none configured)",
        ),
        (
            {"source_archivers": ["example_archiver"]},
            {"fw_archiver": {"id": "abc"}},
            "reference names archiver 'fw_archiver', which is not in [core] source_archivers "
            "(example_archiver)",
        ),
        (
            {"source_archivers": ["fw_archiver"]},
            {"fw_archiver": {"id": "missing"}},
            "no source archiver resolved the reference: fw_archiver returned NoneType",
        ),
    ],
)
def test_resolve_errors(make, kwargs: dict, reference: Any, message: str) -> None:
    with pytest.raises(StoqException) as caught:
        make(**kwargs).resolve(reference)
    assert str(caught.value) == message


def test_resolve_with_a_plugin_that_is_not_an_archiver(make) -> None:
    with pytest.raises(StoqPluginException) as caught:
        make(source_archivers=["fw_echo"]).resolve({"fw_echo": {}})
    assert str(caught.value) == "plugin fw_echo is not an ArchiverPlugin"


def test_archiver_refuses_a_reference_outside_its_root(make, tmp_path: Path) -> None:
    stoq = make(
        source_archivers=["example_archiver"],
        plugin_opts={"example_archiver": {"archive_dir": str(tmp_path / "a")}},
    )
    (tmp_path / "a").mkdir()
    with pytest.raises(StoqPluginException) as caught:
        stoq.resolve({"example_archiver": {"sha1": "../secret"}})
    assert str(caught.value) == "'../secret' is outside the archive"


# -- the seed's provider, loaded unchanged --------------------------------------------


def test_v2_plugins_load_unchanged(make) -> None:
    stoq = Stoq(plugin_dir_list=[str(V2_PLUGINS)])
    listing = stoq.list_plugins()
    assert {name: listing[name]["kind"] for name in listing if name.startswith("example_")} == {
        "example_archiver": "archiver",
        "example_connector": "connector",
        "example_provider": "provider",
        "example_worker": "worker",
    }


def test_seed_provider_ingests_its_payload() -> None:
    from queue import Queue

    provider = Stoq(plugin_dir_list=[str(V2_PLUGINS)]).load_plugin("example_provider")
    queue: Queue = Queue()
    provider.ingest(queue)
    item = queue.get_nowait()
    assert isinstance(item, Payload)
    assert item.content == b"This is a payload"
    assert queue.empty()


# -- plugin discovery: broken, doubled and replaced plugins -----------------------------


def _stoq_file(folder: Path, name: str, text: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.stoq"
    path.write_text(text or f"[Core]\nName = {name}\nModule = {name}\n")
    (folder / f"{name}.py").write_text("")
    return path


def test_every_broken_plugin_file_is_reported_at_once(tmp_path: Path) -> None:
    garbled = _stoq_file(tmp_path / "a", "a", "garbage")
    no_module = _stoq_file(tmp_path / "b", "b", "[Core]\nName = b\n")
    with pytest.raises(StoqPluginException) as caught:
        PluginRegistry([tmp_path])
    assert str(caught.value).splitlines() == [
        f"{garbled}: cannot read plugin file: File contains no section headers.",
        f"{no_module}: [Core] Module is missing",
    ]


def test_two_plugins_of_one_name_in_one_directory_are_an_error(tmp_path: Path) -> None:
    first = _stoq_file(tmp_path / "one", "twin")
    second = _stoq_file(tmp_path / "two", "twin")
    with pytest.raises(StoqPluginException) as caught:
        PluginRegistry([tmp_path])
    assert str(caught.value) == f"{second}: plugin twin is already defined by {first}"


def test_a_plugin_directory_replaces_a_built_in_and_says_so(tmp_path: Path) -> None:
    mine = _stoq_file(tmp_path / "hash", "hash")
    later = _stoq_file(tmp_path.parent / f"{tmp_path.name}-later" / "hash", "hash")
    registry = PluginRegistry([tmp_path, later.parent.parent])
    assert registry.spec("hash").origin == str(mine)
    assert registry.notes == [
        f"plugin hash: {mine} is used; {later} is not",
        f"plugin hash: {mine} replaces the installed stoqd.builtin.hash",
    ]


def test_a_scan_leaves_no_reference_cycle_behind(tmp_path: Path) -> None:
    """What a scan held, its payload included, is freed when it ends, not at the next
    cyclic collection: a worker scanning 50 MiB files must not keep several of them."""
    stoq = Stoq(
        always_dispatch=["hash"],
        connectors=["jsonl"],
        plugin_opts={"jsonl": {"output_file": str(tmp_path / "r.jsonl")}},
    )
    stoq.load_scan_plugins()
    gc.collect()
    gc.disable()
    try:
        stoq.scan(b"x" * 4096)
        assert gc.collect() == 0
    finally:
        gc.enable()
