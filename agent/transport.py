"""The agent's MQTT connection (paho-mqtt): reconnect with exponential backoff and jitter, a
last will that marks the device offline, a retained ``state`` message, and subscriptions that are
renewed on every connect.

paho's own ``loop_forever`` retries at a fixed growing delay without jitter, so after a broker
restart a whole fleet would reconnect in lock-step; this module runs paho's ``loop()`` in its own
thread and waits ``backoff_delay`` between attempts instead. paho keeps QoS 1 messages that were not
acknowledged and sends them again after a reconnect, so nothing handed to ``publish`` while
connected is lost by a disconnect.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

from edgeopt.agent.config import MqttSection
from edgeopt.errors import MissingDependency, UserInputError
from edgeopt.mqtt import set_nodelay

log = logging.getLogger("edgeopt.agent.mqtt")


def backoff_delay(attempt: int, base_s: float, cap_s: float, rng: random.Random) -> float:
    """Delay before reconnect attempt ``attempt`` (1, 2, ...): the exponential delay
    min(cap, base * 2^(attempt-1)), of which a random half is jitter ("equal jitter")."""
    delay = min(cap_s, base_s * 2 ** min(attempt - 1, 30))
    return delay / 2 + rng.uniform(0, delay / 2)



# The credential id the shipped unit loads the password file under (LoadCredential=, sdk/cli/agent.py).
PASSWORD_CREDENTIAL = "mqtt.password"


def password_path(password_file: str, environ: Mapping[str, str] = os.environ) -> Path:
    """Where the broker password is read from: under systemd, the credential the unit loaded
    ($CREDENTIALS_DIRECTORY/mqtt.password) — the unit's throw-away user cannot read the root-only
    file itself; otherwise ``[mqtt] password_file``."""
    directory = environ.get("CREDENTIALS_DIRECTORY")
    if directory and (Path(directory) / PASSWORD_CREDENTIAL).is_file():
        return Path(directory) / PASSWORD_CREDENTIAL
    return Path(password_file)

class MqttTransport:
    def __init__(self, cfg: MqttSection, client_id: str, will_topic: str, will_payload: bytes,
                 rng: random.Random | None = None):
        try:
            import paho.mqtt.client as mqtt
        except ImportError as exc:
            raise MissingDependency("paho-mqtt", "agent", "the agent's MQTT connection") from exc
        self._mqtt = mqtt
        self.cfg = cfg
        self.rng = rng or random.Random()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True,
                                  protocol=mqtt.MQTTv311)
        self.client.max_inflight_messages_set(cfg.max_inflight + 8)
        self.client.max_queued_messages_set(0)
        self.client.will_set(will_topic, will_payload, qos=1, retain=True)
        if cfg.username:
            password = None
            if cfg.password_file:
                try:
                    password = password_path(cfg.password_file).read_text().strip()
                except OSError as exc:
                    raise UserInputError(f"[mqtt] password_file {cfg.password_file}: {exc.strerror}") from None
            self.client.username_pw_set(cfg.username, password)
        if cfg.tls:
            self.client.tls_set(ca_certs=cfg.ca_file or None, certfile=cfg.cert_file or None,
                                keyfile=cfg.key_file or None)

        # request/response traffic (update chunks) must not wait for Nagle + delayed ACK (~40 ms each)
        self.client.on_socket_open = lambda c, userdata, sock: set_nodelay(sock)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish
        self.client.on_message = self._on_message
        self.connected = threading.Event()
        self.on_connect_hooks: list[Callable[[], None]] = []
        self.on_ack: Callable[[int], None] = lambda mid: None
        self.on_disconnect_hooks: list[Callable[[], None]] = []
        self.on_unmatched: Callable[[str], None] = lambda topic: None  # a message on a topic not subscribed to
        self._subscriptions: dict[str, Callable[[bytes], None]] = {}
        self._left: dict[str, None] = {}  # topics unsubscribed from lately (insertion-ordered, bounded)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.attempts = 0
        self.connects = 0
        self.disconnects = 0
        self.last_error: str | None = None

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="mqtt", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 1.0) -> None:
        self._stop.set()
        if self.connected.is_set():
            with contextlib.suppress(Exception):  # already gone
                self.client.disconnect()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        mqtt = self._mqtt
        first = True
        failures = 0
        while not self._stop.is_set():
            try:
                self.attempts += 1
                if first:
                    self.client.connect(self.cfg.host, self.cfg.port, self.cfg.keepalive_s)
                    first = False
                else:
                    self.client.reconnect()
            except Exception as exc:  # refused, unreachable, DNS, TLS: all are "try again later"
                failures += 1
                self.last_error = f"cannot reach {self.cfg.host}:{self.cfg.port}: {exc}"
                self._wait_backoff(failures)
                continue
            while not self._stop.is_set():
                rc = self.client.loop(timeout=0.1)
                if rc != mqtt.MQTT_ERR_SUCCESS:
                    break
                if self.connected.is_set():
                    failures = 0
            if not self._stop.is_set():
                failures += 1
                self._wait_backoff(failures)
        try:  # a clean DISCONNECT (no last will) was queued by stop(): let it go out
            for _ in range(5):
                if self.client.loop(timeout=0.05) != mqtt.MQTT_ERR_SUCCESS:
                    break
        except Exception:
            pass

    def _wait_backoff(self, failures: int) -> None:
        delay = backoff_delay(failures, self.cfg.reconnect_min_s, self.cfg.reconnect_max_s, self.rng)
        log.debug("MQTT: reconnect attempt in %.2f s", delay)
        self._stop.wait(delay)

    # -- paho callbacks (network thread) ------------------------------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties=None) -> None:
        if reason_code.is_failure:
            self.last_error = f"broker {self.cfg.host}:{self.cfg.port} refused the connection: {reason_code}"
            log.warning("MQTT: %s", self.last_error)
            return
        self.connects += 1
        self.last_error = None
        log.info("MQTT: connected to %s:%d", self.cfg.host, self.cfg.port)
        for topic in list(self._subscriptions):
            client.subscribe(topic, qos=1)
        self.connected.set()
        for hook in self.on_connect_hooks:
            hook()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties=None) -> None:
        was = self.connected.is_set()
        self.connected.clear()
        if was:
            self.disconnects += 1
            if not self._stop.is_set():
                log.warning("MQTT: connection to %s:%d lost (%s)", self.cfg.host, self.cfg.port, reason_code)
            for hook in self.on_disconnect_hooks:
                hook()

    def _on_publish(self, client, userdata, mid, reason_code=None, properties=None) -> None:
        self.on_ack(mid)

    def _on_message(self, client, userdata, message) -> None:
        handler = self._subscriptions.get(message.topic)
        if handler is None:
            for topic, h in list(self._subscriptions.items()):  # the updater (un)subscribes meanwhile
                if self._mqtt.topic_matches_sub(topic, message.topic):
                    handler = h
                    break
        if handler is not None:
            handler(message.payload)
        elif message.topic not in self._left:  # else: sent before the broker had our UNSUBSCRIBE
            self.on_unmatched(message.topic)

    # -- use ----------------------------------------------------------------------------------------
    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> int:
        """Hand a message to paho; returns its mid (acknowledged later through ``on_ack`` for QoS 1)."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        return info.mid

    def subscribe(self, topic: str, handler: Callable[[bytes], None]) -> None:
        self._subscriptions[topic] = handler
        self._left.pop(topic, None)
        if self.connected.is_set():
            self.client.subscribe(topic, qos=1)

    def unsubscribe(self, topic: str) -> None:
        """Stop taking ``topic`` (an update's chunk topic); a message already on its way is dropped
        quietly, not counted as one this device never asked for."""
        if self._subscriptions.pop(topic, None) is None:
            return
        self._left[topic] = None
        while len(self._left) > 64:
            self._left.pop(next(iter(self._left)))
        if self.connected.is_set():
            self.client.unsubscribe(topic)
