"""Messages between devices and the fleet over MQTT, and the pure functions that validate them.

    {p}/devices/{id}/state      device → fleet, retained, QoS 1 (``edgeopt.state/1``, see ``parse_state``);
                                the last will is ``{"schema", "device_id", "online": false}``
    {p}/devices/{id}/telemetry  device → fleet, QoS 0: an optional input to the health gates
    {p}/devices/{id}/desired    fleet → device, retained, QoS 1: ``{"name", "version", "rollout"}``;
                                an empty retained payload clears it

Everything here comes from the network: every field is checked for type, range and size, and a
message that fails raises ``MessageError`` (and nothing else) saying which field is wrong. The
registry counts and logs those; they never stop the service.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from edgeopt.repo_protocol import DEVICE_ID_RE

STATE_SCHEMA = "edgeopt.state/1"
MAX_STATE_BYTES = 16 * 1024
MAX_TELEMETRY_BYTES = 64 * 1024
MAX_DESIRED_BYTES = 1024
MAX_LABELS = 32
LABEL_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
LABEL_VALUE_RE = re.compile(r"^[A-Za-z0-9_.:/@+-]{0,128}$")
MODEL_PART_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")  # as fleet.repository.NAME_RE
ROLLOUT_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
SHORT_TEXT = 200
# The update state names of agent/update/machine.py (kept here as strings: the fleet does not
# import the agent; a test checks both lists agree).
UPDATE_STATES = ("IDLE", "DOWNLOADING", "VERIFYING", "STAGED", "SELF_TEST", "SHADOW", "PROBATION", "COMMITTED",
                 "ROLLING_BACK", "ROLLED_BACK")
TOPIC_KINDS = ("state", "telemetry", "desired", "results")


class MessageError(ValueError):
    """A message that does not follow the contract (the text names the field)."""


@dataclass(frozen=True)
class ModelRef:
    name: str
    version: str

    def __str__(self) -> str:
        return f"{self.name}@{self.version}"

    @classmethod
    def parse(cls, text: str) -> ModelRef:
        """'NAME@VERSION' → ModelRef (``MessageError`` when malformed)."""
        name, sep, version = (text or "").partition("@")
        if not sep or not MODEL_PART_RE.match(name) or not MODEL_PART_RE.match(version) or ".." in text:
            raise MessageError(f"expected NAME@VERSION, got {text!r}")
        return cls(name, version)

    def to_json(self) -> dict[str, str]:
        return {"name": self.name, "version": self.version}


@dataclass(frozen=True)
class UpdateStatus:
    state: str
    target: ModelRef | None = None
    rollout: str | None = None
    reason: str | None = None
    since: float = 0.0


@dataclass(frozen=True)
class Health:
    error_rate: float = 0.0
    latency_p95_ms: float | None = None
    agreement: float | None = None
    nan_outputs: int = 0


@dataclass(frozen=True)
class DeviceState:
    device_id: str
    online: bool
    agent_version: str | None
    profile: str | None
    labels: dict[str, str]
    model: ModelRef | None
    update: UpdateStatus
    health: Health | None
    ts: float


@dataclass(frozen=True)
class OfflineMark:
    """The last will: the device is gone; its other fields are the last ones it reported."""

    device_id: str


@dataclass(frozen=True)
class Telemetry:
    device_id: str
    model: ModelRef | None
    latency_p95_ms: float | None
    error_rate: float | None


@dataclass(frozen=True)
class Desired:
    model: ModelRef | None  # None: cleared (the device keeps what it runs)
    rollout: str | None


# -- topics ---------------------------------------------------------------------------------------
def device_topic(prefix: str, device_id: str, kind: str) -> str:
    return f"{prefix}/devices/{device_id}/{kind}"


def parse_device_topic(prefix: str, topic: str) -> tuple[str, str]:
    """'{p}/devices/{id}/{kind}' → (id, kind)."""
    head = f"{prefix}/devices/"
    rest = topic[len(head):] if topic.startswith(head) else ""
    device_id, _, kind = rest.partition("/")
    if not DEVICE_ID_RE.match(device_id) or kind not in TOPIC_KINDS:
        raise MessageError(f"unexpected topic {topic[:120]!r}")
    return device_id, kind


# -- field checks ---------------------------------------------------------------------------------
def _object(payload: bytes, limit: int, what: str) -> dict[str, Any]:
    if not isinstance(payload, bytes | bytearray):
        raise MessageError(f"{what} payload is not bytes")
    if len(payload) > limit:
        raise MessageError(f"{what} of {len(payload)} bytes exceeds {limit}")
    try:
        obj = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MessageError(f"{what} is not JSON ({str(exc)[:80]})") from None
    if not isinstance(obj, dict):
        raise MessageError(f"{what} is not a JSON object")
    return obj


def _bool(obj: dict, key: str) -> bool:
    v = obj.get(key)
    if not isinstance(v, bool):
        raise MessageError(f"field '{key}' must be true or false, got {str(v)[:40]!r}")
    return v


def _number(obj: dict, key: str, lo: float, hi: float, *, optional: bool = False) -> float | None:
    v = obj.get(key)
    if v is None and optional:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or not lo <= v <= hi:
        raise MessageError(f"field '{key}' must be a number in [{lo}, {hi}], got {str(v)[:40]!r}")
    return float(v)


def _int(obj: dict, key: str, lo: int, hi: int) -> int:
    v = obj.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise MessageError(f"field '{key}' must be an integer in [{lo}, {hi}], got {str(v)[:40]!r}")
    return v


def _text(obj: dict, key: str, *, pattern: re.Pattern | None = None, optional: bool = True,
          limit: int = SHORT_TEXT) -> str | None:
    v = obj.get(key)
    if v is None and optional:
        return None
    if not isinstance(v, str) or len(v) > limit or (pattern is not None and not pattern.match(v)):
        raise MessageError(f"field '{key}' is missing or malformed: {str(v)[:60]!r}")
    if pattern is None and any(ord(c) < 32 for c in v):
        raise MessageError(f"field '{key}' holds control characters")
    return v


def _model(obj: dict, key: str) -> ModelRef | None:
    v = obj.get(key)
    if v is None:
        return None
    if not isinstance(v, dict):
        raise MessageError(f"field '{key}' must be an object {{name, version}} or null")
    name = _text(v, "name", pattern=MODEL_PART_RE, optional=False)
    version = _text(v, "version", pattern=MODEL_PART_RE, optional=False)
    return ModelRef(name, version)  # type: ignore[arg-type]


def _labels(obj: dict) -> dict[str, str]:
    v = obj.get("labels", {})
    if v is None:
        return {}
    if not isinstance(v, dict) or len(v) > MAX_LABELS:
        raise MessageError(f"field 'labels' must be an object of at most {MAX_LABELS} string labels")
    for k, val in v.items():
        if not LABEL_KEY_RE.match(k) or not isinstance(val, str) or not LABEL_VALUE_RE.match(val):
            raise MessageError(f"label {str(k)[:40]!r}={str(val)[:40]!r} is malformed")
    return dict(v)


def _update(obj: dict) -> UpdateStatus:
    v = obj.get("update")
    if not isinstance(v, dict):
        raise MessageError("field 'update' must be an object")
    state = v.get("state")
    if state not in UPDATE_STATES:
        raise MessageError(f"field 'update.state' must be one of {', '.join(UPDATE_STATES)}, got {str(state)[:40]!r}")
    try:
        target = _model(v, "target")
        rollout = _text(v, "rollout", pattern=ROLLOUT_ID_RE)
        reason = _text(v, "reason")
        since = _number(v, "since", 0, 1e11, optional=True) or 0.0
    except MessageError as exc:
        raise MessageError(f"in 'update': {exc}") from None
    return UpdateStatus(state, target, rollout, reason, since)


def _health(obj: dict) -> Health | None:
    v = obj.get("health")
    if v is None:
        return None
    if not isinstance(v, dict):
        raise MessageError("field 'health' must be an object or null")
    try:
        return Health(_number(v, "error_rate", 0.0, 1.0),  # type: ignore[arg-type]
                      _number(v, "latency_p95_ms", 0.0, 1e7, optional=True),
                      _number(v, "agreement", 0.0, 1.0, optional=True),
                      _int(v, "nan_outputs", 0, 2**53) if v.get("nan_outputs") is not None else 0)
    except MessageError as exc:
        raise MessageError(f"in 'health': {exc}") from None


# -- messages ----------------------------------------------------------------------------------------
def parse_state(device_id: str, payload: bytes) -> DeviceState | OfflineMark:
    """A device's retained state (``device_id`` comes from the topic and must match the body)."""
    obj = _object(payload, MAX_STATE_BYTES, "state")
    if obj.get("schema") != STATE_SCHEMA:
        raise MessageError(f"field 'schema' must be {STATE_SCHEMA!r}, got {str(obj.get('schema'))[:40]!r}")
    if obj.get("device_id") != device_id:
        raise MessageError(f"field 'device_id' {str(obj.get('device_id'))[:70]!r} does not match the topic's "
                           f"{device_id!r}")
    online = _bool(obj, "online")
    if not online and set(obj) <= {"schema", "device_id", "online", "ts"}:
        return OfflineMark(device_id)
    return DeviceState(
        device_id=device_id, online=online,
        agent_version=_text(obj, "agent_version", limit=64),
        profile=_text(obj, "profile", pattern=LABEL_KEY_RE),
        labels=_labels(obj), model=_model(obj, "model"), update=_update(obj), health=_health(obj),
        ts=_number(obj, "ts", 0, 1e11, optional=True) or 0.0)


def parse_telemetry(device_id: str, payload: bytes) -> Telemetry:
    """The parts of a telemetry message the health gates use. Telemetry is free-form beyond these:
    ``model`` {name, version}; latency p95 as ``latency_ms.p95_ms`` (the agent's) or ``latency_p95_ms``;
    ``error_rate`` in [0, 1]. Anything else is ignored."""
    obj = _object(payload, MAX_TELEMETRY_BYTES, "telemetry")
    body_id = obj.get("device_id", obj.get("device"))
    if body_id is not None and body_id != device_id:
        raise MessageError(f"telemetry names device {str(body_id)[:70]!r} on {device_id!r}'s topic")
    latency = obj.get("latency_ms")
    if isinstance(latency, dict):
        p95 = _number(latency, "p95_ms", 0.0, 1e7, optional=True)
    else:
        p95 = _number(obj, "latency_p95_ms", 0.0, 1e7, optional=True)
    return Telemetry(device_id, _model(obj, "model"), p95, _number(obj, "error_rate", 0.0, 1.0, optional=True))


def encode_desired(model: ModelRef | None, rollout: str | None) -> bytes:
    """The retained ``desired`` payload; empty bytes clear it."""
    if model is None:
        return b""
    return json.dumps({"name": model.name, "version": model.version, "rollout": rollout},
                      separators=(",", ":")).encode()


def parse_desired(payload: bytes) -> Desired:
    if not payload:
        return Desired(None, None)
    obj = _object(payload, MAX_DESIRED_BYTES, "desired")
    name = _text(obj, "name", pattern=MODEL_PART_RE, optional=False)
    version = _text(obj, "version", pattern=MODEL_PART_RE, optional=False)
    return Desired(ModelRef(name, version), _text(obj, "rollout", pattern=ROLLOUT_ID_RE))  # type: ignore[arg-type]


def state_message(device_id: str, *, online: bool = True, agent_version: str | None = None,
                  profile: str | None = None, labels: dict[str, str] | None = None, model: ModelRef | None = None,
                  update: UpdateStatus | None = None, health: Health | None = None, ts: float = 0.0) -> bytes:
    """Encode an ``edgeopt.state/1`` message (what the simulator and tests send; the agent's own
    encoder must produce the same shape)."""
    update = update or UpdateStatus("IDLE")
    body = {
        "schema": STATE_SCHEMA, "device_id": device_id, "online": online, "agent_version": agent_version,
        "profile": profile, "labels": labels or {}, "model": model.to_json() if model else None,
        "update": {"state": update.state, "target": update.target.to_json() if update.target else None,
                   "rollout": update.rollout, "reason": update.reason, "since": update.since},
        "health": None if health is None else {"error_rate": health.error_rate, "latency_p95_ms": health.latency_p95_ms,
                                               "agreement": health.agreement, "nan_outputs": health.nan_outputs},
        "ts": ts,
    }
    return json.dumps(body, separators=(",", ":")).encode()


def offline_will(device_id: str) -> bytes:
    return json.dumps({"schema": STATE_SCHEMA, "device_id": device_id, "online": False}).encode()
