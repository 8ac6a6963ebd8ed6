"""``fnserver --config FILE``: every option from a TOML file, ``FNSERVER_*`` over it, flags over both.

The options are the command line's own: a key is a long flag's name with underscores
(``--data-dir`` is ``data_dir``), its type the flag's. This module reads the file and the
environment into argparse defaults, so that a flag on the command line still wins, and writes
the effective configuration back as TOML (``--print-config``), loadable with ``--config``.
"""

from __future__ import annotations

import argparse
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import tomli_w

__all__ = ["ConfigError", "Option", "defaults_from", "options_of", "to_toml"]

#: Environment variables that look like options but are not: the shared secret is read by
#: name where it is used, never as a flag (a flag would show in /proc/PID/cmdline).
_NOT_OPTIONS: Final = frozenset({"token", "config", "print_config"})
_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off", ""})


class ConfigError(Exception):
    """A configuration file or variable the operator must fix: the message says which."""


@dataclass(frozen=True, slots=True)
class Option:
    """One configurable option: its key (the flag's dest), flag and value type."""

    key: str
    flag: str
    kind: type  # bool, int, float, str or Path
    choices: tuple[str, ...] | None = None


def options_of(parser: argparse.ArgumentParser) -> dict[str, Option]:
    """The options a configuration may set: every visible long flag of ``parser``."""
    found: dict[str, Option] = {}
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or action.dest in _NOT_OPTIONS or not action.option_strings:
            continue
        if isinstance(action, argparse._HelpAction | argparse._VersionAction):
            continue
        flag = max(action.option_strings, key=len)
        if isinstance(action, argparse._StoreTrueAction):
            kind: type = bool
        elif action.type in (int, float, Path):
            kind = action.type  # type: ignore[assignment]
        else:
            kind = str
        found[action.dest] = Option(action.dest, flag, kind, tuple(action.choices) if action.choices else None)
    return found


def _check(option: Option, value: Any, where: str) -> Any:
    """``value`` as the option's type, or ConfigError naming ``where``."""
    kind = option.kind
    ok = (
        (kind is bool and isinstance(value, bool))
        or (kind is int and isinstance(value, int) and not isinstance(value, bool))
        or (kind is float and isinstance(value, int | float) and not isinstance(value, bool))
        or (kind in (str, Path) and isinstance(value, str))
    )
    if not ok:
        name = {bool: "true or false", int: "an integer", float: "a number", str: "a string", Path: "a path string"}[kind]
        raise ConfigError(f"{where}: '{option.key}' must be {name}, got {value!r}")
    if option.choices is not None and value not in option.choices:
        raise ConfigError(f"{where}: '{option.key}' must be one of {', '.join(option.choices)}, got {value!r}")
    if kind is Path:
        return Path(value)
    if kind is float:
        return float(value)
    return value


def _from_text(option: Option, text: str, where: str) -> Any:
    """An environment variable's text as the option's type."""
    if option.kind is bool:
        if text.strip().lower() in _TRUE:
            return True
        if text.strip().lower() in _FALSE:
            return False
        raise ConfigError(f"{where}: must be 1/true/yes or 0/false/no, got {text!r}")
    if option.kind in (int, float):
        try:
            return _check(option, option.kind(text), where)
        except ValueError:
            raise ConfigError(f"{where}: must be {'an integer' if option.kind is int else 'a number'}, got {text!r}") from None
    return _check(option, text, where)


def defaults_from(options: Mapping[str, Option], config_file: Path | None,
                  environ: Mapping[str, str]) -> dict[str, Any]:
    """Values from ``config_file`` (TOML), then ``FNSERVER_<KEY>`` variables over them."""
    values: dict[str, Any] = {}
    if config_file is not None:
        try:
            doc = tomllib.loads(config_file.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read {config_file}: {exc.strerror}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{config_file} is not valid TOML: {exc}") from None
        for key, value in doc.items():
            option = options.get(key)
            if option is None:
                near = [k for k in options if k.split("_")[0] == key.split("_")[0]][:3]
                hint = f" (did you mean {', '.join(near)}?)" if near else ""
                raise ConfigError(f"{config_file}: unknown option '{key}'{hint}; keys are the flags' names with underscores")
            values[key] = _check(option, value, str(config_file))
    for key, option in options.items():
        name = f"FNSERVER_{key.upper()}"
        if name in environ:
            values[key] = _from_text(option, environ[name], name)
    return values


def to_toml(options: Mapping[str, Option], ns: argparse.Namespace) -> str:
    """The effective options as a TOML document (unset options as comments)."""
    doc: dict[str, Any] = {}
    unset: list[str] = []
    for key in options:
        value = getattr(ns, key, None)
        if value is None:
            unset.append(key)
        else:
            doc[key] = str(value) if isinstance(value, Path) else value
    text = "# fnserver's effective configuration (fnserver --print-config)\n" + tomli_w.dumps(doc)
    if unset:
        text += "\n# Not set (their defaults apply):\n" + "".join(f"# {key} =\n" for key in unset)
    return text


def environ() -> Mapping[str, str]:
    """The process environment (a seam for tests)."""
    return os.environ
