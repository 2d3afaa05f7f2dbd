"""An ASGI app served by uvicorn on a thread of the fleet service: the dashboard (``--http``) and the
repository's static files (``--http-repo``). ``start()`` returns once it listens; a port, certificate or
key that cannot be used is one line, before the thread starts."""

from __future__ import annotations

import socket
import threading
from functools import partial
from pathlib import Path

from edgeopt.errors import EnvironmentFault, MissingDependency, UserInputError
from edgeopt.fleet.serve_options import parse_listen


class HttpThread:
    def __init__(self, app, listen: str, flag: str, default: str, certfile: Path | None = None,
                 keyfile: Path | None = None, name: str = "edgeopt-http"):
        self.app, self.listen, self.flag, self.default = app, listen, flag, default
        self.certfile, self.keyfile, self.name = certfile, keyfile, name
        self.server = None
        self.address: tuple[str, int] | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> HttpThread:
        try:
            import uvicorn
        except ImportError as exc:
            raise MissingDependency("uvicorn", "fleet", f"fleet serve {self.flag}") from exc
        host, port = parse_listen(self.listen, self.flag, self.default)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # proto=IPPROTO_TCP: asyncio sets TCP_NODELAY only on sockets that say so, and without it every
        # response waited ~40 ms between its header and body writes (Nagle against delayed ACKs)
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise UserInputError(f"{self.flag} {self.listen}: cannot listen there ({exc.strerror})") from None
        self.address = sock.getsockname()[:2]
        config = uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=1, ssl_certfile=self.certfile, ssl_keyfile=self.keyfile)
        try:
            config.load()  # here, not on the server's thread: a certificate that does not load is one line
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            sock.close()
            raise UserInputError(f"--http-cert {self.certfile} / --http-key {self.keyfile}: "
                                 f"cannot use them for TLS ({exc})") from None
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=partial(self.server.run, sockets=[sock]), name=self.name, daemon=True)
        self._thread.start()
        while not self.server.started:
            if not self._thread.is_alive():
                sock.close()
                raise EnvironmentFault(f"{self.flag} {self.listen}: the server did not start (see the log)")
            self._thread.join(0.02)
        return self  # the socket is the asyncio server's now; it closes it on shutdown

    @property
    def url(self) -> str:
        host, port = self.address
        shown = f"[{host}]" if ":" in host else host
        return f"{'https' if self.certfile else 'http'}://{shown}:{port}/"

    def stop(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
