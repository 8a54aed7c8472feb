"""The mimetype worker: libmagic's answer for real file formats."""

from __future__ import annotations

import io
import struct
import zipfile
import zlib

import pytest

from stoq import Payload, RequestMeta, Stoq, StoqPluginException


def _png() -> bytes:
    """A valid 1x1 grey PNG."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)
    pixels = zlib.compress(b"\x00\x80")
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels)
        + chunk(b"IEND", b"")
    )  # fmt: skip


def _elf_executable() -> bytes:
    """A 64-bit little-endian x86-64 ELF header of type EXEC, then padding."""
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
    header = ident + struct.pack(
        "<HHIQQQIHHHHHH", 2, 0x3E, 1, 0x401000, 64, 0, 0, 64, 56, 0, 64, 0, 0
    )
    return header + bytes(512)


def _zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("readme.txt", "hello " * 100)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (_png(), "image/png"),
        (_elf_executable(), "application/x-executable"),
        (_zip(), "application/zip"),
        (b"plain words\n", "text/plain"),
    ],
    ids=["png", "elf", "zip", "text"],
)
def test_mimetype_of_real_formats(load, content, expected):
    response = load("mimetype").scan(Payload(content), RequestMeta())
    assert response.results == {"mimetype": expected}


def test_only_the_first_bytes_are_looked_at(load):
    # Text first, a PNG after the bound: libmagic never sees the PNG.
    content = b"just text\n" * 10 + _png()
    response = load("mimetype", max_bytes="50").scan(Payload(content), RequestMeta())
    assert response.results == {"mimetype": "text/plain"}


def test_bad_max_bytes_is_rejected_at_load(load):
    with pytest.raises(StoqPluginException) as info:
        load("mimetype", max_bytes="lots")
    assert str(info.value) == (
        "plugin mimetype: option max_bytes='lots' is not a valid size: "
        "expected a size such as 1048576 or 100M"
    )


def test_mimetype_through_stoq_scan():
    response = Stoq(always_dispatch=["mimetype"]).scan(_png())
    assert response.results[0].workers[0]["mimetype"] == {"mimetype": "image/png"}
