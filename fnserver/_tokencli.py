"""``fnserver token add|list|revoke|import`` and ``fnserver tenant set|list``: manage tokens and
tenant quotas where the server keeps them: its auth file (``fnserver/auth.py``), or the
registry's database when it has one (``fnserver/_authpg.py``).

``token add`` prints the new token alone on stdout (so ``TOKEN=$(fnserver token add acme
deployer)`` works) and says what it did on stderr; it is shown this once and never stored.
Exit codes: 0 done, 1 no such token (``revoke``), 2 a usage problem, a bad auth file or an
unreachable database.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

from .auth import AuthEditor, AuthFileError, FileAuthEditor, editor_for, limits_doc, load
from .config import ServerConfig, TenantLimits
from .service import ROLES

__all__ = ["tenant_main", "token_main"]


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    # No defaults: unset, they come from FNSERVER_* and --config as the server's do (_editor).
    common.add_argument("--data-dir", type=Path, default=None, help="the server's data directory (default ./functions); the auth file is auth.toml in it")
    common.add_argument("--auth-file", type=Path, default=None, help="the auth file (default <data-dir>/auth.toml)")
    common.add_argument("--registry", default=None, metavar="URL", help="edit the tokens of the nodes sharing this PostgreSQL registry (postgresql://USER@HOST:PORT/DB) instead of an auth file")
    common.add_argument("--config", type=Path, default=None, metavar="FILE", help="the server's configuration file: its data_dir, auth_file and registry apply (FNSERVER_* variables over it, the flags over both)")
    return common


def _token_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fnserver token",
        description="Create, list and revoke the tokens clients present in HELLO. Each token "
        "belongs to one tenant and has one role: admin (every tenant), deployer (register, "
        "alias, delete, invoke, read in its tenant) or invoker (invoke and read in its tenant).",
    )
    common = _common()
    sub = p.add_subparsers(dest="command", required=True, metavar="{add,list,revoke,import}")
    add = sub.add_parser("add", parents=[common], help="create a token and print it (once)")
    add.add_argument("tenant", help="the tenant the token acts for")
    add.add_argument("role", choices=ROLES, help="what the token may do")
    add.add_argument("--description", default="", help="a note shown by 'token list'")
    add.add_argument("--json", action="store_true", help='print {"id", "token", "tenant", "role"} as JSON')
    ls = sub.add_parser("list", parents=[common], help="show tokens (ids, never the tokens)")
    ls.add_argument("--json", action="store_true", help="print a JSON array")
    rv = sub.add_parser("revoke", parents=[common], help="remove a token; it stops working at once")
    rv.add_argument("id", help="the token's id (from 'token list')")
    im = sub.add_parser(
        "import", parents=[common],
        help="copy the tokens and tenant quotas of an auth file (moving a server to a shared registry)",
    )
    im.add_argument("file", type=Path, help="the auth file to copy from; tokens whose id and tenants already present are kept as they are")
    return p


def _tenant_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fnserver tenant",
        description="Show and set the quotas of single tenants, over the --tenant-max-* defaults "
        "(OPERATIONS.md \"Quotas\"). A running server applies a change from its next request; "
        "with --registry, every node as soon as the database notifies it.",
    )
    common = _common()
    sub = p.add_subparsers(dest="command", required=True, metavar="{set,list}")
    st = sub.add_parser("set", parents=[common], help="set a tenant's quotas (the ones not given keep the defaults)")
    st.add_argument("name", help="the tenant")
    st.add_argument("--max-functions", type=int, default=None, metavar="N", help="functions the tenant may have")
    st.add_argument("--max-versions", type=int, default=None, metavar="N", help="versions one of its functions may keep")
    st.add_argument("--max-storage-mb", type=int, default=None, metavar="N", help="MiB of uploads and artifacts it may store")
    st.add_argument("--max-concurrency", type=int, default=None, metavar="N", help="its invocations running at once, server-wide")
    st.add_argument("--max-rps", type=float, default=None, metavar="N", help="its invocations per second, server-wide")
    st.add_argument("--max-builds", type=int, default=None, metavar="N", help="its registers building at once")
    ls = sub.add_parser("list", parents=[common], help="show the tenants that have quotas of their own")
    ls.add_argument("--json", action="store_true", help='print {"tenant": {"max_...": N}} as JSON')
    return p


def token_main(argv: list[str]) -> int:
    """Run one ``fnserver token`` command; return its exit code."""
    a = _token_parser().parse_args(argv)
    editor = _editor(a.data_dir, a.auth_file, a.registry, a.config)
    try:
        if a.command == "add":
            record, token = editor.add_token(a.tenant, a.role, a.description)
            if a.json:
                print(json.dumps({"id": record.id, "token": token, "tenant": record.tenant, "role": record.role}))
            else:
                print(token)
            print(
                f"created token {record.id} for tenant '{record.tenant}', role {record.role}, in {editor.where}."
                " It is shown only this once; clients send it with --token or FN_TOKEN.",
                file=sys.stderr,
            )
            return 0
        if a.command == "list":
            tokens = editor.load().tokens
            if a.json:
                print(json.dumps([t.public() for t in tokens]))
                return 0
            if not tokens:
                print(f"no tokens in {editor.where}: the server accepts connections without one (loopback only)")
                return 0
            rows = [("ID", "TENANT", "ROLE", "CREATED", "DESCRIPTION")]
            rows += [(t.id, t.tenant, t.role, t.created, t.description) for t in tokens]
            widths = [max(len(r[i]) for r in rows) for i in range(4)]
            for r in rows:
                print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[4])
            return 0
        if a.command == "import":
            if isinstance(editor, FileAuthEditor) and editor.path.absolute() == a.file.absolute():
                print("fnserver token import: that is the file the tokens are kept in already", file=sys.stderr)
                return 2
            try:
                incoming = load(a.file)
            except AuthFileError as exc:
                print(f"fnserver token: {a.file}: {exc}", file=sys.stderr)
                return 2
            copied, tenants = editor.merge(incoming)
            print(
                f"copied {copied} of {len(incoming.tokens)} token(s) and {tenants} of"
                f" {len(incoming.tenants)} tenant(s) from {a.file} to {editor.where}"
                " (the others were there already)"
            )
            return 0
        gone = editor.revoke_token(a.id)
        if gone is None:
            print(f"fnserver token: no token with id {a.id!r} in {editor.where} (see 'fnserver token list')", file=sys.stderr)
            return 1
        print(f"revoked token {gone.id} (tenant '{gone.tenant}', role {gone.role}); {_applies(editor)}")
        return 0
    except AuthFileError as exc:
        print(f"fnserver token: {editor.where}: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"fnserver token: {editor.where}: {exc.strerror or exc}", file=sys.stderr)
        return 2


def tenant_main(argv: list[str]) -> int:
    """Run one ``fnserver tenant`` command; return its exit code."""
    p = _tenant_parser()
    a = p.parse_args(argv)
    editor = _editor(a.data_dir, a.auth_file, a.registry, a.config)
    try:
        if a.command == "set":
            given = {f.name: getattr(a, f.name) for f in fields(TenantLimits)}
            for key, value in given.items():
                if value is not None and (value < 0 or (key == "max_rps" and value == 0)):
                    p.error(f"--{key.replace('_', '-')} must be {'more than 0' if key == 'max_rps' else '0 or more'}")
            limits = TenantLimits(**given)
            editor.set_tenant(a.name, limits)
            shown = ", ".join(f"{k}={v}" for k, v in limits_doc(limits).items()) or "the defaults only"
            print(f"tenant '{a.name}': {shown}, in {editor.where}; {_applies(editor)}")
            return 0
        tenants = editor.load().tenants
        if a.json:
            print(json.dumps({name: limits_doc(lim) for name, lim in tenants.items()}))
            return 0
        if not tenants:
            print(f"no tenant has quotas of its own in {editor.where}: the --tenant-max-* defaults apply to all")
            return 0
        for name, lim in sorted(tenants.items()):
            print(f"{name}  " + "  ".join(f"{k}={v}" for k, v in limits_doc(lim).items()))
        return 0
    except AuthFileError as exc:
        print(f"fnserver tenant: {editor.where}: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"fnserver tenant: {editor.where}: {exc.strerror or exc}", file=sys.stderr)
        return 2


def _applies(editor: AuthEditor) -> str:
    if isinstance(editor, FileAuthEditor):
        return "the server applies it from its next request"
    return "every node applies it as soon as the database tells it (milliseconds)"


def _editor(data_dir: Path | None, auth_file: Path | None, registry: str | None, config: Path | None) -> AuthEditor:
    """Where the server keeps its tokens: these flags, else what ``fnserver`` itself would take
    from ``FNSERVER_*`` and ``--config`` (a bad file exits 2, as the server does)."""
    from .__main__ import parse_command

    if registry is not None:
        if not registry.startswith(("postgresql://", "postgres://")):
            print("fnserver: --registry must be a PostgreSQL URL: postgresql://USER@HOST:PORT/DB", file=sys.stderr)
            sys.exit(2)
        return editor_for(ServerConfig(registry=registry))
    if auth_file is not None:
        return FileAuthEditor(auth_file)
    if data_dir is not None:
        return FileAuthEditor(data_dir / "auth.toml")
    server = parse_command(["--config", str(config)] if config is not None else []).config
    return editor_for(server)

