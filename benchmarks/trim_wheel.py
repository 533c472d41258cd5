"""Shrink onnxruntime-gpu's wheel for one GPU generation, for machines reached through an upload limit.

    python benchmarks/trim_wheel.py WHEEL SM        e.g. SM = 90 for an H100/H200, 80 for an A100

onnxruntime-gpu 1.31.1's wheel is 255 MB, ~220 MB of it the CUDA provider's
kernels for six GPU generations (sm_75, 80, 86, 89, 90, 120), stored in the
library's ``.nv_fatbin`` section. This zeroes the machine code of every
generation but ``SM`` (the entries' headers stay, so the CUDA runtime still
reads the section and picks the one left), and writes the wheel again,
LZMA-compressed (pip reads it): the zeros cost nothing (sm_90 kept: ~70 MB). A GPU of another
generation then finds no kernel ("no kernel image is available"). Only for
benchmark machines; never for a wheel anyone installs for real.
"""

from __future__ import annotations

import struct
import sys
import zipfile
from pathlib import Path

FATBIN_MAGIC = 0xBA55ED50
PROVIDER = "onnxruntime/capi/libonnxruntime_providers_cuda.so"


def elf_section(data: bytes, name: str) -> tuple:
    """(offset, size) of the ELF64 little-endian section ``name``."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError("not a 64-bit little-endian ELF file")
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names_at = sections[shstrndx][4]
    for name_at, _, _, _, offset, size in sections:
        end = data.index(b"\0", names_at + name_at)
        if data[names_at + name_at : end].decode() == name:
            return offset, size
    raise ValueError(f"no {name} section")


def trim_fatbins(section: bytearray, keep_sm: int) -> dict:
    """Zero, in place, the payload of every fatbin entry not for ``keep_sm``; returns bytes kept/zeroed by sm.

    A fatbin section is a run of containers (magic, version, header size, size of
    the entries that follow), 8-byte aligned; each entry has its own header (kind,
    version, header size, payload size, ..., the sm at byte 28) then its payload.
    """
    stats: dict = {}
    pos = 0
    while pos + 16 <= len(section):
        magic, _, header, size = struct.unpack_from("<IHHQ", section, pos)
        if magic != FATBIN_MAGIC:
            pos += 8  # padding between containers
            continue
        entry, end = pos + header, pos + header + size
        if end > len(section):
            raise ValueError(f"fatbin container at {pos} runs past the section's end")
        while entry < end:
            _, _, entry_header, payload = struct.unpack_from("<HHIQ", section, entry)
            sm = struct.unpack_from("<I", section, entry + 28)[0]
            start = entry + entry_header
            if sm != keep_sm:
                section[start : start + payload] = bytes(payload)
            stats[sm] = stats.get(sm, 0) + payload
            entry = start + payload
        if entry != end:
            raise ValueError(f"fatbin container at {pos} does not end where its header says")
        pos = end
    if keep_sm not in stats:
        raise ValueError(f"no kernels for sm_{keep_sm} in this library (it has {sorted(stats)})")
    return stats


def trim_wheel(wheel: Path, keep_sm: int) -> dict:
    """Rewrite ``wheel`` in place with the CUDA provider's other generations zeroed (via a temporary file)."""
    tmp = wheel.with_name(wheel.name + ".partial")
    try:
        stats = None
        with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(tmp, "w", zipfile.ZIP_LZMA) as out:
            for info in source.infolist():
                data = source.read(info)
                if info.filename == PROVIDER:
                    data = bytearray(data)
                    offset, size = elf_section(data, ".nv_fatbin")
                    section = data[offset : offset + size]
                    stats = trim_fatbins(section, keep_sm)
                    data[offset : offset + size] = section
                out.writestr(info, bytes(data), compress_type=zipfile.ZIP_LZMA)
        if stats is None:
            raise ValueError(f"{wheel} has no {PROVIDER}: is it onnxruntime-gpu's wheel?")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(wheel)
    return stats


def main() -> None:
    usage = __doc__.split("\n\n")[1].strip()
    if len(sys.argv) != 3 or not sys.argv[2].isdigit():
        sys.exit(f"usage: {usage}")
    wheel, sm = Path(sys.argv[1]), int(sys.argv[2])
    try:
        before = wheel.stat().st_size
        stats = trim_wheel(wheel, sm)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        sys.exit(f"trim_wheel: {wheel}: {exc}")
    kept = ", ".join(f"sm_{k} {v / 1e6:.0f} MB" + (" (kept)" if k == sm else "") for k, v in sorted(stats.items()))
    print(f"{wheel.name}: {before / 1e6:.0f} -> {wheel.stat().st_size / 1e6:.0f} MB; kernels {kept}")


if __name__ == "__main__":
    main()
