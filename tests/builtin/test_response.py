"""The built-ins as a whole: stoQ v2's JSON shape, their .stoq files, and loading in
many processes at once."""

from __future__ import annotations

import json
import multiprocessing

from stoq import Stoq
from stoqd.framework.loader import PluginRegistry
from stoqd.framework.plugins import (
    PLUGIN_CLASSES,
    ArchiverPlugin,
    ConnectorPlugin,
    DispatcherPlugin,
    WorkerPlugin,
)

BUILTINS = {
    "hash": [WorkerPlugin],
    "mimetype": [WorkerPlugin],
    "yara": [WorkerPlugin, DispatcherPlugin],
    "decompress": [WorkerPlugin],
    "stdout": [ConnectorPlugin],
    "jsonl": [ConnectorPlugin],
    "filedir": [ArchiverPlugin, ConnectorPlugin],
}


def test_scan_response_serialises_to_stoq_v2_keys():
    stoq = Stoq(always_dispatch=["hash", "mimetype"], dispatchers=["yara"])
    response = stoq.scan(b"PK\x05\x06" + bytes(18))  # an empty zip: routed to decompress
    document = json.loads(str(response))
    assert list(document) == [
        "time", "results", "request_meta", "errors", "decorators", "scan_id",
    ]  # fmt: skip
    assert document["scan_id"] == response.scan_id
    [result] = document["results"]
    assert set(result) == {
        "payload_id", "size", "payload_meta", "workers", "plugins_run",
        "extracted_from", "extracted_by", "archivers",
    }  # fmt: skip
    assert result["size"] == 22
    assert result["extracted_from"] is None and result["extracted_by"] is None
    assert result["plugins_run"] == {
        "workers": [["hash", "mimetype", "decompress"]],
        "archivers": [],
    }
    assert result["workers"][0]["mimetype"] == {"mimetype": "application/zip"}
    assert result["workers"][0]["decompress"] == {"archive": "zip", "extracted": 0}
    assert document["request_meta"] == {"archive_payloads": True, "source": None, "extra_data": {}}
    assert document["errors"] == {} and document["decorators"] == {}


def test_every_builtin_comes_with_its_stoq_file(registry):
    for name, roles in BUILTINS.items():
        spec = registry.spec(name)
        assert spec.config.get("Core", "Name") == name
        assert spec.description, f"{name}.stoq has no Description"
        cls = registry.plugin_class(name)
        assert [base for base in PLUGIN_CLASSES.values() if issubclass(cls, base)] == roles


def _load_all(directory: str) -> None:
    registry = PluginRegistry()
    options = {
        "jsonl": {"output_file": f"{directory}/results/out.jsonl"},
        "filedir": {"results_dir": f"{directory}/saved", "archive_dir": f"{directory}/archive"},
    }
    for name in BUILTINS:
        registry.load(name, options.get(name))


def test_builtins_load_in_many_processes_at_once(tmp_path):
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_load_all, args=(str(tmp_path),)) for _ in range(6)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    assert [process.exitcode for process in processes] == [0] * 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["archive", "results", "saved"]
