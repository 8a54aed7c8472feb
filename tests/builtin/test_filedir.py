"""The filedir plugin: results written atomically, payloads archived by sha256, and
``get`` serving nothing outside archive_dir."""

from __future__ import annotations

import hashlib
import json
import os
import threading

import pytest

from stoq import ArchiverResponse, RequestMeta, Stoq, StoqPluginException, StoqResponse
from stoq.data_classes import Payload, new_errors


def _response(**extra: object) -> StoqResponse:
    return StoqResponse(
        results=[], request_meta=RequestMeta(extra_data=dict(extra)), errors=new_errors()
    )


# -- connector ------------------------------------------------------------------------


def test_one_file_per_result_named_by_scan_id(tmp_path):
    stoq = Stoq(
        always_dispatch=["hash"],
        connectors=["filedir"],
        plugin_opts={"filedir": {"results_dir": str(tmp_path / "results")}},
    )
    response = stoq.scan(b"payload")
    assert os.listdir(tmp_path / "results") == [f"{response.scan_id}.json"]
    saved = json.loads((tmp_path / "results" / f"{response.scan_id}.json").read_text())
    assert saved == json.loads(str(response))


def test_a_reader_never_sees_a_partial_result_file(load, tmp_path):
    connector = load("filedir", results_dir=str(tmp_path), compactly="true")
    done = threading.Event()
    problems: list[str] = []
    files_read = 0

    def reader() -> None:
        nonlocal files_read
        while not done.is_set():
            for name in os.listdir(tmp_path):
                if not name.endswith(".json") or name.startswith("."):
                    continue
                text = (tmp_path / name).read_text()
                files_read += 1
                try:
                    json.loads(text)
                except ValueError:
                    problems.append(f"{name}: {len(text)} bytes, not whole JSON")

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for seq in range(150):
            connector.save(_response(seq=seq, filler="x" * (1 << 20)))
    finally:
        done.set()
        thread.join()
    assert problems == []
    assert files_read > 0  # the reader really was looking while files were written
    names = os.listdir(tmp_path)
    assert len(names) == 150 and all(name.endswith(".json") for name in names)


def test_unsafe_scan_id_is_refused(load, tmp_path):
    connector = load("filedir", results_dir=str(tmp_path / "results"))
    response = _response()
    response.scan_id = "../escaped"
    with pytest.raises(StoqPluginException) as info:
        connector.save(response)
    assert str(info.value) == "plugin filedir: scan_id '../escaped' is not a safe file name"
    assert not (tmp_path / "escaped.json").exists()


def test_saving_without_results_dir_is_an_error(load, tmp_path):
    connector = load("filedir", archive_dir=str(tmp_path))
    with pytest.raises(StoqPluginException) as info:
        connector.save(_response())
    assert str(info.value) == "plugin filedir: option results_dir is not set"


# -- archiver -------------------------------------------------------------------------


def test_archive_stores_by_sha256_and_get_reads_it_back(load, tmp_path):
    archiver = load("filedir", archive_dir=str(tmp_path))
    content = b"archive me"
    sha256 = hashlib.sha256(content).hexdigest()
    response = archiver.archive(Payload(content), RequestMeta())
    expected_path = tmp_path / sha256[:2] / sha256[2:4] / sha256
    assert response.results == {"path": str(expected_path), "sha256": sha256}
    assert expected_path.read_bytes() == content
    assert [p for p in expected_path.parent.iterdir()] == [expected_path]  # no temp left

    for task in (
        {"sha256": sha256},
        {"path": str(expected_path)},
        {"path": f"{sha256[:2]}/{sha256[2:4]}/{sha256}"},  # relative to archive_dir
    ):
        payload = archiver.get(ArchiverResponse(task))
        assert payload.content == content
        assert payload.payload_meta.extra_data["path"] == str(expected_path)


def test_archiving_twice_keeps_one_copy(load, tmp_path):
    archiver = load("filedir", archive_dir=str(tmp_path))
    first = archiver.archive(Payload(b"same"), RequestMeta())
    second = archiver.archive(Payload(b"same"), RequestMeta())
    assert first.results == second.results
    assert sum(len(files) for _, _, files in os.walk(tmp_path)) == 1


def test_dest_archiver_through_stoq_and_resolve(tmp_path):
    stoq = Stoq(
        dest_archivers=["filedir"],
        source_archivers=["filedir"],
        plugin_opts={"filedir": {"archive_dir": str(tmp_path)}},
    )
    response = stoq.scan(b"kept for later")
    record = response.results[0].archivers["filedir"]
    assert record["sha256"] == hashlib.sha256(b"kept for later").hexdigest()
    payload = stoq.resolve(json.dumps({"filedir": {"sha256": record["sha256"]}}))
    assert payload.content == b"kept for later"


@pytest.fixture
def archive(load, tmp_path):
    """An archive_dir with one stored file, and a secret just outside it."""
    root = tmp_path / "archive"
    archiver = load("filedir", archive_dir=str(root))
    archiver.archive(Payload(b"inside"), RequestMeta())
    (tmp_path / "secret.txt").write_text("outside")
    return archiver, root


def _refused(archiver, path: str) -> str:
    with pytest.raises(StoqPluginException) as info:
        archiver.get(ArchiverResponse({"path": path}))
    return str(info.value)


def test_get_refuses_dot_dot(archive, tmp_path):
    archiver, root = archive
    assert _refused(archiver, "../secret.txt") == (
        f"plugin filedir: path '../secret.txt' is outside archive_dir {root} "
        f"(resolves to {tmp_path / 'secret.txt'})"
    )


def test_get_refuses_absolute_paths_outside(archive, tmp_path):
    archiver, _root = archive
    assert "is outside archive_dir" in _refused(archiver, str(tmp_path / "secret.txt"))
    assert "is outside archive_dir" in _refused(archiver, "/etc/passwd")


def test_get_refuses_a_symlink_that_leads_outside(archive, tmp_path):
    archiver, root = archive
    (root / "link").symlink_to(tmp_path / "secret.txt")
    (root / "dirlink").symlink_to(tmp_path)
    assert _refused(archiver, "link") == (
        f"plugin filedir: path 'link' is outside archive_dir {root} "
        f"(resolves to {tmp_path / 'secret.txt'})"
    )
    assert "is outside archive_dir" in _refused(archiver, "dirlink/secret.txt")


def test_get_follows_a_symlink_that_stays_inside(archive):
    archiver, root = archive
    sha256 = hashlib.sha256(b"inside").hexdigest()
    (root / "alias").symlink_to(root / sha256[:2] / sha256[2:4] / sha256)
    assert archiver.get(ArchiverResponse({"path": "alias"})).content == b"inside"


def test_get_refuses_a_bad_sha256_and_the_root_itself(archive):
    archiver, _root = archive
    with pytest.raises(StoqPluginException) as info:
        archiver.get(ArchiverResponse({"sha256": "../../etc/passwd"}))
    assert str(info.value) == ("plugin filedir: sha256 '../../etc/passwd' is not 64 hex digits")
    assert "is outside archive_dir" in _refused(archiver, ".")


def test_get_of_a_missing_file_names_it(archive):
    archiver, root = archive
    assert _refused(archiver, "nothing-here") == (
        f"plugin filedir: cannot read {root / 'nothing-here'}: No such file or directory"
    )
