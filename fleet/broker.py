"""The embedded broker: amqtt (pure Python) in a thread of the fleet service, for demos and trials
without a system broker. It listens on loopback without authentication or TLS; production fleets
use Mosquitto (``edgeopt fleet broker-config``) or a clustered broker (docs/scaling.md).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading

from edgeopt.errors import MissingDependency, UserInputError


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = str(text).rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UserInputError(f"--listen {text!r}: expected HOST:PORT, e.g. 127.0.0.1:1884")
    return host or "127.0.0.1", int(port)


class EmbeddedBroker:
    def __init__(self, host: str = "127.0.0.1", port: int = 1884):
        self.host, self.port = host, port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._broker = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self, timeout: float = 15.0) -> EmbeddedBroker:
        try:
            from amqtt.broker import Broker
        except ImportError as exc:
            raise MissingDependency("amqtt", "fleet", "the embedded MQTT broker") from exc
        if self.port == 0:
            with socket.socket() as s:
                s.bind((self.host, 0))
                self.port = s.getsockname()[1]
        with socket.socket() as probe:  # amqtt reports a busy port only in its log
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((self.host, self.port))
            except OSError as exc:
                raise UserInputError(f"the embedded broker cannot listen on {self.host}:{self.port} ({exc.strerror}); "
                                     f"pass --listen HOST:PORT, or --broker URL to use a running broker") from None
        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.ERROR)
        ready, failure = threading.Event(), []
        config = {"listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
                  "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}}}

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self._loop = loop
            try:
                self._broker = Broker(config, loop=loop)
                loop.run_until_complete(self._broker.start())
            except Exception as exc:
                failure.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name="edgeopt-embedded-broker", daemon=True)
        self._thread.start()
        if not ready.wait(timeout) or failure:
            raise UserInputError(f"the embedded broker did not start on {self.host}:{self.port}: "
                                 f"{failure[0] if failure else 'timed out'}")
        return self

    def stop(self) -> None:
        if self._loop is None or self._broker is None:
            return
        fut = asyncio.run_coroutine_threadsafe(self._broker.shutdown(), self._loop)
        try:
            fut.result(10)
        except Exception:  # shutting down anyway
            logging.getLogger("edgeopt.fleet").debug("embedded broker shutdown", exc_info=True)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)
