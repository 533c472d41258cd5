"""benchmarks/trim_wheel.py: the fatbin walk that keeps one GPU generation's kernels (for upload-limited GPU runs)."""

from __future__ import annotations

import struct
import sys
import zipfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from trim_wheel import FATBIN_MAGIC, PROVIDER, elf_section, trim_fatbins, trim_wheel  # noqa: E402


def _entry(sm: int, payload: bytes) -> bytes:
    header = bytearray(64)  # kind, version, header size, payload size ... sm at byte 28
    struct.pack_into("<HHIQ", header, 0, 2, 0x101, len(header), len(payload))
    struct.pack_into("<I", header, 28, sm)
    return bytes(header) + payload


def _container(*entries: bytes) -> bytes:
    body = b"".join(entries)
    return struct.pack("<IHHQ", FATBIN_MAGIC, 1, 16, len(body)) + body


def test_only_the_kept_generations_payloads_remain():
    section = bytearray(
        _container(_entry(80, b"\x11" * 24), _entry(90, b"\x22" * 40))
        + bytes(8)  # padding between containers
        + _container(_entry(120, b"\x33" * 16), _entry(90, b"\x44" * 8))
    )
    before = bytes(section)
    stats = trim_fatbins(section, 90)
    assert stats == {80: 24, 90: 48, 120: 16}
    assert len(section) == len(before)
    assert b"\x22" * 40 in section and b"\x44" * 8 in section
    assert b"\x11" not in section and b"\x33" not in section
    assert section.count(FATBIN_MAGIC.to_bytes(4, "little")) == 2  # headers kept


def test_a_generation_the_library_lacks_or_a_broken_container_is_refused():
    with pytest.raises(ValueError, match="no kernels for sm_90.*\\[80\\]"):
        trim_fatbins(bytearray(_container(_entry(80, b"\x11" * 8))), 90)
    broken = bytearray(_container(_entry(90, b"\x22" * 8)))
    struct.pack_into("<Q", broken, 8, 100)  # the container claims more than the section holds
    with pytest.raises(ValueError, match="runs past the section"):
        trim_fatbins(broken, 90)
    short = bytearray(_container(_entry(90, b"\x22" * 8)) + bytes(64))
    struct.pack_into("<Q", short, 8, 40)  # its entry (72 bytes) ends after the container (40)
    with pytest.raises(ValueError, match="does not end where its header says"):
        trim_fatbins(short, 90)


def test_elf_section_finds_a_section_by_name():
    names = b"\0.text\0.nv_fatbin\0.shstrtab\0"
    body = b"CODE" + b"FATBIN!!"
    names_at, shoff = 64 + len(body), 64 + len(body) + len(names)
    header = bytearray(64)
    header[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", header, 0x28, shoff)
    struct.pack_into("<HHH", header, 0x3A, 64, 4, 3)

    def section(name_at, offset, size):
        entry = bytearray(64)
        struct.pack_into("<IIQQQQ", entry, 0, name_at, 1, 0, 0, offset, size)
        return bytes(entry)

    data = (
        bytes(header)
        + body
        + names
        + bytes(64)
        + section(1, 64, 4)
        + section(7, 68, 8)
        + section(18, names_at, len(names))
    )
    assert elf_section(data, ".nv_fatbin") == (68, 8)
    assert data[68:76] == b"FATBIN!!"
    with pytest.raises(ValueError, match="no .data section"):
        elf_section(data, ".data")
    with pytest.raises(ValueError, match="not a 64-bit"):
        elf_section(b"MZ" + data[2:], ".nv_fatbin")


def test_a_wheel_without_the_cuda_provider_is_refused_and_left_as_it_was(tmp_path):
    wheel = tmp_path / "onnxruntime-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("onnxruntime/__init__.py", "")
    before = wheel.read_bytes()
    with pytest.raises(ValueError, match=f"has no {PROVIDER}"):
        trim_wheel(wheel, 90)
    assert wheel.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [wheel.name]
    broken = tmp_path / "broken.whl"
    broken.write_bytes(b"not a zip")
    with pytest.raises(zipfile.BadZipFile):
        trim_wheel(broken, 90)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([wheel.name, broken.name])
