"""Reading a Go module before building it: go.mod directives, vendoring, the main package.

Nothing here runs go; these checks exist to fail fast with a clear message, and to refuse
``replace`` directives that would read outside the upload.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from fnserver.protocol import BuildError, InvalidArgumentError

__all__ = [
    "GoMod",
    "check_module",
    "find_main_package",
    "find_module_root",
    "not_vendored_message",
    "package_name",
    "parse_go_mod",
]

_PACKAGE_RE: Final = re.compile(r"^\s*package\s+([A-Za-z_][A-Za-z0-9_]*)", re.MULTILINE)
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
    """The package clause of a Go source file, skipping comments; None if unreadable."""
    try:
        text = path.read_text("utf-8", "replace")
    except OSError:
        return None
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.DOTALL)
    text = re.sub(r"//[^\n]*", "", text)
    m = _PACKAGE_RE.search(text)
    return m.group(1) if m else None


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
