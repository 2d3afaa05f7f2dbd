"""``edgeopt fleet serve --http-repo HOST:PORT``: the repository's ``metadata/`` and ``targets/`` as
static files over HTTP(S) — what a device with ``[update] repo_url`` fetches (edgeopt.repo_http), and
what any web server, object store or CDN can serve instead (docs/scaling.md says how to sync them).

Read-only and without a token, as a CDN would serve them: every file is signed or named by its hash,
and devices check them against the TUF metadata they trust, so a file changed on its way is refused.
Never ``keys/``. Starlette's StaticFiles answers range requests (resume by offset) and HEAD.
"""

from __future__ import annotations

from pathlib import Path

from edgeopt.errors import MissingDependency
from edgeopt.fleet.http_thread import HttpThread


def build_repo_app(root: Path):
    try:
        from starlette.applications import Starlette
        from starlette.routing import Mount
        from starlette.staticfiles import StaticFiles
    except ImportError as exc:
        raise MissingDependency("starlette", "fleet", "fleet serve --http-repo") from exc
    # follow_symlink stays off: a link in the repository cannot lead a request out of it
    return Starlette(routes=[Mount(f"/{part}", StaticFiles(directory=root / part, check_dir=False), name=part)
                             for part in ("metadata", "targets")])


class RepoWeb:
    def __init__(self, root: Path, listen: str, certfile: Path | None = None, keyfile: Path | None = None):
        self.http = HttpThread(build_repo_app(Path(root)), listen, "--http-repo", "127.0.0.1:8081", certfile,
                               keyfile, name="edgeopt-repo-web")

    def start(self) -> RepoWeb:
        self.http.start()
        return self

    @property
    def url(self) -> str:
        return self.http.url

    def stop(self) -> None:
        self.http.stop()
