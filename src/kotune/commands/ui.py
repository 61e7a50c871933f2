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
    # The token goes to the terminal only, never to a log file: uvicorn's access log (which would carry
    # `?token=`) is off.
    shown = f"{where}?token={token}" if token else where
    print(f"kotune ui: {root.resolve()} at {shown}", flush=True)
    uvicorn.run(create_app(root, configs, token), host=args.host, port=args.port, access_log=False, log_level="warning")
    return 0
