"""``edgeopt fleet serve --http HOST:PORT``: the dashboard — a page operators watch a fleet and its
rollouts from and act on (pause, resume, abort, create), and the JSON API under ``/api/`` it uses.

Starlette routes on uvicorn, in a thread of the fleet service. Reads go to the fleet database (one
connection per worker thread); actions call ``edgeopt.fleet.operations``, the code behind
``edgeopt fleet rollout ...``, so the form and the flags take the same checks and the controller sees
the same compare-and-set writes. Live updates: ``/api/events`` is a Server-Sent Events stream that
sends the database's change stamp whenever it moves; the page then reloads what it shows.
Who may do what: fleet/dashboard/auth.py. The API's description: ``/api/openapi.json`` (openapi.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import tarfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from edgeopt.errors import EdgeoptError, NotFound, UserInputError
from edgeopt.fleet import operations
from edgeopt.fleet.dashboard import queries
from edgeopt.fleet.dashboard.auth import SESSION_COOKIE, SESSION_TTL_S, Guard
from edgeopt.fleet.dashboard.openapi import openapi
from edgeopt.fleet.db import Database
from edgeopt.fleet.http_thread import HttpThread
from edgeopt.fleet.repository import Repository
from edgeopt.fleet.rollout_spec import ROLLOUT_PARAMS
from edgeopt.fleet.store import FleetStore

log = logging.getLogger("edgeopt.fleet.dashboard")
STATIC = resources.files("edgeopt.fleet.dashboard") / "static"
REPORT_KEYS = ("artifact", "parity", "accuracy", "latency", "fit", "status")
MAX_BODY = 64 * 1024  # a rollout form is < 1 KiB


@dataclass(frozen=True)
class DashboardConfig:
    listen: str                      # HOST:PORT (port 0: a free one)
    token: str | None = None         # required from non-local clients
    certfile: Path | None = None     # TLS
    keyfile: Path | None = None
    poll_s: float = 1.0              # how often the live stream looks for changes


def model_report(repository: Repository, entry: dict[str, Any]) -> dict[str, Any] | None:
    """The parts of a published artifact's report.json an operator compares versions by."""
    path = repository.file_for(f"targets/{entry['sha256']}.{entry['target']}")
    if path is None:
        return None
    try:
        with tarfile.open(path) as tar:
            member = tar.extractfile("report.json")
            report = json.loads(member.read()) if member else None
    except (OSError, KeyError, tarfile.TarError, ValueError):
        return None
    return {k: report.get(k) for k in REPORT_KEYS} if isinstance(report, dict) else None


class Api:
    """The handlers' state: the database (a connection per thread), the repository, the guard."""

    def __init__(self, db: Database, repository: Repository, config: DashboardConfig,
                 service_status: Callable[[], dict[str, Any]] | None = None):
        self.db, self.repository, self.config = db, repository, config
        self.guard = Guard(config.token)
        self.service_status = service_status
        self._local = threading.local()
        self._connections: list = []
        self._lock = threading.Lock()
        self._reports: dict[str, dict[str, Any] | None] = {}  # sha256 → report summary (artifacts are immutable)

    def store(self) -> FleetStore:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self.db.connect()
            with self._lock:
                self._connections.append(conn)
        return FleetStore(conn)

    def close(self) -> None:
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()

    def models(self) -> list[dict[str, Any]]:
        out = []
        for entry in self.repository.list_models():
            if entry["sha256"] not in self._reports:
                self._reports[entry["sha256"]] = model_report(self.repository, entry)
            out.append(entry | {"report": self._reports[entry["sha256"]]})
        return out

    def published(self) -> list[str]:
        return [f"{m['name']}@{m['version']}" for m in self.repository.list_models()]


def build_app(api: Api):
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status, headers={"Cache-Control": "no-store"})

    def endpoint(fn):
        """Run ``fn(request)`` in a worker thread (it reads the database); a user's mistake is a 400, a
        rollout or device that does not exist a 404, anything else edgeopt refuses a 409."""
        async def handler(request: Request) -> Response:
            try:
                result = await run_in_threadpool(fn, request)
            except NotFound as exc:
                return error(404, str(exc))
            except UserInputError as exc:
                return error(400, str(exc))
            except EdgeoptError as exc:
                return error(409, str(exc))
            return result if isinstance(result, Response) else JSONResponse(result,
                                                                            headers={"Cache-Control": "no-store"})
        return handler

    async def body(request: Request) -> dict[str, Any]:
        """The request's JSON object, read up to MAX_BODY bytes (a bigger body is refused unread)."""
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > MAX_BODY:
                raise UserInputError(f"request body over {MAX_BODY // 1024} KiB")
        try:
            data = json.loads(bytes(raw) or b"{}")
        except ValueError:
            raise UserInputError("the request body must be JSON") from None
        if not isinstance(data, dict):
            raise UserInputError("the request body must be a JSON object")
        return data

    def page(name: str):
        template = (STATIC / name).read_text()

        async def handler(request: Request) -> Response:
            html = template.replace("{{csrf}}", api.guard.csrf_token(request.scope.get("edgeopt.session", "-")))
            return HTMLResponse(html, headers={"Cache-Control": "no-store", "X-Frame-Options": "DENY",
                                               "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
                                                                          "style-src 'self' 'unsafe-inline'"})
        return handler

    async def login(request: Request) -> Response:
        try:
            data = await body(request)
        except UserInputError as exc:
            return error(400, str(exc))
        sid = api.guard.login(str(data.get("token", "")))
        if sid is None:
            return error(401, "wrong token")
        response = JSONResponse({"ok": True})
        response.set_cookie(SESSION_COOKIE, sid, max_age=SESSION_TTL_S, httponly=True, samesite="strict",
                            secure=api.config.certfile is not None)
        return response

    def devices(request: Request):
        return queries.device_page(api.store(), dict(request.query_params))

    def device(request: Request):
        return queries.device_detail(api.store(), request.path_params["device_id"])

    def telemetry(request: Request):
        return queries.device_telemetry(api.store(), request.path_params["device_id"], dict(request.query_params))

    def summary(request: Request):
        return queries.summary(api.store()) | {"service": api.service_status() if api.service_status else None}

    def rollouts(request: Request):
        return queries.rollouts(api.store())

    def rollout(request: Request):
        return queries.rollout(api.store(), request.path_params["rollout_id"])

    def models(request: Request):
        return api.models()

    def rollout_options(request: Request):
        return [{"name": p.name, "flag": p.flag, "type": p.type.__name__, "default": p.default, "help": p.help}
                for p in ROLLOUT_PARAMS]

    async def create(request: Request) -> Response:
        try:
            data = await body(request)
        except UserInputError as exc:
            return error(400, str(exc))

        def run(_request):
            selectors = data.get("selectors") or []
            options = data.get("options") or {}
            if not isinstance(selectors, list) or not isinstance(options, dict):
                raise UserInputError("'selectors' must be a list and 'options' an object")
            created = operations.create_rollout(api.store, api.published, api.repository.root,
                                                str(data.get("model", "")), [str(s) for s in selectors],
                                                {k: v for k, v in options.items() if v not in (None, "")},
                                                data.get("id") or None, bool(data.get("start")))
            return JSONResponse({"rollout_id": created.rollout_id, "devices": created.devices,
                                 "waves": created.waves, "started": created.started}, 201)
        return await endpoint(run)(request)

    async def command(request: Request) -> Response:
        try:
            data = await body(request)
        except UserInputError as exc:
            return error(400, str(exc))

        def run(_request):
            rollout_id, verb = request.path_params["rollout_id"], request.path_params["command"]
            reason = data.get("reason")
            decision = operations.command_rollout(api.store(), rollout_id, verb, str(reason)[:200] if reason else None)
            return {"rollout_id": rollout_id, "state": str(decision.rollout.state), "told": len(decision.desired)}
        return await endpoint(run)(request)

    async def revoke(request: Request) -> Response:
        def run(_request):
            model = operations.parse_model(request.path_params["model"], "model")
            api.repository.revoke(model.name, model.version)
            return {"revoked": str(model)}
        return await endpoint(run)(request)

    async def events(request: Request) -> Response:
        async def stream():
            last, quiet = None, 0.0
            yield "retry: 2000\n\n"
            while True:
                stamp = await run_in_threadpool(lambda: queries.change_stamp(api.store()))
                if stamp != last:
                    last, quiet = stamp, 0.0
                    yield f"event: change\ndata: {json.dumps(stamp)}\n\n"
                elif quiet >= 15:
                    quiet = 0.0
                    yield ": keep-alive\n\n"
                await asyncio.sleep(api.config.poll_s)
                quiet += api.config.poll_s
        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    async def spec(request: Request) -> Response:
        return JSONResponse(openapi())

    routes = [
        Route("/", page("index.html")),
        Route("/login", page("login.html"), methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Route("/api/summary", endpoint(summary)),
        Route("/api/devices", endpoint(devices)),
        Route("/api/devices/{device_id}", endpoint(device)),
        Route("/api/devices/{device_id}/telemetry", endpoint(telemetry)),
        Route("/api/models", endpoint(models)),
        Route("/api/models/{model}/revoke", revoke, methods=["POST"]),
        Route("/api/rollouts", endpoint(rollouts), methods=["GET"]),
        Route("/api/rollouts", create, methods=["POST"]),
        Route("/api/rollout-options", endpoint(rollout_options)),
        Route("/api/rollouts/{rollout_id}", endpoint(rollout)),
        Route("/api/rollouts/{rollout_id}/{command:str}", command, methods=["POST"]),
        Route("/api/events", events),
        Route("/api/openapi.json", spec),
        Mount("/static", StaticFiles(directory=str(STATIC)), name="static"),
    ]
    app = Starlette(routes=routes)

    async def guarded(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        request = Request(scope)
        scheme = "https" if api.config.certfile else "http"
        access = api.guard.check(request.method, request.url.path, request.client.host if request.client else None,
                                 request.headers, request.cookies, f"{scheme}://{request.headers.get('host', '')}")
        if not access.allowed:
            if access.status == 401 and request.method == "GET" and not request.url.path.startswith("/api/"):
                return await RedirectResponse("/login", 303)(scope, receive, send)
            return await error(access.status, access.reason)(scope, receive, send)
        scope["edgeopt.session"] = access.session
        await app(scope, receive, send)

    guarded.routes = routes  # for the OpenAPI test
    return guarded


class Dashboard:
    """The dashboard's server, on its own thread: ``start()`` returns once it listens."""

    def __init__(self, config: DashboardConfig, db: Database, repository: Repository,
                 service_status: Callable[[], dict[str, Any]] | None = None):
        self.config = config
        self.api = Api(db, repository, config, service_status)
        self.http = HttpThread(build_app(self.api), config.listen, "--http", "127.0.0.1:8080", config.certfile,
                               config.keyfile, name="edgeopt-dashboard")

    def start(self) -> Dashboard:
        self.http.start()
        return self

    @property
    def address(self) -> tuple[str, int] | None:
        return self.http.address

    @property
    def url(self) -> str:
        return self.http.url

    def stop(self) -> None:
        self.http.stop()
        self.api.close()
