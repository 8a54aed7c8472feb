"""Bounded readers for the archive formats of the ``decompress`` worker.

Each reader yields members as ``(name, chunks, compressed_size, extra)`` where ``chunks``
is a lazy iterator of decompressed bytes of at most ``CHUNK`` each: the caller stops
pulling when a limit is hit, and nothing past that point is ever decompressed. No call
here asks a decompressor for an unbounded amount of output.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import struct
import tarfile
import zipfile
import zlib
from dataclasses import dataclass, field
from typing import IO, Any, Callable, Dict, Iterator, List, Optional

CHUNK = 1 << 20

# Magic bytes, checked in this order; tar's "ustar" sits at offset 257.
_MAGIC = (
    ("zip", 0, (b"PK\x03\x04", b"PK\x05\x06")),
    ("gzip", 0, (b"\x1f\x8b\x08",)),
    ("bzip2", 0, tuple(b"BZh" + bytes([d]) for d in b"123456789")),
    ("xz", 0, (b"\xfd7zXZ\x00",)),
    ("tar", 257, (b"ustar\x00", b"ustar ")),
)

# What a corrupt or truncated archive raises from the stdlib readers.
CORRUPT = (
    OSError,
    EOFError,
    zlib.error,
    lzma.LZMAError,
    zipfile.BadZipFile,
    tarfile.TarError,
    struct.error,
    ValueError,
)


def detect(content: bytes) -> Optional[str]:
    """The archive format of ``content`` by its magic bytes, or None."""
    for name, offset, magics in _MAGIC:
        if any(content.startswith(magic, offset) for magic in magics):
            return name
    return None


@dataclass
class Member:
    """One member about to be read: its name, lazy bytes and what the archive says."""

    name: Optional[str]
    chunks: Iterator[bytes]
    compressed_size: int
    declared_size: Optional[int] = None  # what the archive claims (zip headers)
    extra: Dict[str, Any] = field(default_factory=dict)


# -- single-stream formats ------------------------------------------------------------

_STREAM_OPENERS: Dict[str, Callable[[IO[bytes]], Any]] = {
    "gzip": lambda raw: gzip.GzipFile(fileobj=raw, mode="rb"),
    "bzip2": lambda raw: bz2.BZ2File(raw, mode="rb"),
    "xz": lambda raw: lzma.LZMAFile(raw, mode="rb"),
}


class StreamReader:
    """gzip, bzip2 or xz: one member, the whole decompressed stream.

    ``consumed()`` tells how many compressed bytes were read so far, so the caller can
    judge the compression ratio while the stream is still being expanded.
    """

    def __init__(self, fmt: str, content: bytes) -> None:
        self.fmt = fmt
        self.content = content
        self._raw = io.BytesIO(content)

    def consumed(self) -> int:
        return max(1, self._raw.tell())

    def members(self) -> Iterator[Member]:
        name = gzip_name(self.content) if self.fmt == "gzip" else None
        yield Member(name, self._chunks(), len(self.content))

    def _chunks(self) -> Iterator[bytes]:
        # The stdlib readers ask their decompressor for at most the size requested.
        with _STREAM_OPENERS[self.fmt](self._raw) as stream:
            while chunk := stream.read(CHUNK):
                yield chunk


def gzip_name(content: bytes) -> Optional[str]:
    """The original file name stored in a gzip header (FNAME), if any."""
    flags = content[3] if len(content) > 3 else 0
    if not flags & 0x08:
        return None
    pos = 10
    if flags & 0x04:  # FEXTRA comes first: a 2-byte length and that many bytes
        if len(content) < 12:
            return None
        pos += 2 + int.from_bytes(content[10:12], "little")
    end = content.find(b"\x00", pos, pos + 4096)
    if end < 0:
        return None
    return content[pos:end].decode("latin-1")  # RFC 1952: ISO 8859-1


# -- zip ------------------------------------------------------------------------------


class ZipReader:
    """Members of a zip archive, opened with a password when they are encrypted."""

    def __init__(self, content: bytes) -> None:
        self.content = content
        self.archive = zipfile.ZipFile(io.BytesIO(content))

    def entries(self) -> List[zipfile.ZipInfo]:
        return [info for info in self.archive.infolist() if not info.is_dir()]

    def member(self, info: zipfile.ZipInfo, password: Optional[str]) -> Member:
        extra: Dict[str, Any] = {}
        if info.flag_bits & 0x1:
            extra["encrypted"] = True
        if info.compress_type in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            chunks = self._zipfile_chunks(info, password)
        elif info.flag_bits & 0x1:
            raise zipfile.BadZipFile(
                f"encrypted members compressed with method {info.compress_type} are not supported"
            )
        elif info.compress_type in (zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA):
            chunks = self._raw_chunks(info)
        else:
            raise zipfile.BadZipFile(f"compression method {info.compress_type} is not supported")
        return Member(info.filename, chunks, info.compress_size, info.file_size, extra)

    def _zipfile_chunks(self, info: zipfile.ZipInfo, password: Optional[str]) -> Iterator[bytes]:
        # zipfile bounds deflate output to the size asked for and never returns more
        # than the header's file_size; its CRC check catches a header that lies.
        pwd = password.encode("utf-8") if password is not None else None
        with self.archive.open(info, pwd=pwd) as handle:
            while chunk := handle.read(CHUNK):
                yield chunk

    def _raw_chunks(self, info: zipfile.ZipInfo) -> Iterator[bytes]:
        # zipfile hands bzip2 and lzma members whole 4 KiB compressed blocks to
        # decompress() with no output limit: a few KiB of bzip2 can expand to GiB.
        # These members are decompressed here from the raw bytes, output bounded.
        raw = self._raw_data(info)
        if info.compress_type == zipfile.ZIP_BZIP2:
            decompressor: Any = bz2.BZ2Decompressor()
        else:
            decompressor, raw = _zip_lzma(raw)
        crc, produced = 0, 0
        data: Any = raw
        while True:
            chunk = decompressor.decompress(data, CHUNK)
            data = b""
            if chunk:
                crc = zlib.crc32(chunk, crc)
                produced += len(chunk)
                if produced > info.file_size:
                    raise zipfile.BadZipFile("member is larger than its header says")
                yield chunk
            if decompressor.eof or (decompressor.needs_input and produced == info.file_size):
                break
            if decompressor.needs_input:
                raise EOFError("compressed data ends before the member does")
        if produced != info.file_size or crc != info.CRC:
            raise zipfile.BadZipFile("CRC or size mismatch")

    def _raw_data(self, info: zipfile.ZipInfo) -> memoryview:
        offset = info.header_offset
        header = self.content[offset : offset + 30]
        if len(header) != 30 or not header.startswith(b"PK\x03\x04"):
            raise zipfile.BadZipFile("bad local file header")
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        start = offset + 30 + name_len + extra_len
        return memoryview(self.content)[start : start + info.compress_size]


def _zip_lzma(raw: memoryview) -> Any:
    """An LZMA decompressor for a zip member: zip stores a 4-byte header and the
    5-byte LZMA properties before the raw LZMA1 data (APPNOTE 5.8.8)."""
    props_size = struct.unpack("<H", raw[2:4])[0]
    props = bytes(raw[4 : 4 + props_size])
    if len(props) < 5:
        raise zipfile.BadZipFile("truncated LZMA properties")
    first, dict_size = props[0], int.from_bytes(props[1:5], "little")
    pb, rest = divmod(first, 45)
    lp, lc = divmod(rest, 9)
    lzma_filter = {"id": lzma.FILTER_LZMA1, "lc": lc, "lp": lp, "pb": pb, "dict_size": dict_size}
    decompressor = lzma.LZMADecompressor(lzma.FORMAT_RAW, filters=[lzma_filter])
    return decompressor, raw[4 + props_size :]


# -- tar ------------------------------------------------------------------------------


class TarReader:
    """Regular files of an uncompressed tar; links, devices, fifos and sparse files are
    skipped (a compressed tar arrives here after its gzip/bzip2/xz layer is removed)."""

    def __init__(self, content: bytes) -> None:
        self.archive = tarfile.open(fileobj=io.BytesIO(content), mode="r:")

    def entries(self) -> Iterator[tarfile.TarInfo]:
        """Every entry but directories, read lazily (see ``skip_reason``)."""
        for info in self.archive:
            if not info.isdir():
                yield info

    def member(self, info: tarfile.TarInfo) -> Member:
        return Member(info.name, self._chunks(info), info.size, info.size, {"mode": info.mode})

    def _chunks(self, info: tarfile.TarInfo) -> Iterator[bytes]:
        handle = self.archive.extractfile(info)
        if handle is None:
            return
        with handle:
            while chunk := handle.read(CHUNK):
                yield chunk


def tar_skip_reason(info: tarfile.TarInfo) -> Optional[str]:
    """Why a tar entry is not extracted, or None for a regular file."""
    if info.issym():
        return f"symbolic link to {info.linkname}"
    if info.islnk():
        return f"hard link to {info.linkname}"
    if info.ischr() or info.isblk():
        return "device"
    if info.isfifo():
        return "fifo"
    if info.isdir():
        return "directory"
    if info.issparse():
        # A sparse member can claim any size while storing almost nothing.
        return "sparse file"
    if not info.isreg():
        return "not a regular file"
    return None
