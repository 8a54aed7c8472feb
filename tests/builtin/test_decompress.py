"""The decompress worker: every format, passwords, bombs, links, nesting and limits."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import itertools
import lzma
import os
import tarfile
import zipfile
import zlib

import pytest

from stoq import Payload, PayloadMeta, RequestMeta, Stoq, StoqPluginException

from .archives import RawMember, deflate, gzip_wrap, raw_zip, zero_deflate, zipcrypto_member

MiB = 1 << 20


def _scan(plugin, content: bytes, **meta):
    return plugin.scan(Payload(content, PayloadMeta(extra_data=meta)), RequestMeta())


def _extracted(response):
    return [(e.payload_meta.extra_data.get("filename"), e.content) for e in response.extracted]


def _zip(members: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", method) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _tar(entries: list[tarfile.TarInfo], data: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as archive:
        for info in entries:
            content = data.get(info.name)
            if content is not None:
                info.size = len(content)
            archive.addfile(info, io.BytesIO(content) if content is not None else None)
    return buffer.getvalue()


def _entry(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


# -- formats --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method",
    [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA],
    ids=["stored", "deflated", "bzip2", "lzma"],
)
def test_zip_members_of_every_method(load, method):
    members = {"a.txt": b"alpha " * 1000, "dir/b.bin": os.urandom(MiB + 1000)}
    response = _scan(load("decompress"), _zip(members, method))
    assert response.errors == []
    assert _extracted(response) == list(members.items())
    assert response.results == {"archive": "zip", "extracted": 2}
    assert response.extracted[0].payload_meta.extra_data == {
        "filename": "a.txt",
        "archive": "zip",
    }


def test_gzip_keeps_the_stored_file_name(load):
    buffer = io.BytesIO()
    with gzip.GzipFile("report.txt", "wb", fileobj=buffer) as stream:
        stream.write(b"gzip body")
    response = _scan(load("decompress"), buffer.getvalue())
    assert _extracted(response) == [("report.txt", b"gzip body")]
    assert response.extracted[0].payload_meta.extra_data["archive"] == "gzip"


@pytest.mark.parametrize(
    ("compress", "fmt"),
    [(gzip.compress, "gzip"), (bz2.compress, "bzip2"), (lzma.compress, "xz")],
    ids=["gzip", "bzip2", "xz"],
)
def test_single_stream_formats(load, compress, fmt):
    body = os.urandom(MiB) + b"tail" * 1000  # more than one read chunk
    response = _scan(load("decompress"), compress(body))
    assert response.errors == []
    assert [e.content for e in response.extracted] == [body]
    assert response.results == {"archive": fmt, "extracted": 1}


def test_format_comes_from_magic_bytes_not_the_file_name(load):
    response = _scan(load("decompress"), bz2.compress(b"data"), filename="looks.zip")
    assert response.results["archive"] == "bzip2"
    assert _scan(load("decompress"), b"PK but not a zip", filename="x.zip") is None
    assert _scan(load("decompress"), b"plain text", filename="x.tar.gz") is None


def test_tar_regular_files_extracted_links_and_devices_skipped(load):
    entries = [
        _entry("docs", tarfile.DIRTYPE),
        _entry("docs/readme.txt"),
        _entry("passwd", tarfile.SYMTYPE, "/etc/passwd"),
        _entry("hard", tarfile.LNKTYPE, "docs/readme.txt"),
        _entry("null", tarfile.CHRTYPE),
        _entry("disk", tarfile.BLKTYPE),
        _entry("pipe", tarfile.FIFOTYPE),
        _entry("empty.txt"),
    ]
    content = _tar(entries, {"docs/readme.txt": b"read me", "empty.txt": b""})
    response = _scan(load("decompress"), content)
    assert response.errors == []
    assert _extracted(response) == [("docs/readme.txt", b"read me"), ("empty.txt", b"")]
    assert response.results == {
        "archive": "tar",
        "extracted": 2,
        "skipped": [
            {"filename": "passwd", "reason": "symbolic link to /etc/passwd"},
            {"filename": "hard", "reason": "hard link to docs/readme.txt"},
            {"filename": "null", "reason": "device"},
            {"filename": "disk", "reason": "device"},
            {"filename": "pipe", "reason": "fifo"},
        ],
        "skipped_count": 5,
    }


# -- encrypted zip --------------------------------------------------------------------


def _encrypted_zip() -> bytes:
    return raw_zip(
        [
            zipcrypto_member("secret.txt", b"the secret " * 100, "s3cret"),
            RawMember("open.txt", deflate(b"open"), zlib.crc32(b"open"), 4),
        ]
    )


def test_encrypted_zip_opens_with_a_listed_password(load):
    response = _scan(load("decompress", passwords="wrong, s3cret"), _encrypted_zip())
    assert response.errors == []
    assert _extracted(response) == [("secret.txt", b"the secret " * 100), ("open.txt", b"open")]
    assert response.extracted[0].payload_meta.extra_data["encrypted"] is True


def test_encrypted_zip_without_the_right_password(load):
    response = _scan(load("decompress", passwords="wrong, also-wrong"), _encrypted_zip())
    assert response.errors == [
        "zip member 'secret.txt' is encrypted and none of the 2 passwords fit; skipped"
    ]
    assert _extracted(response) == [("open.txt", b"open")]


def test_encrypted_zip_with_no_passwords_configured(load):
    response = _scan(load("decompress", passwords=""), _encrypted_zip())
    assert response.errors == [
        "zip member 'secret.txt' is encrypted and no passwords are configured; skipped"
    ]


# -- bombs and limits -----------------------------------------------------------------


@pytest.fixture(scope="module")
def gigabyte_of_zeros():
    """1 GiB of zeros as raw deflate (about 1 MiB) and its CRC."""
    return zero_deflate(1024)


def test_gzip_bomb_stopped_by_max_ratio(load, gigabyte_of_zeros):
    raw, crc = gigabyte_of_zeros
    response = _scan(load("decompress"), gzip_wrap(raw, crc, 1 << 30))
    [error] = response.errors
    assert error.startswith("gzip stream exceeds max_ratio 250 (")
    assert error.endswith(" compressed); skipped")
    assert response.extracted == []


def test_gzip_bomb_stopped_by_max_total_size(load, gigabyte_of_zeros):
    raw, crc = gigabyte_of_zeros
    plugin = load("decompress", max_ratio="1000000", max_member_size="2G", max_total_size="32M")
    response = _scan(plugin, gzip_wrap(raw, crc, 1 << 30))
    assert response.errors == [
        "max_total_size 33554432 bytes reached at gzip stream; it and later members not extracted"
    ]
    assert response.extracted == []


def test_zip_bomb_refused_from_its_headers(load, gigabyte_of_zeros):
    raw, crc = gigabyte_of_zeros
    bomb = raw_zip([RawMember("zeros.bin", raw, crc, 1 << 30)])
    by_ratio = _scan(load("decompress", max_member_size="2G", max_total_size="2G"), bomb)
    assert by_ratio.errors == [
        f"zip member 'zeros.bin' exceeds max_ratio 250 ({1 << 30} bytes from {len(raw)} "
        "compressed); skipped"
    ]
    by_size = _scan(load("decompress"), bomb)
    assert by_size.errors == [
        "zip member 'zeros.bin' exceeds max_member_size 104857600 bytes; skipped"
    ]


def test_zip_header_understating_the_size_yields_no_more_than_it_claims(load, gigabyte_of_zeros):
    raw, _ = gigabyte_of_zeros
    liar = raw_zip([RawMember("small.txt", raw, zlib.crc32(bytes(1000)), 1000)])
    response = _scan(load("decompress"), liar)
    assert _extracted(response) == [("small.txt", bytes(1000))]


def test_bzip2_zip_member_larger_than_its_header_is_cut_off(load):
    # zipfile would decompress bzip2 members in unbounded steps; stoqd reads them itself.
    zeros = bz2.BZ2Compressor(9)
    data = b"".join(zeros.compress(bytes(MiB)) for _ in range(16)) + zeros.flush()
    liar = raw_zip(
        [RawMember("z.bin", data, zlib.crc32(bytes(1000)), 1000, method=zipfile.ZIP_BZIP2)]
    )
    response = _scan(load("decompress"), liar)
    assert response.errors == [
        "zip member 'z.bin' cannot be extracted: member is larger than its header says; skipped"
    ]


def test_total_size_stops_extraction_but_keeps_earlier_members(load):
    raw, crc = zero_deflate(10)
    bomb = raw_zip([RawMember(f"part{n}.bin", raw, crc, 10 * MiB) for n in range(6)])
    response = _scan(load("decompress", max_ratio="100000", max_total_size="35M"), bomb)
    assert [name for name, _ in _extracted(response)] == ["part0.bin", "part1.bin", "part2.bin"]
    assert response.errors == [
        "max_total_size 36700160 bytes reached at zip member 'part3.bin'; "
        "it and later members not extracted"
    ]


def test_member_size_skips_one_member_and_goes_on(load):
    members = {"big.bin": os.urandom(2 * MiB), "small.txt": b"small"}
    response = _scan(load("decompress", max_member_size="1M"), _zip(members))
    assert _extracted(response) == [("small.txt", b"small")]
    assert response.errors == [
        "zip member 'big.bin' exceeds max_member_size 1048576 bytes; skipped"
    ]


def test_member_count_is_capped(load):
    members = {f"f{n}.txt": f"file {n}".encode() for n in range(5)}
    response = _scan(load("decompress", max_members="3"), _zip(members))
    assert [name for name, _ in _extracted(response)] == ["f0.txt", "f1.txt", "f2.txt"]
    assert response.errors == ["max_members 3 reached: 2 more zip members not extracted"]


def test_total_size_is_shared_by_nested_archives_of_one_root():
    raw, crc = zero_deflate(10)
    inner = raw_zip([RawMember("zeros.bin", raw, crc, 10 * MiB)])
    outer = _zip({"one.zip": inner, "two.zip": inner + b"\x00"})  # distinct, not deduplicated
    stoq = Stoq(
        always_dispatch=["decompress"],
        plugin_opts={"decompress": {"max_ratio": "100000", "max_total_size": "15M"}},
    )
    response = stoq.scan(outer)
    sizes = [result.size for result in response.results]
    assert sizes == [len(outer), len(inner), len(inner) + 1, 10 * MiB]
    assert response.errors["decompress"] == [
        "max_total_size 15728640 bytes reached at zip member 'zeros.bin'; "
        "it and later members not extracted"
    ]
    # A new root payload starts with a fresh budget.
    again = stoq.scan(inner)
    assert [result.size for result in again.results] == [len(inner), 10 * MiB]


# -- corrupt input --------------------------------------------------------------------


def test_corrupt_member_is_reported_and_the_rest_extracted(load):
    good = RawMember("good.txt", deflate(b"good"), zlib.crc32(b"good"), 4)
    bad = RawMember("bad.txt", deflate(b"bad!"), zlib.crc32(b"oops"), 4)
    response = _scan(load("decompress"), raw_zip([bad, good]))
    assert response.errors == [
        "zip member 'bad.txt' cannot be extracted: Bad CRC-32 for file 'bad.txt'; skipped"
    ]
    assert _extracted(response) == [("good.txt", b"good")]


def test_unsupported_zip_methods_are_named(load):
    aes = RawMember("aes.bin", b"x" * 40, 0, 10, method=99, flags=0x1)
    ppmd = RawMember("ppmd.bin", b"x" * 40, 0, 10, method=98)
    response = _scan(load("decompress"), raw_zip([aes, ppmd]))
    assert response.errors == [
        "zip member 'aes.bin' is encrypted with compression method 99, which is not "
        "supported; skipped",
        "zip member 'ppmd.bin' cannot be extracted: compression method 98 is not "
        "supported; skipped",
    ]


def test_truncated_stream_is_reported(load):
    response = _scan(load("decompress"), gzip.compress(os.urandom(100_000))[:5000])
    assert response.errors == [
        "gzip archive is corrupt: Compressed file ended before the end-of-stream marker was reached"
    ]


def test_bad_option_is_rejected_at_load(load):
    with pytest.raises(StoqPluginException) as info:
        load("decompress", max_total_size="a lot")
    assert str(info.value) == (
        "plugin decompress: option max_total_size='a lot' is not a valid size: "
        "expected a size such as 1048576 or 100M"
    )


# -- through the framework ------------------------------------------------------------


def test_nested_archives_scanned_up_to_max_recursion():
    # level3.zip holds level2.zip holds level1.zip holds deepest.txt
    content = _zip({"deepest.txt": b"at the bottom"})
    for level in (1, 2, 3):
        content = _zip({f"level{level}.zip": content})
    stoq = Stoq(always_dispatch=["decompress"], max_recursion=2)
    response = stoq.scan(content)
    names = [r.payload_meta.extra_data.get("filename") for r in response.results]
    assert names == [None, "level3.zip", "level2.zip"]
    for parent, child in itertools.pairwise(response.results):
        assert child.extracted_from == parent.payload_id
        assert child.extracted_by == "decompress"
    [error] = response.errors["stoq"]
    assert error.endswith("extracted by decompress not scanned: max_recursion 2 reached")


def test_tar_gz_through_the_yara_dispatcher():
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        info = tarfile.TarInfo("inside/notes.txt")
        info.size = 5
        archive.addfile(info, io.BytesIO(b"notes"))
    stoq = Stoq(dispatchers=["yara"], always_dispatch=["hash"])
    response = stoq.scan(buffer.getvalue())
    assert [r.payload_meta.extra_data.get("archive") for r in response.results] == [
        None,
        "gzip",
        "tar",
    ]
    assert response.results[2].payload_meta.extra_data["filename"] == "inside/notes.txt"
    assert response.results[2].workers[0]["hash"]["md5"] == hashlib.md5(b"notes").hexdigest()
    assert not response.errors
