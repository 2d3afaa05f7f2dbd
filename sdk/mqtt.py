"""Connecting to an MQTT broker with paho-mqtt (3.1.1, so Mosquitto, EMQX, HiveMQ, AWS IoT Core
and the embedded broker all work): URL parsing, TLS, credentials, last will, a blocking connect.

    mqtt://host:1883                                                plain, anonymous
    mqtts://user@host:8883?ca=/path/ca.pem&password_file=/path/pw   TLS, the password read from a file
    mqtts://host:8883?ca=/path/ca.pem&cert=/path/dev.pem&key=/path/dev.key   TLS with a client certificate
    mqtt://user:password@host:1883                                  inline password (it then shows in
                                                                    ``ps`` and shell history: prefer a file)

URLs are shown to people only through ``redact_url`` (no password).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse, urlunparse

from edgeopt.errors import MissingDependency, RemoteError, UserInputError

URL_PARAMETERS = ("ca", "cert", "key", "password_file")


def redact_url(url: str) -> str:
    """``url`` without its password, for messages, logs and ready lines."""
    try:
        u = urlparse(url)
        password = u.password
    except ValueError:
        return "<unparsable URL>"
    if not password:
        return url
    host = u.hostname or ""
    host = f"[{host}]" if ":" in host else host
    try:
        port = f":{u.port}" if u.port else ""
    except ValueError:
        port = ""
    return urlunparse(u._replace(netloc=f"{u.username}:***@{host}{port}"))


@dataclass(frozen=True)
class BrokerURL:
    host: str
    port: int
    tls: bool
    username: str | None = None
    password: str | None = None
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    password_file: str | None = None

    @classmethod
    def parse(cls, url: str) -> BrokerURL:
        shown = redact_url(url)
        try:
            u = urlparse(url)
            hostname = u.hostname
        except ValueError:
            raise UserInputError(f"broker URL {shown!r}: not a URL") from None
        if u.scheme not in ("mqtt", "mqtts", "tcp", "ssl") or not hostname:
            raise UserInputError(f"broker URL {shown!r}: expected mqtt://host[:port] or mqtts://host[:port]")
        tls = u.scheme in ("mqtts", "ssl")
        q = {k: v[-1] for k, v in parse_qs(u.query).items()}
        for name in q:
            if name not in URL_PARAMETERS:
                raise UserInputError(f"broker URL {shown!r}: unknown parameter '{name}' "
                                     f"(known: {', '.join(URL_PARAMETERS)})")
        try:
            port = u.port or (8883 if tls else 1883)
        except ValueError:
            raise UserInputError(f"broker URL {shown!r}: bad port") from None
        password = unquote(u.password) if u.password else None
        if password and q.get("password_file"):
            raise UserInputError(f"broker URL {shown!r}: give the password inline or as password_file, not both")
        if q.get("password_file") and not u.username:
            raise UserInputError(f"broker URL {shown!r}: password_file needs a user name (mqtts://USER@host...)")
        return cls(hostname, port, tls, unquote(u.username) if u.username else None, password, q.get("ca"),
                   q.get("cert"), q.get("key"), q.get("password_file"))

    def secret(self) -> str | None:
        """The password: inline, or ``password_file``'s text without surrounding white space (as the
        agent reads its [mqtt] password_file); read now, so a rotated password is picked up by the
        next client made."""
        if self.password_file is None:
            return self.password
        try:
            text = Path(self.password_file).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            why = getattr(exc, "strerror", None) or "not readable text"
            raise UserInputError(f"broker URL: password_file {self.password_file}: {why}") from None
        if not text.strip():
            raise UserInputError(f"broker URL: password_file {self.password_file} is empty")
        return text.strip()


def make_client(client_id: str, url: str | BrokerURL, *, will: tuple[str, bytes, int, bool] | None = None,
                clean_session: bool = True):
    """A configured (not yet connected) paho client."""
    try:
        import paho.mqtt.client as mqtt
    except ImportError as exc:
        raise MissingDependency("paho-mqtt", "agent", "MQTT") from exc
    broker = url if isinstance(url, BrokerURL) else BrokerURL.parse(url)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean_session,
                         protocol=mqtt.MQTTv311)
    if broker.username:
        client.username_pw_set(broker.username, broker.secret())
    if broker.tls:
        for what, path in (("ca", broker.ca), ("cert", broker.cert), ("key", broker.key)):
            if path is not None and not Path(path).is_file():
                raise UserInputError(f"broker URL: {what} file {path} does not exist")
        client.tls_set(ca_certs=broker.ca, certfile=broker.cert, keyfile=broker.key)
    if will:
        topic, payload, qos, retain = will
        client.will_set(topic, payload, qos=qos, retain=retain)
    client.reconnect_delay_set(min_delay=1, max_delay=30)
    client.on_socket_open = lambda c, userdata, sock: set_nodelay(sock)
    client._edgeopt_broker = broker  # type: ignore[attr-defined]
    return client


def set_nodelay(sock) -> None:
    """Turn off Nagle's algorithm: the repository protocol is request/response, and a small packet
    held back until the peer's delayed ACK turns every ~1 ms round trip into ~40 ms."""
    import contextlib
    import socket

    with contextlib.suppress(OSError, AttributeError):  # not a TCP socket (e.g. a websocket wrapper)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def subscribe(client, topic: str, qos: int, callback, share: str | None = None) -> None:
    """Subscribe now and again after every reconnect (a broker restart forgets subscriptions);
    ``callback(client, userdata, message)`` gets this topic's messages. ``share``: a shared
    subscription's group ($share/GROUP/TOPIC): the broker gives each message to one subscriber of
    the group (messages arrive under their own topic, which the callback is registered for)."""
    subs: dict[str, int] = client.__dict__.setdefault("_edgeopt_subs", {})
    if not subs:
        def resubscribe(c, userdata, flags, reason_code, properties):
            if not reason_code.is_failure:
                for t, q in list(subs.items()):
                    c.subscribe(t, qos=q)

        client.on_connect = resubscribe
    subs[f"$share/{share}/{topic}" if share else topic] = qos
    client.message_callback_add(topic, callback)
    client.subscribe(f"$share/{share}/{topic}" if share else topic, qos=qos)


class PahoTopics:
    """``publish(topic, payload, qos)`` / ``subscribe(topic, handler(payload))`` over a paho client —
    the small interface the repository link and server need (the agent's transport offers the same)."""

    def __init__(self, client):
        self.client = client

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=qos, retain=retain)

    def subscribe(self, topic: str, handler, share: str | None = None) -> None:
        subscribe(self.client, topic, 1, lambda c, u, msg: handler(msg.topic, msg.payload), share)

    def unsubscribe(self, topic: str) -> None:
        self.client.__dict__.get("_edgeopt_subs", {}).pop(topic, None)
        self.client.unsubscribe(topic)
        self.client.message_callback_remove(topic)


def connect(client, timeout: float = 10.0) -> None:
    """Connect and start the network thread; raise ``RemoteError`` if the broker does not accept us
    within ``timeout`` (paho keeps reconnecting by itself afterwards)."""
    broker: BrokerURL = client._edgeopt_broker
    connected = threading.Event()
    failure: list[str] = []
    previous = client.on_connect

    def on_connect(c, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            failure.append(str(reason_code))
        connected.set()
        if previous is not None:
            previous(c, userdata, flags, reason_code, properties)

    client.on_connect = on_connect
    try:
        client.connect_async(broker.host, broker.port, keepalive=30)
    except (OSError, ValueError) as exc:
        raise RemoteError(f"cannot reach broker {broker.host}:{broker.port}: {exc}") from exc
    client.loop_start()
    ok = connected.wait(timeout)
    client.on_connect = previous
    if not ok or failure:
        client.loop_stop()
        why = failure[0] if failure else f"no answer within {timeout:.0f} s"
        raise RemoteError(f"broker {broker.host}:{broker.port} refused or did not answer: {why}")
