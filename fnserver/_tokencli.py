"""``fnserver token add|list|revoke``: manage the auth file (``fnserver/auth.py``).

``add`` prints the new token alone on stdout (so ``TOKEN=$(fnserver token add acme deployer)``
works) and says what it did on stderr; it is shown this once and never stored. Exit codes:
0 done, 1 no such token (``revoke``), 2 a usage or auth-file problem.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .auth import AuthFileError, add_token, load, revoke_token
from .service import ROLES

__all__ = ["token_main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fnserver token",
        description="Create, list and revoke the tokens clients present in HELLO. Each token "
        "belongs to one tenant and has one role: admin (every tenant), deployer (register, "
        "alias, delete, invoke, read in its tenant) or invoker (invoke and read in its tenant).",
    )
    common = argparse.ArgumentParser(add_help=False)
    # No defaults: unset, they come from FNSERVER_* and --config as the server's do (_where).
    common.add_argument("--data-dir", type=Path, default=None, help="the server's data directory (default ./functions); the auth file is auth.toml in it")
    common.add_argument("--auth-file", type=Path, default=None, help="the auth file (default <data-dir>/auth.toml)")
    common.add_argument("--config", type=Path, default=None, metavar="FILE", help="the server's configuration file: its data_dir and auth_file apply (FNSERVER_DATA_DIR and FNSERVER_AUTH_FILE over it, the flags over both)")
    sub = p.add_subparsers(dest="command", required=True, metavar="{add,list,revoke}")
    add = sub.add_parser("add", parents=[common], help="create a token and print it (once)")
    add.add_argument("tenant", help="the tenant the token acts for")
    add.add_argument("role", choices=ROLES, help="what the token may do")
    add.add_argument("--description", default="", help="a note shown by 'token list'")
    add.add_argument("--json", action="store_true", help='print {"id", "token", "tenant", "role"} as JSON')
    ls = sub.add_parser("list", parents=[common], help="show tokens (ids, never the tokens)")
    ls.add_argument("--json", action="store_true", help="print a JSON array")
    rv = sub.add_parser("revoke", parents=[common], help="remove a token; it stops working at once")
    rv.add_argument("id", help="the token's id (from 'token list')")
    return p


def token_main(argv: list[str]) -> int:
    """Run one ``fnserver token`` command; return its exit code."""
    a = _parser().parse_args(argv)
    path = _where(a.data_dir, a.auth_file, a.config)
    try:
        if a.command == "add":
            record, token = add_token(path, a.tenant, a.role, a.description)
            if a.json:
                print(json.dumps({"id": record.id, "token": token, "tenant": record.tenant, "role": record.role}))
            else:
                print(token)
            print(
                f"created token {record.id} for tenant '{record.tenant}', role {record.role}, in {path}."
                " It is shown only this once; clients send it with --token or FN_TOKEN.",
                file=sys.stderr,
            )
            return 0
        if a.command == "list":
            tokens = load(path).tokens
            if a.json:
                print(json.dumps([t.public() for t in tokens]))
                return 0
            if not tokens:
                print(f"no tokens in {path}: the server accepts connections without one (loopback only)")
                return 0
            rows = [("ID", "TENANT", "ROLE", "CREATED", "DESCRIPTION")]
            rows += [(t.id, t.tenant, t.role, t.created, t.description) for t in tokens]
            widths = [max(len(r[i]) for r in rows) for i in range(4)]
            for r in rows:
                print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[4])
            return 0
        gone = revoke_token(path, a.id)
        if gone is None:
            print(f"fnserver token: no token with id {a.id!r} in {path} (see 'fnserver token list')", file=sys.stderr)
            return 1
        print(f"revoked token {gone.id} (tenant '{gone.tenant}', role {gone.role}); it is refused from now on")
        return 0
    except AuthFileError as exc:
        print(f"fnserver token: {path}: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"fnserver token: {path}: {exc.strerror or exc}", file=sys.stderr)
        return 2


def _where(data_dir: Path | None, auth_file: Path | None, config: Path | None) -> Path:
    """The auth file the server would use: these flags, else what ``fnserver`` itself would
    take from ``FNSERVER_*`` and ``--config`` (a bad file exits 2, as the server does)."""
    from .__main__ import parse_command

    server = parse_command(["--config", str(config)] if config is not None else []).config
    if auth_file is not None:
        return auth_file
    if data_dir is not None:
        return data_dir / "auth.toml"
    return server.auth_path
