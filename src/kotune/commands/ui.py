"""``kotune ui [RUNS_DIR] [--port N] [--host H] [--config FILE ...]``: runs, data, launcher and chat in a browser."""

from __future__ import annotations

import secrets
from pathlib import Path

from kotune.config import ConfigError

DEFAULT_HOST = "127.0.0.1"


def register(sub) -> None:
    p = sub.add_parser("ui", help="a local web page: runs with live curves, data preview, launch and stop, chat")
    p.add_argument(
        "runs_dir", nargs="?", default="outputs", metavar="RUNS_DIR", help="folder of runs (default outputs)"
    )
    p.add_argument("--port", type=int, default=8470, help="port to listen on (default 8470)")
    p.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help=f"address to bind (default {DEFAULT_HOST}); any other needs the token printed at start",
    )
    p.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="FILE",
        help="a config the page may open, preview and launch (repeatable)",
    )
    p.set_defaults(run=run)


def run(args) -> int:
    try:
        import uvicorn

        from kotune.ui.server import LOOPBACK, create_app
    except ImportError as exc:
        raise ConfigError(f"kotune ui needs its extra ({exc.name} is missing): pip install 'kotune[ui]'") from None
    root = Path(args.runs_dir)
    root.mkdir(parents=True, exist_ok=True)
    configs = [Path(c) for c in args.config]
    for config in configs:
        if not config.is_file():
            raise ConfigError(f"--config {config}: no such file")
    token = None if args.host in LOOPBACK else secrets.token_urlsafe(24)
    where = f"http://{args.host}:{args.port}/"
    if token is None:
        print(f"kotune ui: {root.resolve()} at {where}", flush=True)
    else:
        print(f"kotune ui: {root.resolve()} at {where} ({show_token(root, where, token)})", flush=True)
    # uvicorn's access log would record `/?token=...`: it stays off
    uvicorn.run(create_app(root, configs, token), host=args.host, port=args.port, access_log=False, log_level="warning")
    return 0


TOKEN_FILE = "token"
"""Under ``RUNS_DIR/.kotune-ui/``: the address with its token, for a server whose output goes to a file."""


def show_token(root: Path, where: str, token: str) -> str:
    """Where to find the address with the token: printed on a terminal; when the output goes to a file (a log),
    written instead to a file only this user can read, so that no log holds it."""
    import os
    import sys

    from kotune.ui.runs import UI_DIR

    address = f"{where}?token={token}"
    if sys.stdout.isatty():
        return f"open {address} once; the token stays in a cookie"
    folder = root / UI_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / TOKEN_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(address + "\n")
    os.chmod(path, 0o600)
    return f"the address with its token is in {path}, readable by you only"
