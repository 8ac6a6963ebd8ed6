"""Upload kinds, and the header checks for prebuilt uploads (wasm modules, ELF executables)."""

from __future__ import annotations

import platform
import struct
from typing import Final

from fnserver.protocol import InvalidArgumentError

__all__ = ["KINDS", "check_elf", "check_wasm", "detect_kind", "validate_kind"]

KINDS: Final = ("wasm", "wat", "go", "go-module", "c", "zig", "native")

_SUFFIX_KIND: Final = {".wasm": "wasm", ".wat": "wat", ".go": "go", ".zip": "go-module", ".c": "c", ".zig": "zig"}

_WASM_HEADER: Final = b"\0asm\x01\x00\x00\x00"

# e_machine values (elf.h) for the architectures platform.machine() reports.
_EM_BY_NAME: Final = {
    3: "i386",
    8: "mips",
    20: "ppc",
    21: "ppc64",
    22: "s390x",
    40: "arm",
    62: "x86_64",
    183: "aarch64",
    243: "riscv64",
    258: "loongarch64",
}
_MACHINE_ALIASES: Final = {
    "amd64": "x86_64",
    "arm64": "aarch64",
    "i686": "i386",
    "i586": "i386",
    "armv7l": "arm",
    "armv6l": "arm",
    "ppc64le": "ppc64",
}
_ET_NAMES: Final = {0: "no file type", 1: "relocatable object", 2: "executable", 3: "shared object",
                    4: "core dump"}


def detect_kind(filename: str) -> str:
    """The kind an upload's file name implies; anything unrecognised is a native executable."""
    lower = filename.lower()
    for suffix, kind in _SUFFIX_KIND.items():
        if lower.endswith(suffix):
            return kind
    return "native"


def validate_kind(kind: str) -> str:
    """Return ``kind`` if it is one of :data:`KINDS`, else refuse it."""
    if kind not in KINDS:
        raise InvalidArgumentError(
            f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}", {"kinds": list(KINDS)}
        )
    return kind


def check_wasm(head: bytes) -> None:
    """Refuse anything that does not start like a binary WebAssembly module, version 1."""
    if head[:8] != _WASM_HEADER:
        if head[:4] == b"\0asm":
            raise InvalidArgumentError("not a WebAssembly module: unsupported binary version")
        raise InvalidArgumentError(f"not a WebAssembly module: starts with {_describe(head)}")


def host_machine() -> str:
    """This machine's architecture, in the names :data:`_EM_BY_NAME` uses."""
    machine = platform.machine().lower()
    return _MACHINE_ALIASES.get(machine, machine)


def check_elf(head: bytes) -> None:
    """Refuse anything but an ELF executable (or PIE) for this machine's architecture.

    ``head`` is at least the first 64 bytes of the file (an ELF64 header is 64 bytes).
    """
    if head[:4] != b"\x7fELF":
        raise InvalidArgumentError(f"not an ELF executable: {_what_is(head)}")
    if len(head) < 20:
        raise InvalidArgumentError("not an ELF executable: truncated ELF header")
    ei_class, ei_data = head[4], head[5]
    if ei_class not in (1, 2) or ei_data not in (1, 2):
        raise InvalidArgumentError("not an ELF executable: corrupt ELF identification")
    e_type, e_machine = struct.unpack("<HH" if ei_data == 1 else ">HH", head[16:20])
    arch = _EM_BY_NAME.get(e_machine, f"machine {e_machine}")
    host = host_machine()
    if arch != host:
        raise InvalidArgumentError(f"ELF for {arch}, this server runs {host}")
    if e_type not in (2, 3):
        name = _ET_NAMES.get(e_type, f"type {e_type}")
        raise InvalidArgumentError(f"not an ELF executable: the ELF file is a {name}")


def _what_is(head: bytes) -> str:
    """A short human description of a file that is not ELF, from its first bytes."""
    if head.startswith(b"#!"):
        line = head[2:].split(b"\n", 1)[0].strip()[:60].decode("utf-8", "replace")
        return f"starts with '#!' (a script for {line})" if line else "starts with '#!' (a script)"
    if head[:4] == b"\0asm":
        return "it is a WebAssembly module (name it .wasm or pass kind='wasm')"
    if head[:2] == b"MZ":
        return "it is a Windows (PE) executable"
    if head[:4] in (b"\xcf\xfa\xed\xfe", b"\xce\xfa\xed\xfe", b"\xfe\xed\xfa\xcf", b"\xca\xfe\xba\xbe"):
        return "it is a macOS (Mach-O) executable"
    if head[:4] == b"PK\x03\x04":
        return "it is a zip archive (name it .zip for a Go module)"
    if not head:
        return "the file is empty"
    return f"starts with {_describe(head)}"


def _describe(head: bytes) -> str:
    return repr(head[:8])
