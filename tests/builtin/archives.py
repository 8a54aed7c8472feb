"""Archive builders the stdlib lacks: raw zip records, ZipCrypto encryption, and
deflate streams of zeros built block by block (a 1 GiB bomb in well under a second)."""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass
from typing import List, Tuple

DEFLATED = 8


@dataclass
class RawMember:
    """A zip member given as already-compressed bytes and what its headers claim."""

    name: str
    data: bytes
    crc: int
    size: int
    method: int = DEFLATED
    flags: int = 0


def raw_zip(members: List[RawMember]) -> bytes:
    """A zip archive from ``members``, headers written as given (they may lie)."""
    out = bytearray()
    central = bytearray()
    for member in members:
        name = member.name.encode()
        offset = len(out)
        common = struct.pack(
            "<HHHHHIIIH",
            20, member.flags, member.method, 0, 0x21,
            member.crc, len(member.data), member.size, len(name),
        )  # fmt: skip
        out += b"PK\x03\x04" + common + struct.pack("<H", 0) + name + member.data
        central += (
            b"PK\x01\x02" + struct.pack("<H", 20) + common
            + struct.pack("<HHHHII", 0, 0, 0, 0, 0, offset) + name
        )  # fmt: skip
    start = len(out)
    out += central
    out += b"PK\x05\x06" + struct.pack(
        "<HHHHIIH", 0, 0, len(members), len(members), len(central), start, 0
    )
    return bytes(out)


def deflate(data: bytes) -> bytes:
    """Raw deflate (no zlib header), as zip stores it."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    return compressor.compress(data) + compressor.flush()


def zero_deflate(mib: int) -> Tuple[bytes, int]:
    """Raw deflate of ``mib`` MiB of zeros and their CRC-32, built without compressing
    ``mib`` MiB: after a full flush the compressor forgets its history, so every
    1 MiB block of zeros compresses to the same bytes and can be repeated."""
    zeros = bytes(1 << 20)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = compressor.compress(zeros) + compressor.flush(zlib.Z_FULL_FLUSH)
    tail = compressor.flush()  # the final, empty block
    crc = 0
    for _ in range(mib):
        crc = zlib.crc32(zeros, crc)
    return block * mib + tail, crc


def gzip_wrap(raw_deflate: bytes, crc: int, size: int) -> bytes:
    """A gzip file around a raw deflate stream (RFC 1952)."""
    header = b"\x1f\x8b\x08\x00" + b"\x00" * 4 + b"\x02\xff"
    return header + raw_deflate + struct.pack("<II", crc, size & 0xFFFFFFFF)


def _crc_update(crc: int, byte: int) -> int:
    # PKWARE's key update is one raw CRC-32 table step, without zlib's pre/post inversion.
    return zlib.crc32(bytes([byte]), crc ^ 0xFFFFFFFF) ^ 0xFFFFFFFF


def zipcrypto_member(name: str, plain: bytes, password: str) -> RawMember:
    """A deflated member encrypted with traditional PKWARE encryption (APPNOTE 6.1),
    which Python's zipfile can read but not write."""
    keys = [0x12345678, 0x23456789, 0x34567890]

    def update(byte: int) -> None:
        keys[0] = _crc_update(keys[0], byte)
        keys[1] = ((keys[1] + (keys[0] & 0xFF)) * 134775813 + 1) & 0xFFFFFFFF
        keys[2] = _crc_update(keys[2], keys[1] >> 24)

    for byte in password.encode():
        update(byte)
    crc = zlib.crc32(plain)
    # 11 random bytes, then the CRC's high byte: the reader's one-byte password check.
    header = os.urandom(11) + bytes([crc >> 24])
    encrypted = bytearray()
    for byte in header + deflate(plain):
        temp = (keys[2] | 2) & 0xFFFF
        encrypted.append(byte ^ (((temp * (temp ^ 1)) >> 8) & 0xFF))
        update(byte)
    return RawMember(name, bytes(encrypted), crc, len(plain), flags=0x1)
