"""The ``kotune ui`` web app: the page (``static/``) and a JSON API over the runs directory (Starlette).

Safety: the server answers only for the host it was bound to; on 127.0.0.1 (the default) the Host header must name a
loopback address, which stops another web site reaching it through DNS rebinding. Bound to another host, every
request needs the token printed at start (``/?token=...`` once, then an HttpOnly cookie), compared in constant time.
Requests that change something need the ``X-Kotune`` header, which a cross-site form cannot send. Files are served
only by name: run folders found under the runs directory, the configs named at start or saved by the page, and the
page's own assets; text passes ``redact`` so no hub token reaches the page.
"""

from __future__ import annotations

import json
import math
import secrets
from http.cookies import SimpleCookie
from importlib.resources import files
from pathlib import Path
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

from kotune.config import ConfigError
from kotune.errors import KotuneError
from kotune.run_folder import CONFIG, MERGE_REPORT, SUMMARY
from kotune.security import redact
from kotune.ui import launch, runs
from kotune.ui.chat import Playground

LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")
STATIC = {"app.js": "text/javascript", "app.css": "text/css", "index.html": "text/html"}
"""The page's files, served by these names only."""
COOKIE = "kotune_token"


class Guard:
    """ASGI middleware: the Host check on loopback, the token elsewhere, ``X-Kotune`` on requests that change things."""

    def __init__(self, app, token: str | None):
        self.app, self.token = app, token

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refusal = self.host_refusal(headers) if self.token is None else self.token_refusal(scope, headers)
        if refusal is None and scope["method"] not in ("GET", "HEAD") and headers.get("x-kotune") != "1":
            refusal = PlainTextResponse("kotune ui: missing X-Kotune header", status_code=403)
        if refusal is not None:
            return await refusal(scope, receive, send)
        return await self.app(scope, receive, send)

    @staticmethod
    def host_refusal(headers: dict[str, str]) -> Response | None:
        host = headers.get("host", "")
        host = host.rsplit(":", 1)[0] if not host.startswith("[") else host.partition("]")[0] + "]"
        return None if host in LOOPBACK else PlainTextResponse("kotune ui: unknown host", status_code=421)

    def token_refusal(self, scope, headers: dict[str, str]) -> Response | None:
        offered = _cookie(headers.get("cookie", "")) or headers.get("authorization", "").removeprefix("Bearer ")
        if self.matches(offered):
            return None
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        if scope["path"] == "/" and self.matches(query.get("token", [""])[0]):
            response = RedirectResponse("/", status_code=303)  # the token leaves the address bar
            response.set_cookie(COOKIE, self.token, httponly=True, samesite="strict")
            return response
        return PlainTextResponse("kotune ui: open the address with the token kotune ui printed", status_code=401)

    def matches(self, offered: str) -> bool:
        return secrets.compare_digest(offered.encode(), self.token.encode())


def _cookie(header: str) -> str:
    jar = SimpleCookie()
    try:
        jar.load(header)
    except Exception:  # a malformed Cookie header is no token
        return ""
    return jar[COOKIE].value if COOKIE in jar else ""


class Api:
    """The JSON API over ``root`` (the runs directory); ``configs``: the config files the page may open and launch."""

    def __init__(self, root: Path, configs: list[Path]):
        self.root, self.configs, self.playground = root.resolve(), configs, Playground()

    def config_files(self) -> dict[str, Path]:
        """Every config the page may read, by the id it knows it by (never a path the page sent)."""
        found = {f"named/{p.name}": p.resolve() for p in self.configs}
        saved = self.root / runs.UI_DIR / "configs"
        found |= {f"saved/{p.name}": p for p in sorted(saved.glob("*.yaml"))}
        for folder in runs.find_runs(self.root):
            if (folder / CONFIG).is_file():
                found[f"run/{folder.relative_to(self.root).as_posix()}"] = folder / CONFIG
        return found

    def config_path(self, name: str) -> Path:
        found = self.config_files()
        if name not in found:
            raise ConfigError(f"no config named {name!r}")
        return found[name]

    def run_folder(self, request: Request) -> Path:
        return runs.resolve_run(self.root, request.path_params["name"])

    async def page(self, request: Request) -> Response:
        return static_file("index.html")

    async def asset(self, request: Request) -> Response:
        name = request.path_params["name"]
        return static_file(name) if name in STATIC else PlainTextResponse("not found", status_code=404)

    async def list_runs(self, request: Request) -> Response:
        views = [runs.run_summary_view(self.root, f) for f in runs.find_runs(self.root)]
        return answer({"root": self.root.name, "runs": views})

    async def show_run(self, request: Request) -> Response:
        detail = runs.run_detail(self.root, self.run_folder(request))
        return answer({**detail, "launches": launch.launches(self.root, detail["name"])})

    async def stop_run(self, request: Request) -> Response:
        return answer({"signalled": launch.stop(self.run_folder(request))})

    async def resume_run(self, request: Request) -> Response:
        folder = self.run_folder(request)
        config = launch.resume_config(self.root, folder, [p for k, p in self.config_files().items() if k[:4] != "run/"])
        return answer(launch.launch(self.root, config, resume=True))

    async def list_launches(self, request: Request) -> Response:
        return answer({"launches": launch.launches(self.root)[:10]})

    async def list_configs(self, request: Request) -> Response:
        return answer({"configs": sorted(self.config_files())})

    async def read_config(self, request: Request) -> Response:
        return answer({"text": self.config_path(request.path_params["config"]).read_text(encoding="utf-8")})

    async def check_config(self, request: Request) -> Response:
        body = await request.json()
        try:
            launch.check_config(body.get("text", ""), self.root)
        except ConfigError as exc:
            return answer({"ok": False, "error": str(exc)})
        return answer({"ok": True, "error": None})

    async def save_config(self, request: Request) -> Response:
        body = await request.json()
        path = launch.save_config(self.root, str(body.get("name", "")), body.get("text", ""))
        return answer({"config": f"saved/{path.name}"})

    async def start(self, request: Request) -> Response:
        body = await request.json()
        config = self.config_path(str(body.get("config")))
        return answer(launch.launch(self.root, config, resume=bool(body.get("resume"))))

    def data_preview(self, request: Request) -> Response:  # sync: Starlette runs it in a thread (it tokenizes)
        from kotune.ui.preview import preview

        path = self.config_path(request.query_params.get("config", ""))
        split = "validation" if request.query_params.get("split") == "validation" else "train"
        limit = request.query_params.get("limit", "5")
        return answer(preview(path, split, min(50, int(limit) if limit.isdigit() else 5)))

    def predict(self, request: Request) -> Response:  # sync: it tokenizes, in a thread
        """``kotune plan CONFIG --gpu NAME`` (default: this machine's GPU) as the lines it prints."""
        from kotune.commands.plan import plan_config
        from kotune.config_load import load_config
        from kotune.plan.estimate import render
        from kotune.plan.gpus import gpu_named, present_gpu

        cfg = load_config(self.config_path(request.query_params.get("config", "")))
        name = request.query_params.get("gpu")
        gpu = gpu_named(name) if name else present_gpu()
        if gpu is None:
            raise ConfigError("no CUDA GPU on this machine: pick the GPU to plan for")
        _, plan, _, _ = plan_config(cfg, gpu)
        return answer({"lines": render(plan), "fits": plan.fits})

    async def gpus(self, request: Request) -> Response:
        from kotune.plan.gpus import GPUS

        return answer({"gpus": [g.name for g in GPUS.values()]})

    async def models(self, request: Request) -> Response:
        found = [f for f in runs.find_runs(self.root) if (f / SUMMARY).is_file() or (f / MERGE_REPORT).is_file()]
        return answer({"models": [f.relative_to(self.root).as_posix() for f in found]})

    async def chat(self, request: Request) -> Response:
        body = await request.json()
        folder = runs.resolve_run(self.root, str(body.get("model", "")))
        pieces = self.playground.reply(folder, str(body.get("message", "")))
        return StreamingResponse(pieces, media_type="text/plain; charset=utf-8")

    async def chat_stop(self, request: Request) -> Response:
        self.playground.stop()
        return answer({"stopped": True})

    async def chat_reset(self, request: Request) -> Response:
        self.playground.reset()
        return answer({"reset": True})

    def routes(self) -> list[Route]:
        post = ["POST"]
        return [
            Route("/", self.page),
            Route("/static/{name}", self.asset),
            Route("/api/runs", self.list_runs),
            Route("/api/runs/{name:path}/stop", self.stop_run, methods=post),
            Route("/api/runs/{name:path}/resume", self.resume_run, methods=post),
            Route("/api/runs/{name:path}", self.show_run),
            Route("/api/configs", self.list_configs),
            Route("/api/configs/check", self.check_config, methods=post),
            Route("/api/configs/save", self.save_config, methods=post),
            Route("/api/configs/{config:path}", self.read_config),
            Route("/api/launch", self.start, methods=post),
            Route("/api/launches", self.list_launches),
            Route("/api/preview", self.data_preview),
            Route("/api/models", self.models),
            Route("/api/plan", self.predict),
            Route("/api/gpus", self.gpus),
            Route("/api/chat", self.chat, methods=post),
            Route("/api/chat/stop", self.chat_stop, methods=post),
            Route("/api/chat/reset", self.chat_reset, methods=post),
        ]


def create_app(root: Path, configs: list[Path], token: str | None = None) -> Starlette:
    """The page and its API over the runs directory ``root``; ``token``: required on every request when set."""
    app = Starlette(routes=Api(root, configs).routes(), exception_handlers={KotuneError: refused, OSError: refused})
    app.add_middleware(Guard, token=token)
    return app


async def refused(request: Request, exc: Exception) -> Response:
    """A kotune error as the page shows it: its message (redacted), status 400 (404 for an unknown run)."""
    status = 404 if isinstance(exc, runs.RunNotFound) else 400
    message = str(exc) if isinstance(exc, KotuneError) else f"{type(exc).__name__}: {exc.strerror or exc}"
    return answer({"error": redact(message)}, status_code=status)


def answer(data, status_code: int = 200) -> Response:
    """``data`` as JSON, every hub token in it redacted (whatever part of a run folder it came from)."""
    text = redact(json.dumps(finite(data), ensure_ascii=False, allow_nan=False, default=str))
    return Response(text, status_code=status_code, media_type="application/json")


def finite(value):
    """``value`` with NaN and infinities (a non-finite step's loss in metrics.jsonl) as null, which JSON can carry."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def static_file(name: str) -> Response:
    text = files("kotune.ui").joinpath("static", name).read_text(encoding="utf-8")
    return Response(text, media_type=STATIC[name], headers={"Cache-Control": "no-store"})
