"""Reading a Go module before building it: go.mod directives, vendoring, the main package.

Nothing here runs go; these checks exist to fail fast with a clear message, and to refuse
``replace`` directives that would read outside the upload.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Final

from fnserver.protocol import BuildError, InvalidArgumentError

__all__ = [
    "GoMod",
    "check_module",
    "find_main_package",
    "find_module_root",
    "not_vendored_message",
    "package_clause",
    "package_name",
    "parse_go_mod",
]

# A directory name we are willing to pass to go as ./cmd/<name>: no pattern characters.
_SAFE_DIR_RE: Final = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]*$")


@dataclass
class GoMod:
    """The parts of go.mod the builder checks."""

    module: str | None = None
    requires: list[str] = field(default_factory=list)
    # (old module, new path or module) for each replace directive.
    replaces: list[tuple[str, str]] = field(default_factory=list)


def _strip_comment(line: str) -> str:
    # go.mod has only // line comments; quoted strings with // are rare enough to ignore here,
    # go itself re-parses the file and has the final word.
    i = line.find("//")
    return line[:i] if i >= 0 else line


def _unquote(tok: str) -> str:
    if len(tok) >= 2 and tok[0] == tok[-1] and tok[0] in "\"`":
        return tok[1:-1]
    return tok


def parse_go_mod(text: str) -> GoMod:
    """Parse module, require and replace directives (single-line and block forms)."""
    mod = GoMod()
    block: str | None = None
    for raw in text.splitlines():
        line = _strip_comment(raw).strip()
        if not line:
            continue
        if block is not None:
            if line == ")":
                block = None
                continue
            _directive(mod, block, line)
            continue
        verb, _, rest = line.partition(" ")
        rest = rest.strip()
        if rest == "(":
            block = verb
            continue
        if rest.endswith("(") and rest[:-1].strip() == "":
            block = verb
            continue
        _directive(mod, verb, rest)
    return mod


def _directive(mod: GoMod, verb: str, rest: str) -> None:
    toks = [_unquote(t) for t in rest.split()]
    if not toks:
        return
    if verb == "module":
        mod.module = toks[0]
    elif verb == "require":
        mod.requires.append(toks[0])
    elif verb == "replace" and "=>" in toks:
        i = toks.index("=>")
        if i >= 1 and i + 1 < len(toks):
            mod.replaces.append((toks[0], toks[i + 1]))


def find_module_root(src: Path) -> Path:
    """go.mod at the archive root, or inside its single top-level folder."""
    if (src / "go.mod").is_file():
        return src
    entries = [p for p in src.iterdir()]
    if len(entries) == 1 and entries[0].is_dir() and (entries[0] / "go.mod").is_file():
        return entries[0]
    raise InvalidArgumentError(
        "no go.mod found: put go.mod at the root of the zip, or inside a single top-level folder"
    )


def _is_local_path(target: str) -> bool:
    # Go's rule: a replacement is a directory when it is a relative ./ ../ path or absolute.
    return (
        target.startswith(("./", "../", "/", ".\\", "..\\"))
        or target in (".", "..")
        or (len(target) > 1 and target[1] == ":")
    )


def check_module(root: Path, mod: GoMod) -> bool:
    """Refuse escaping replaces and fail fast on unvendored requirements.

    Returns True when the module is vendored (vendor/modules.txt exists).
    """
    for old, new in mod.replaces:
        if not _is_local_path(new):
            continue
        norm = posixpath.normpath(new)
        if "\\" in new or new.startswith("/") or (len(new) > 1 and new[1] == ":") \
                or norm == ".." or norm.startswith("../"):
            raise InvalidArgumentError(
                f"go.mod: replace {old} => {new} points outside the uploaded module; "
                "only directories inside the archive may be used",
                {"replace": old, "target": new},
            )
    modules_txt = root / "vendor" / "modules.txt"
    vendored: set[str] = set()
    if modules_txt.is_file():
        for line in modules_txt.read_text("utf-8", "replace").splitlines():
            if line.startswith("# "):
                toks = line[2:].split()
                if toks:
                    vendored.add(toks[0])
    has_vendor = modules_txt.is_file()
    # Without vendor/, a requirement replaced by a folder inside the archive needs no download;
    # with vendor/, go wants every requirement listed in modules.txt.
    local_replaced = {old for old, new in mod.replaces if _is_local_path(new)}
    for req in mod.requires:
        if req in vendored or (not has_vendor and req in local_replaced):
            continue
        raise BuildError(not_vendored_message(req), {"log": "", "dependency": req})
    return has_vendor


def not_vendored_message(dep: str) -> str:
    """The one message for a dependency the server cannot fetch."""
    return (
        f"dependency {dep} is not vendored; run `go mod vendor` before zipping "
        "(the server has no network)"
    )


def package_name(path: Path) -> str | None:
    """The package clause of a Go source file, skipping comments; None if unreadable or absent.

    Linear in the file's size and stops at the clause: it reads the file in chunks and never
    looks past the package name (a regex that strips ``/* ... */`` lazily was quadratic on
    ``"/*a" * N``, MEASURED.md). Only the first ``MAX_PREAMBLE`` bytes are read: a clause
    behind more comments than that is not found (None), which bounds the work at ~20 ms
    whatever the upload holds.
    """
    try:
        with open(path, "rb") as f:
            return package_clause(_head(f, MAX_PREAMBLE + _MAX_IDENT + len(b"package ")))
    except OSError:
        return None


def _head(f: BinaryIO, limit: int) -> Iterator[bytes]:
    while limit > 0 and (chunk := f.read(min(_READ_CHUNK, limit))):
        limit -= len(chunk)
        yield chunk


#: How far into a Go file its package clause is looked for. Sources put licence headers and
#: build constraints there, a few KiB; a file of a million tiny comments costs sre ~60 ns each.
MAX_PREAMBLE: Final = 1024 * 1024
_READ_CHUNK: Final = 64 * 1024
#: A package name longer than this is not worth reading further: go itself will refuse or
#: accept the file, and a hostile "identifier" must not make the scan buffer it whole.
_MAX_IDENT: Final = 1024
# White space and whole comments, in one C-speed match: a file of a million short comments
# must not cost a million trips through Python. Each alternative starts differently and the
# lazy part only looks for the end of the comment it is in, so a match is linear; possessive
# repeats keep sre from saving a backtracking point per comment (5x faster). A comment cut by
# the end of the window is left to skip_blank's slow path.
_BLANK_RE: Final = re.compile(rb"(?:[ \t\r\n]++|//[^\n]*+\n|(?s:/\*.*?\*/))*+")
_KEYWORD_RE: Final = re.compile(rb"package(?![A-Za-z0-9_\x80-\xff])")
_IDENT_RE: Final = re.compile(rb"[A-Za-z_\x80-\xff][A-Za-z0-9_\x80-\xff]*")
_BOM: Final = b"\xef\xbb\xbf"


class _Scanner:
    """A forward-only window over chunks of bytes: what is behind ``pos`` is dropped, so
    memory stays at one chunk plus the token being read, and every byte is looked at a bounded
    number of times (each search resumes where the last one stopped)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self.buf = b""
        self.pos = 0
        self.eof = False

    def fill(self) -> bool:
        """Append the next chunk (dropping what was consumed); False at the end of input."""
        if self.eof:
            return False
        for chunk in self._chunks:
            if chunk:
                self.buf = self.buf[self.pos :] + chunk
                self.pos = 0
                return True
        self.eof = True
        return False

    def want(self, n: int) -> bytes:
        """At least ``n`` bytes from ``pos`` (fewer only at the end of input), without copying
        more than the window."""
        while len(self.buf) - self.pos < n and self.fill():
            pass
        return self.buf[self.pos : self.pos + n]

    def skip_past(self, token: bytes) -> bool:
        """Move past the next ``token``; False when the input ends first."""
        while True:
            i = self.buf.find(token, self.pos)
            if i >= 0:
                self.pos = i + len(token)
                return True
            # Keep only a possible partial token at the end, then read on.
            self.pos = max(self.pos, len(self.buf) - len(token) + 1)
            if not self.fill():
                return False

    def skip_blank(self) -> bool:
        """Skip white space and comments (Go: a comment acts like white space); False at the
        end of input or inside an unterminated comment."""
        while True:
            end = _BLANK_RE.match(self.buf, self.pos)
            assert end is not None  # the pattern matches the empty string
            self.pos = end.end()
            head = self.want(2)
            if not head:
                return False
            if head == b"//":
                if not self.skip_past(b"\n"):
                    return False
            elif head == b"/*":
                self.pos += 2
                if not self.skip_past(b"*/"):
                    return False
            elif head[:1] in b" \t\r\n":
                continue
            else:
                return True

    def take(self, pattern: re.Pattern[bytes], limit: int) -> bytes | None:
        """The match of ``pattern`` at ``pos`` within ``limit`` bytes (None when absent, or
        when it might run past ``limit``), and move past it."""
        window = self.want(limit + 1)
        m = pattern.match(window)
        if m is None or (m.end() > limit and not self.eof):
            return None
        self.pos += m.end()
        return m.group()


def package_clause(chunks: Iterable[bytes]) -> str | None:
    """The package name of Go source arriving as ``chunks``, or None if it has none.

    The Go specification puts the package clause first: before it there can only be a byte
    order mark, white space and comments (``//`` and ``/* */``; build constraints are comments
    too). So nothing else has to be understood, strings and raw strings included: they can only
    come after the clause, and the scan stops at the clause. Linear in the input, whatever it
    holds (an unterminated comment is read once, to its end).
    """
    src = _Scanner(iter(chunks))
    if src.want(len(_BOM)) == _BOM:
        src.pos += len(_BOM)
    if not src.skip_blank() or src.take(_KEYWORD_RE, len(b"package")) is None:
        return None
    if not src.skip_blank():
        return None
    name = src.take(_IDENT_RE, _MAX_IDENT)
    return name.decode("utf-8", "replace") if name is not None else None


def _has_main(directory: Path) -> bool:
    for f in directory.glob("*.go"):
        if f.name.endswith("_test.go") or not f.is_file():
            continue
        if package_name(f) == "main":
            return True
    return False


def find_main_package(root: Path) -> str:
    """The package argument for go build: "." or "./cmd/<x>"."""
    if _has_main(root):
        return "."
    cmd = root / "cmd"
    candidates = sorted(
        d.name for d in cmd.iterdir() if d.is_dir() and _has_main(d)
    ) if cmd.is_dir() else []
    if not candidates:
        raise InvalidArgumentError(
            "no main package: put package main at the module root or in one cmd/<name> folder"
        )
    if len(candidates) > 1:
        raise InvalidArgumentError(
            f"several main packages under cmd/: {', '.join(candidates)}; upload one",
            {"candidates": candidates},
        )
    name = candidates[0]
    if not _SAFE_DIR_RE.match(name) or "..." in name:
        raise InvalidArgumentError(f"unsupported folder name cmd/{name!r}")
    return f"./cmd/{name}"
