"""The ``tillwire`` command line.

Subcommands::

    tillwire serve  [--config PATH] [--host H] [--port P] [--data-dir D]
                    [--admin-port N] [--redis URL] [--workers N] [--log-level L]
    tillwire token  --tenant T --store S [--region R] --terminal ID
                    --role ROLE [--role ROLE ...] [--member M] [--ttl 1d] [--config PATH]
                    [--provision [--admin URL]]
    tillwire config (--print | --keys) [--config PATH]
    tillwire backup --out FILE [--data-dir D] [--config PATH]
    tillwire restore --from FILE [--data-dir D] [--config PATH]
    tillwire term   --token T [--config PATH] [--host H] [--port P] [--tls-ca FILE] ...
    tillwire send   KIND --to ADDRESS --body JSON [--config PATH] [--admin URL] ...

``--config`` defaults to ``$TILLWIRE_CONFIG``; every subcommand reads the
same file and ``TILLWIRE_*`` variables (``term`` its server address and
TLS, ``send`` the admin API's).  Exit codes: 0 success, 1 a runtime failure
(``serve`` that cannot start says why in one line naming the key:
``tillwire: cannot start: server.port: 127.0.0.1:7070 is already in use...``),
2 a usage or configuration error (the message names the key:
``tillwire: config error: server.port: ...``).
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import os
import sys
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any, TextIO

import orjson
from tillwire.core.errors import ConfigError, StartupError

from tillwire import __version__

from .auth import ROLES, issue_token, verify_token
from .config import NON_CONFIG_ENV, SECRET_ENV, Config, describe_keys, load_config, parse_duration

__all__ = ["build_parser", "main"]

CONFIG_ENV = "TILLWIRE_CONFIG"
"""Default of ``--config`` (listed in ``config.NON_CONFIG_ENV``)."""

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


def _positive_duration(text: str) -> float:
    """argparse type of ``--ttl``: a duration > 0 (``3600``, ``"30m"``, ``"1d"``)."""
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return seconds


def _add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", metavar="PATH", default=None,
        help=f"TOML config file (default: ${CONFIG_ENV}, else none)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="tillwire",
        description="Tillwire: the connection server for a retail chain's terminals.",
    )
    parser.add_argument("--version", action="version", version=f"tillwire {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the server",
                           description="Run the server.  Flags override the config file and the environment.")
    _add_config_option(serve)
    # Flag values stay text: the loader parses them like environment values,
    # so a bad value gets the same message naming its key.
    serve.add_argument("--host", help="server.host: address of the terminal listener")
    serve.add_argument("--port", help="server.port: port of the terminal listener")
    serve.add_argument("--data-dir", metavar="DIR", help="server.data_dir: state directory")
    serve.add_argument("--admin-port", metavar="PORT", help="admin.port: admin API port (0 = disabled)")
    serve.add_argument("--redis", metavar="URL",
                       help="redis.url: the fleet's Redis (store, presence, routing, history)")
    serve.add_argument("--workers", metavar="N",
                       help="server.workers: worker processes sharing the ports (more than 1 needs --redis)")
    serve.add_argument("--log-level", metavar="LEVEL", help="log.level: debug, info, warning or error")
    serve.set_defaults(handler=_cmd_serve)

    token = sub.add_parser("token", help="issue a terminal access token",
                           description="Issue a terminal access token signed with auth.secret "
                                       f"(config file or {SECRET_ENV}).  The token is the last line of stdout.")
    _add_config_option(token)
    token.add_argument("--tenant", required=True, help="tenant (retail chain) id")
    token.add_argument("--store", required=True, help="store id")
    token.add_argument("--region", default="", help="region id (default: none)")
    token.add_argument("--terminal", required=True, metavar="ID", help="terminal id")
    token.add_argument("--role", dest="roles", action="append", required=True, choices=ROLES,
                       help="a role of the terminal; repeat for several")
    token.add_argument("--member", default="", help="loyalty member id of a customer app (default: none)")
    token.add_argument("--ttl", type=_positive_duration, default=None,
                       help="lifetime: seconds or e.g. 30m, 12h, 1d (default: auth.default_ttl)")
    token.add_argument("--provision", action="store_true",
                       help="also make the terminal known to the server (POST /v1/terminals) "
                            "so P0/P1 messages to it wait for its first login instead of being "
                            "refused UNKNOWN_TERMINAL")
    token.add_argument("--admin", metavar="URL", default=None,
                       help="with --provision: the admin API (default: admin.host:admin.port "
                            "of the config)")
    token.set_defaults(handler=_cmd_token)

    config = sub.add_parser("config", help="show the configuration",
                            description="Show the effective configuration or the table of keys.")
    _add_config_option(config)
    what = config.add_mutually_exclusive_group(required=True)
    what.add_argument("--print", dest="print_config", action="store_true",
                      help="print the effective configuration as JSON (secrets masked)")
    what.add_argument("--keys", action="store_true",
                      help="print every key with its environment variable, default and meaning")
    config.set_defaults(handler=_cmd_config)

    backup = sub.add_parser("backup", help="copy the sqlite store, also while the server runs",
                            description="Write a consistent copy of the sqlite store "
                                        "(<data-dir>/tillwire.db) to FILE.  Safe while a server "
                                        "is writing to it; the copy is a single file.")
    _add_config_option(backup)
    backup.add_argument("--data-dir", metavar="DIR", help="server.data_dir: state directory")
    backup.add_argument("--out", metavar="FILE", required=True,
                        help="the copy to write (replaced atomically if it exists)")
    backup.set_defaults(handler=_cmd_backup)

    restore = sub.add_parser("restore", help="put a backup in place of a stopped server's store",
                             description="Replace the sqlite store (<data-dir>/tillwire.db) of a "
                                         "stopped server with a copy made by tillwire backup.  "
                                         "The database there is moved to <data-dir>/"
                                         "before-restore-<time>/, not deleted; the restored "
                                         "store gets new epochs so terminals that got further "
                                         "than the backup start over from it.")
    _add_config_option(restore)
    restore.add_argument("--data-dir", metavar="DIR", help="server.data_dir: state directory")
    restore.add_argument("--from", dest="source", metavar="FILE", required=True,
                         help="the copy made by tillwire backup")
    restore.set_defaults(handler=_cmd_restore)
    term = sub.add_parser("term", help="an interactive terminal simulator",
                          description="Connect as a terminal, show incoming messages by lane "
                                      "and send tickets, chat and any message (type help).  "
                                      "The server's address and TLS come from the same config "
                                      "file and TILLWIRE_* variables as serve; flags override.")
    _add_config_option(term)
    term.add_argument("--token", required=True, help="the terminal's token (tillwire token)")
    term.add_argument("--host", help="server address (default: server.host; 127.0.0.1 for a "
                                     "wildcard)")
    term.add_argument("--port", type=int, help="terminal port (default: server.port)")
    term.add_argument("--state", metavar="FILE", help="resume state file (default: none)")
    term.add_argument("--auto-ack", action="store_true",
                      help="acknowledge each message when the next one arrives")
    term.add_argument("--no-colour", action="store_true", help="plain text output")
    term.add_argument("--tls-ca", metavar="FILE",
                      help="connect with TLS, trusting this CA (default: TLS with the system's "
                           "CAs when tls.cert is set, else plaintext)")
    term.set_defaults(handler=_cmd_term)

    send = sub.add_parser("send", help="publish a message through the admin API",
                          description="POST /v1/publish on the admin API.  The API's address "
                                      "comes from the same config file and TILLWIRE_* variables "
                                      "as serve (admin.host, admin.port), the token from "
                                      "$TILLWIRE_ADMIN_TOKEN or the config's [[admin.tokens]].")
    _add_config_option(send)
    send.add_argument("kind", help="the message kind, e.g. price.update")
    send.add_argument("--to", required=True, help="address, e.g. store:acme/s1")
    send.add_argument("--body", required=True, help="the body, a JSON object")
    send.add_argument("--lane", help="P0-P3 (default: the kind's lane)")
    send.add_argument("--ttl", help="time to live, e.g. 10m")
    send.add_argument("--key", help="P2 conflation key (default: derived from the body)")
    send.add_argument("--ref", type=int, help="idempotency key: a resend is not delivered twice")
    send.add_argument("--admin", metavar="URL",
                      help="admin API base URL (default: http://<admin.host>:<admin.port>)")
    send.set_defaults(handler=_cmd_send)
    return parser


def _local_host(host: str) -> str:
    """Where a client on this machine reaches a server bound to ``host``."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def _cmd_term(args: argparse.Namespace, env: Mapping[str, str], out: TextIO, err: TextIO) -> int:
    import ssl as _ssl

    import uvloop
    from tillwire.client.term import run

    cfg = _load(args, env)
    host = args.host or _local_host(cfg.server.host)
    port = args.port if args.port is not None else cfg.server.port
    if args.tls_ca:
        try:
            ctx = _ssl.create_default_context(cafile=args.tls_ca)
        except (OSError, _ssl.SSLError) as exc:
            print(f"tillwire: error: --tls-ca {args.tls_ca}: cannot load a CA from it: "
                  f"{getattr(exc, 'strerror', None) or exc}", file=err)
            return EXIT_USAGE
    else:
        ctx = _ssl.create_default_context() if cfg.tls.cert else None
    return uvloop.run(run(host, port, args.token, state_path=args.state,
                          auto_ack=args.auto_ack, colour=not args.no_colour and out.isatty(),
                          ssl=ctx, err=err))


def _admin_token(cfg: Config) -> str:
    """The token TILLWIRE_ADMIN_TOKEN added (named "env"), else the config's token
    for every tenant, else its first."""
    tokens = cfg.admin.tokens
    for chosen in ([t for t in tokens if t.name == "env"], [t for t in tokens if t.tenants == ("*",)],
                   list(tokens)):
        if chosen:
            return chosen[0].token
    return ""


def _admin_base(cfg: Config, admin: str | None, err: TextIO) -> tuple[str, str] | None:
    """(admin API URL, admin token) for a command that calls the admin API;
    None (the reason printed) when either is missing."""
    token = _admin_token(cfg)
    if not token:
        print("tillwire: error: no admin token: set TILLWIRE_ADMIN_TOKEN or list "
              "[[admin.tokens]] in the config file", file=err)
        return None
    if admin:
        return admin, token
    if not cfg.admin.port:
        print("tillwire: error: the admin API is off (admin.port = 0): set admin.port "
              "(TILLWIRE_ADMIN_PORT) or give --admin URL", file=err)
        return None
    host = _local_host(cfg.admin.host)
    return f"http://{f'[{host}]' if ':' in host else host}:{cfg.admin.port}", token


def _admin_post(base: str, token: str, path: str, doc: dict, out: TextIO | None,
                err: TextIO) -> int:
    """POST ``doc`` to the admin API; the answer to ``out``; an exit status."""
    import urllib.error
    import urllib.request

    req = urllib.request.Request(
        base.rstrip("/") + path, data=orjson.dumps(doc), method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            answer = resp.read().decode()
            if out is not None:
                out.write(answer + "\n")
            return EXIT_OK
    except urllib.error.HTTPError as exc:
        print(f"tillwire: error: {exc.code} {exc.read().decode('utf-8', 'replace')}", file=err)
        return EXIT_FAILURE
    except (urllib.error.URLError, OSError) as exc:
        print(f"tillwire: error: cannot reach {base}: {exc}", file=err)
        return EXIT_FAILURE


def _cmd_send(args: argparse.Namespace, env: Mapping[str, str], out: TextIO, err: TextIO) -> int:
    cfg = _load(args, env)
    found = _admin_base(cfg, args.admin, err)
    if found is None:
        return EXIT_USAGE
    base, token = found
    try:
        body = orjson.loads(args.body)
    except orjson.JSONDecodeError as exc:
        print(f"tillwire: error: --body is not JSON: {exc}", file=err)
        return EXIT_USAGE
    request = {"to": args.to, "kind": args.kind, "body": body}
    if args.lane:
        request["lane"] = args.lane
    if args.ttl:
        try:
            request["ttl"] = parse_duration(args.ttl)
        except ValueError as exc:
            print(f"tillwire: error: --ttl: {exc}", file=err)
            return EXIT_USAGE
    if args.key:
        request["key"] = args.key
    if args.ref is not None:
        request["ref"] = args.ref
    return _admin_post(base, token, "/v1/publish", request, out, err)


def _load(args: argparse.Namespace, env: Mapping[str, str],
          overrides: Mapping[str, object] | None = None) -> Config:
    path = args.config if args.config is not None else (env.get(CONFIG_ENV) or None)
    return load_config(path, env=env, overrides=overrides)


def _cmd_serve(args: argparse.Namespace, env: Mapping[str, str], out: TextIO, err: TextIO) -> int:
    cfg = _load(args, env, {
        "server.host": args.host,
        "server.port": args.port,
        "server.data_dir": args.data_dir,
        "admin.port": args.admin_port,
        "redis.url": args.redis,
        "server.workers": args.workers,
        "log.level": args.log_level,
    })
    cfg.require_secret()
    try:
        # Imported here so the other subcommands work without the server.
        from tillwire.server.main import serve
    except ModuleNotFoundError as exc:
        if exc.name != "tillwire.server.main":
            raise
        print("tillwire: error: the server is not available (tillwire.server.main is missing)", file=err)
        return EXIT_FAILURE
    try:
        result = serve(cfg)
        if inspect.isawaitable(result):
            result = asyncio.run(result)
    except KeyboardInterrupt:
        return 130
    return result if isinstance(result, int) else EXIT_OK


def _utc(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _cmd_token(args: argparse.Namespace, env: Mapping[str, str], out: TextIO, err: TextIO) -> int:
    cfg = _load(args, env)
    secret = cfg.require_secret()
    ttl = args.ttl if args.ttl is not None else cfg.auth.default_ttl
    try:
        token = issue_token(
            secret, tenant=args.tenant, store=args.store, region=args.region, terminal=args.terminal,
            roles=args.roles, member=args.member, ttl=ttl,
        )
    except ValueError as exc:
        print(f"tillwire: error: {exc}", file=err)
        return EXIT_USAGE
    # Verifying what we just signed is cheap and gives the claims to describe.
    claims = verify_token(secret, token, now=None, leeway=cfg.auth.clock_skew)
    details = [f"store={claims.store}"]
    if claims.region:
        details.append(f"region={claims.region}")
    details.append(f"roles={','.join(claims.roles)}")
    if claims.member:
        details.append(f"member={claims.member}")
    print(f"tillwire: token for {claims.address} ({' '.join(details)}), "
          f"expires {_utc(claims.expires_at)}", file=err)
    if args.provision:
        found = _admin_base(cfg, args.admin, err)
        if found is None:
            return EXIT_USAGE
        doc = {"tenant": claims.tenant, "id": claims.terminal, "store": claims.store,
               "roles": list(claims.roles)}
        if claims.region:
            doc["region"] = claims.region
        if claims.member:
            doc["member"] = claims.member
        status = _admin_post(*found, "/v1/terminals", doc, None, err)
        if status != EXIT_OK:
            return status               # (no token for a terminal the server does not know)
        print(f"tillwire: {claims.address} provisioned at {found[0]}", file=err)
    print(token, file=out)
    return EXIT_OK


def _toml_value(value: Any) -> str:
    """A default as it would be written in the TOML file."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return orjson.dumps(value).decode()
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return str(value)


def _format_keys() -> str:
    header = ("KEY", "ENVIRONMENT", "DEFAULT", "DESCRIPTION")
    rows = [header] + [(key, env, _toml_value(default), doc) for key, env, default, doc in describe_keys()]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths)) + "  " + row[3]
             for row in rows]
    lines.append("")
    lines.append("Other environment variables:")
    others = {SECRET_ENV: "alias of TILLWIRE_AUTH_SECRET", **NON_CONFIG_ENV}
    width = max(len(name) for name in others)
    lines.extend(f"  {name.ljust(width)}  {doc}" for name, doc in others.items())
    return "\n".join(lines)


def _cmd_config(args: argparse.Namespace, env: Mapping[str, str], out: TextIO, err: TextIO) -> int:
    if args.keys:
        print(_format_keys(), file=out)
        return EXIT_OK
    cfg = _load(args, env)
    print(orjson.dumps(cfg.to_dict(mask_secrets=True), option=orjson.OPT_INDENT_2).decode(), file=out)
    return EXIT_OK


def _cmd_backup(args: argparse.Namespace, env: Mapping[str, str], out: TextIO, err: TextIO) -> int:
    cfg = _load(args, env, {"server.data_dir": args.data_dir})
    import sqlite3

    from .store_sqlite import DB_FILENAME
    from .store_sqlite_backup import backup_file

    source = os.path.join(cfg.server.data_dir, DB_FILENAME)
    try:
        backup_file(source, args.out)
    except (OSError, sqlite3.Error) as exc:
        print(f"tillwire: error: backup failed: {exc}", file=err)
        return EXIT_FAILURE
    print(f"tillwire: backup of {source} written to {args.out} "
          f"({os.path.getsize(args.out)} bytes)", file=err)
    return EXIT_OK


def _cmd_restore(args: argparse.Namespace, env: Mapping[str, str], out: TextIO, err: TextIO) -> int:
    cfg = _load(args, env, {"server.data_dir": args.data_dir})
    import sqlite3

    from .store_sqlite import DB_FILENAME
    from .store_sqlite_backup import StoreInUse, restore_file

    if cfg.store.backend != "sqlite":
        print(f"tillwire: error: store.backend is {cfg.store.backend}: restore puts back a copy "
              "of the sqlite store (a Redis store comes back from Redis's own persistence, "
              "docs/redis.md)", file=err)
        return EXIT_USAGE
    target = os.path.join(cfg.server.data_dir, DB_FILENAME)
    if not os.path.isfile(args.source):
        print(f"tillwire: error: --from {args.source}: no such file", file=err)
        return EXIT_USAGE
    try:
        os.makedirs(cfg.server.data_dir, exist_ok=True)
        aside = restore_file(args.source, target)
    except StoreInUse as exc:
        print(f"tillwire: error: restore refused: {exc}", file=err)
        return EXIT_FAILURE
    except (OSError, sqlite3.Error) as exc:
        print(f"tillwire: error: restore failed: {exc}", file=err)
        return EXIT_FAILURE
    kept = f"; the database before is in {aside}" if aside else ""
    print(f"tillwire: {args.source} restored to {target}{kept}", file=err)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (never raises SystemExit)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors
        return exc.code if isinstance(exc.code, int) else (EXIT_OK if exc.code is None else EXIT_USAGE)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return args.handler(args, os.environ, sys.stdout, sys.stderr)
    except ConfigError as exc:
        print(f"tillwire: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except StartupError as exc:
        # One line naming the cause and the key to change, not a traceback.
        print(f"tillwire: cannot start: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except BrokenPipeError:
        # The reader went away (`tillwire config --keys | head`): no traceback,
        # and no second error when the interpreter flushes stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILURE
