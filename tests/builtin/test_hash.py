"""The hash worker: digests equal hashlib's, through the loader and through a scan."""

from __future__ import annotations

import hashlib
import os

import pytest

from stoq import Payload, RequestMeta, Stoq, StoqPluginException


def test_digests_equal_hashlib_on_a_multi_chunk_payload(load):
    # 3 MiB and 5 bytes: several 1 MiB slices and a short last one.
    content = os.urandom((3 << 20) + 5)
    response = load("hash").scan(Payload(content), RequestMeta())
    assert response.results == {
        name: hashlib.new(name, content).hexdigest() for name in ("md5", "sha1", "sha256", "sha512")
    }


def test_empty_payload_hashes(load):
    response = load("hash").scan(Payload(b""), RequestMeta())
    assert response.results["sha256"] == hashlib.sha256(b"").hexdigest()


def test_algorithms_option_chooses_the_digests(load):
    response = load("hash", algorithms="sha256, SHA1").scan(Payload(b"abc"), RequestMeta())
    assert response.results == {
        "sha256": hashlib.sha256(b"abc").hexdigest(),
        "sha1": hashlib.sha1(b"abc").hexdigest(),
    }


def test_unknown_algorithm_is_rejected_at_load(load):
    with pytest.raises(StoqPluginException) as info:
        load("hash", algorithms="md5, crc32")
    assert str(info.value).startswith(
        "plugin hash: option algorithms: unknown algorithm 'crc32' (choose from "
    )


def test_hash_through_stoq_scan():
    response = Stoq(always_dispatch=["hash"]).scan(b"This is a payload")
    [result] = response.results
    assert result.workers[0]["hash"]["md5"] == hashlib.md5(b"This is a payload").hexdigest()
    assert result.plugins_run["workers"] == [["hash"]]
    assert not response.errors
