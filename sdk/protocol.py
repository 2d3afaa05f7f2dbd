"""The device↔fleet protocol: every topic, message, field rule and size limit the agent and the
fleet share (neither imports the other; both import this).

    {p}/devices/{id}/state      device → fleet, retained, QoS 1: ``edgeopt.state/1`` (encode_state,
                                parse_state); the last will is {"schema", "device_id", "online": false}
    {p}/devices/{id}/telemetry  device → fleet, QoS 0: free-form beyond what parse_telemetry reads
    {p}/devices/{id}/desired    fleet → device, retained, QoS 1: {"name", "version", "rollout"}; an
                                empty retained payload clears it
    {p}/devices/{id}/results    device → applications: inference results (agent/results.py)
    {p}/repo/req/{id}           device → repository server: a JSON chunk request
    {p}/repo/resp/{id}          server → device: 4-byte big-endian header length | JSON header | data

Everything here may come from the network, so every rule is strict: identifiers match the WHOLE
string (``fullmatch``: "12\\n" is not a version) and are ASCII (no look-alike letters); free texts
are printable (``str.isprintable``: no newline, NUL, RTL override, zero-width space, line
separator); numbers are finite (no NaN/Infinity) and never booleans; JSON is UTF-8, bounded in
size, and too deep a nesting is refused. A message that breaks a rule raises ``ProtocolError`` and
nothing else; it names the field (``.field``) and carries a short reason code (``.code``:
too_large, bad_json, too_deep, not_object, wrong_device, bad_topic, bad_frame or bad_<field>),
which the agent counts in ``rejected_messages``.

Encoders sanitize free texts (non-printable characters escaped, length capped) and then run the
parser on their own output, so what one side sends the other accepts: an identifier that breaks its
rule raises ``ProtocolError`` at the sender. Parsers ignore unknown fields (a newer agent may add some).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from edgeopt.errors import RemoteError

STATE_SCHEMA = "edgeopt.state/1"
TOPIC_KINDS = ("state", "telemetry", "desired", "results")
# The update states of agent/update/machine.py: the one list (a test checks the machine's enum agrees).
UPDATE_STATES = ("IDLE", "DOWNLOADING", "VERIFYING", "STAGED", "SELF_TEST", "SHADOW", "PROBATION", "COMMITTED",
                 "ROLLING_BACK", "ROLLED_BACK")
SLOTS = ("a", "b")

# -- field rules: whole string (fullmatch; the \Z makes .match safe too) ------------------------------
NO_DOTDOT = r"(?!.*\.\.)"  # identifiers never hold ".."
NAME_RE = re.compile(NO_DOTDOT + r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}\Z")  # model name and version
IDENT_RE = re.compile(NO_DOTDOT + r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")  # device, rollout ids, runtimes
DEVICE_ID_RE = ROLLOUT_ID_RE = IDENT_RE
LABEL_KEY_RE = re.compile(NO_DOTDOT + r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}\Z")  # label keys, profile names
LABEL_VALUE_RE = re.compile(r"[A-Za-z0-9_.:/@+-]{0,128}\Z")  # matched against selectors only, never a path
REQUEST_ID_RE = re.compile(NO_DOTDOT + r"[A-Za-z0-9_.:-]{1,64}\Z")
REPO_PATH_RE = re.compile(NO_DOTDOT + r"(metadata|targets)/[A-Za-z0-9][A-Za-z0-9_.+-]{0,200}\Z")  # one level
CODE_RE = re.compile(r"[a-z][a-z0-9_]{0,31}\Z")                  # keys of rejected_messages

# -- size limits --------------------------------------------------------------------------------------
MAX_DESIRED_BYTES = 1024
MAX_STATE_BYTES = 64 * 1024   # the largest state the encoder lets through is ~39 KB (a test checks)
MAX_TELEMETRY_BYTES = 64 * 1024
MAX_REQUEST_BYTES = 1024
MAX_HEADER_BYTES = 4096
DEFAULT_CHUNK = 64 * 1024
MAX_CHUNK = 1024 * 1024       # the largest chunk either side will ever ask for or accept
MAX_LABELS = 32
MAX_SOURCES = 16
MAX_REJECT_KINDS = 8          # rejected_messages: topic kinds, and reason codes per kind
MAX_REJECT_REASONS = 8
MAX_COUNT = 2**53
REASON_CHARS = 200            # update reason, slot errors, source errors, repository errors
STATUS_CHARS = 500            # the agent's error, config_error, fallback
SHORT_CHARS = 64              # agent version, status word, source names
MAX_TELEMETRY_DEPTH = 8
MAX_PROFILE_ENTRIES = 32  # threads in a telemetry profile, and stages per thread


class ProtocolError(RemoteError):
    """A message (or a value about to be sent) breaks the protocol. ``field`` names it, ``code`` is
    the short reason the agent counts."""

    def __init__(self, message: str, code: str = "malformed", field: str | None = None):
        super().__init__(message)
        self.code, self.field = code, field


def _bad(path: str, what: str) -> ProtocolError:
    return ProtocolError(f"field '{path}' {what}", f"bad_{path.rsplit('.', 1)[-1]}"[:32], path)


def _shown(value: Any) -> str:
    """A hostile value, short and safe to log (repr escapes control characters)."""
    if isinstance(value, str):
        return repr(value[:60])
    return repr(value)[:40] if value is None or isinstance(value, bool | int | float) else f"a {type(value).__name__}"


def is_name(value: Any) -> bool:
    """A model name or version: ``NAME_RE`` over the whole string."""
    return isinstance(value, str) and NAME_RE.fullmatch(value) is not None


def matches(pattern: re.Pattern, value: Any) -> bool:
    return isinstance(value, str) and pattern.fullmatch(value) is not None


def is_text(value: Any, limit: int) -> bool:
    return isinstance(value, str) and len(value) <= limit and value.isprintable()


def clean_text(value: Any, limit: int) -> str | None:
    """A free text made safe to send: non-printable characters escaped (a newline becomes the two
    characters '\\n'), at most ``limit`` characters. None stays None."""
    if value is None:
        return None
    text = str(value)
    if not text.isprintable():
        text = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
    return text[:limit]


def require(ok: bool, path: str, rule: str, value: Any) -> None:
    if not ok:
        raise _bad(path, f"must be {rule}, got {_shown(value)}")


# -- strict JSON ----------------------------------------------------------------------------------------
def load_object(payload: Any, limit: int, what: str) -> dict[str, Any]:
    """A JSON object from at most ``limit`` bytes of UTF-8."""
    if not isinstance(payload, bytes | bytearray):
        raise ProtocolError(f"{what} payload is not bytes", "bad_json")
    if len(payload) > limit:
        raise ProtocolError(f"{what} of {len(payload)} bytes exceeds {limit}", "too_large")
    try:
        # NaN, Infinity and 1e999 parse to non-finite floats, which every field check refuses by name
        obj = json.loads(bytes(payload).decode("utf-8"))
    except RecursionError:
        raise ProtocolError(f"{what} is nested too deeply", "too_deep") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer of too many digits
        raise ProtocolError(f"{what} is not JSON ({str(exc)[:80]})", "bad_json") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"{what} is not a JSON object", "not_object")
    return obj


def dump(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


# -- field checks (one value each; the parsers and, through them, the encoders use them) -----------------
def check_id(v: Any, path: str, pattern: re.Pattern = IDENT_RE, optional: bool = True) -> str | None:
    if v is None and optional:
        return None
    require(matches(pattern, v), path, "an identifier", v)
    return v


def _text(v: Any, path: str, limit: int) -> str | None:
    if v is not None:
        require(is_text(v, limit), path, f"printable text of at most {limit} characters", v)
    return v


def _num(v: Any, path: str, lo: float, hi: float, optional: bool = True) -> float | None:
    if v is None and optional:
        return None
    ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and lo <= v <= hi
    require(ok, path, f"a number in [{lo:g}, {hi:g}]", v)
    return float(v)


def check_int(v: Any, path: str, lo: int, hi: int) -> int:
    require(isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi, path, f"an integer in [{lo}, {hi}]", v)
    return v


def _mapping(v: Any, path: str, most: int) -> dict | None:
    if v is not None:
        require(isinstance(v, dict) and len(v) <= most, path, f"an object of at most {most} entries", v)
    return v


# -- messages -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelRef:
    name: str
    version: str

    def __str__(self) -> str:
        return f"{self.name}@{self.version}"

    @classmethod
    def parse(cls, text: str) -> ModelRef:
        """'NAME@VERSION' → ModelRef (``ProtocolError`` when malformed)."""
        name, sep, version = (text or "").partition("@")
        if not sep or not is_name(name) or not is_name(version):
            raise ProtocolError(f"expected NAME@VERSION, got {_shown(text)}", "bad_model")
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
class SourceStatus:
    type: str
    status: str
    error: str | None = None


@dataclass(frozen=True)
class DeviceState:
    """``edgeopt.state/1``. The fields after ``ts`` are the agent's view of itself, for operators."""

    device_id: str
    online: bool = True
    agent_version: str | None = None
    profile: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    model: ModelRef | None = None
    update: UpdateStatus = field(default_factory=lambda: UpdateStatus("IDLE"))
    health: Health | None = None
    ts: float = 0.0
    model_slot: str | None = None
    model_runtime: str | None = None
    status: str | None = None
    error: str | None = None
    config_error: str | None = None
    fallback: str | None = None
    sources: dict[str, SourceStatus] = field(default_factory=dict)
    rejected_messages: dict[str, dict[str, int]] | None = None  # {topic kind: {reason code: count}}
    slot_errors: dict[str, str] | None = None                   # {"a"|"b": why the slot is unusable}


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
    rejected_messages: dict[str, dict[str, int]] | None = None
    windows_per_s: float | None = None
    latency_p50_ms: float | None = None
    inference_errors: int | None = None
    profile: dict[str, dict[str, float | None]] | None = None  # thread → stage → µs per window
    last_download: dict[str, Any] | None = None  # {target: "NAME@VERSION", bytes, full_bytes, delta}


@dataclass(frozen=True)
class Desired:
    model: ModelRef | None  # None: cleared (the device keeps what it runs)
    rollout: str | None


# -- topics ---------------------------------------------------------------------------------------------
def device_topic(prefix: str, device_id: str, kind: str) -> str:
    return f"{prefix}/devices/{device_id}/{kind}"


def parse_device_topic(prefix: str, topic: str) -> tuple[str, str]:
    """'{p}/devices/{id}/{kind}' → (id, kind)."""
    head = f"{prefix}/devices/"
    rest = topic[len(head):] if isinstance(topic, str) and topic.startswith(head) else ""
    device_id, _, kind = rest.partition("/")
    if not matches(DEVICE_ID_RE, device_id) or kind not in TOPIC_KINDS:
        raise ProtocolError(f"unexpected topic {_shown(topic)}", "bad_topic", "topic")
    return device_id, kind


def request_topic(prefix: str, device_id: str) -> str:
    return f"{prefix}/repo/req/{device_id}"


def response_topic(prefix: str, device_id: str) -> str:
    return f"{prefix}/repo/resp/{device_id}"


# Multicast ("cast") of artifact chunks over MQTT: the repository server publishes a chunk once,
# retained, on a topic named by the file's sha256, the chunk size and the chunk's offset; every device
# that needs it subscribes there, so the server's bytes grow with the files, not with the devices.
# Chunks lie on a grid of the devices' chunk size (a power of two: a fleet configured alike meets on
# the same topics, and a few sizes at most can be on the broker at once).
CAST_CHUNK = 64 * 1024   # the grid when a device says nothing else
MIN_CAST_CHUNK = 4096
CAST_ID = "cast"  # the id of a cast frame (a response to no one request in particular)
_CAST_PATH_RE = re.compile(r"targets/([0-9a-f]{64})\.[^/]+\Z")


def cast_key(repo_path: str) -> str | None:
    """The sha256 a target file's cast topics are named by (``targets/SHA.NAME``), None for metadata."""
    m = _CAST_PATH_RE.match(repo_path) if isinstance(repo_path, str) else None
    return m.group(1) if m else None


def cast_grid(chunk: int, max_chunk: int = MAX_CHUNK) -> int | None:
    """The grid for a chunk size: the largest power of two ≤ ``chunk`` within [4 KiB, ``max_chunk``],
    or None when there is none (then chunks are not cast)."""
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < MIN_CAST_CHUNK or max_chunk < MIN_CAST_CHUNK:
        return None
    grid = 1 << (min(chunk, max_chunk).bit_length() - 1)
    return grid if grid >= MIN_CAST_CHUNK else None


def cast_topic(prefix: str, sha: str, grid: int, offset: int) -> str:
    return f"{prefix}/repo/cast/{sha}/{grid}/{offset}"


def cast_index_topic(prefix: str, sha: str) -> str:
    """Retained beside a cast file's chunks: which file, how long, on which grids, and until when
    the caster keeps it on the broker — so any server (another replica, or this one after a crash)
    can clear it."""
    return f"{prefix}/repo/castidx/{sha}"


def device_from_request_topic(prefix: str, topic: str) -> str:
    head = f"{prefix}/repo/req/"
    device = topic[len(head):] if isinstance(topic, str) and topic.startswith(head) else ""
    if not matches(DEVICE_ID_RE, device):
        raise ProtocolError(f"bad request topic {_shown(topic)}", "bad_topic", "topic")
    return device


def target_path(name: str, version: str) -> str:
    """The signed-repository (TUF) target path of a model version: ``NAME-VERSION.tar``."""
    require(is_name(name), "name", "a model name", name)
    require(is_name(version), "version", "a model version", version)
    return f"{name}-{version}.tar"


# -- desired --------------------------------------------------------------------------------------------
def encode_desired(model: ModelRef | None, rollout: str | None) -> bytes:
    """The retained ``desired`` payload; empty bytes clear it."""
    if model is None:
        return b""
    data = dump({"name": model.name, "version": model.version, "rollout": rollout})
    parse_desired(data)  # a name, version or rollout id that breaks its rule is never sent
    return data


def parse_desired(payload: bytes) -> Desired:
    if payload == b"":
        return Desired(None, None)
    obj = load_object(payload, MAX_DESIRED_BYTES, "desired")
    name = check_id(obj.get("name"), "name", NAME_RE, optional=False)
    version = check_id(obj.get("version"), "version", NAME_RE, optional=False)
    return Desired(ModelRef(name, version), check_id(obj.get("rollout"), "rollout", ROLLOUT_ID_RE))  # type: ignore[arg-type]


# -- state ----------------------------------------------------------------------------------------------
def _model(v: Any, path: str) -> ModelRef | None:
    if v is None:
        return None
    require(isinstance(v, dict), path, "an object {name, version} or null", v)
    return ModelRef(check_id(v.get("name"), f"{path}.name", NAME_RE, False),  # type: ignore[arg-type]
                    check_id(v.get("version"), f"{path}.version", NAME_RE, False))  # type: ignore[arg-type]


def _labels(v: Any) -> dict[str, str]:
    for k, val in (_mapping(v, "labels", MAX_LABELS) or {}).items():
        require(matches(LABEL_KEY_RE, k), "labels", "label keys of letters, digits, '_', '.', '-'", k)
        require(matches(LABEL_VALUE_RE, val), "labels", "label values of letters, digits, '_.:/@+-'", val)
    return dict(v or {})


def _update(v: Any) -> UpdateStatus:
    require(isinstance(v, dict), "update", "an object", v)
    state = v.get("state")
    require(isinstance(state, str) and state in UPDATE_STATES, "update.state", f"one of {', '.join(UPDATE_STATES)}",
             state)
    return UpdateStatus(state, _model(v.get("target"), "update.target"),
                        check_id(v.get("rollout"), "update.rollout", ROLLOUT_ID_RE),
                        _text(v.get("reason"), "update.reason", REASON_CHARS),
                        _num(v.get("since"), "update.since", 0, 1e11) or 0.0)


def _health(v: Any) -> Health | None:
    if v is None:
        return None
    require(isinstance(v, dict), "health", "an object or null", v)
    nan = v.get("nan_outputs")
    return Health(_num(v.get("error_rate"), "health.error_rate", 0.0, 1.0, optional=False),  # type: ignore[arg-type]
                  _num(v.get("latency_p95_ms"), "health.latency_p95_ms", 0.0, 1e7),
                  _num(v.get("agreement"), "health.agreement", 0.0, 1.0),
                  0 if nan is None else check_int(nan, "health.nan_outputs", 0, MAX_COUNT))


def _sources(v: Any) -> dict[str, SourceStatus]:
    out = {}
    for name, s in (_mapping(v, "sources", MAX_SOURCES) or {}).items():
        require(is_text(name, SHORT_CHARS) and name != "", "sources", "source names of printable text", name)
        require(isinstance(s, dict), "sources", "objects {type, status, error}", s)
        out[name] = SourceStatus(check_id(s.get("type"), "sources.type", IDENT_RE, False),  # type: ignore[arg-type]
                                 check_id(s.get("status"), "sources.status", IDENT_RE, False),  # type: ignore[arg-type]
                                 _text(s.get("error"), "sources.error", REASON_CHARS))
    return out


def parse_rejected(v: Any, path: str = "rejected_messages") -> dict[str, dict[str, int]] | None:
    """``{topic kind: {reason code: count}}``, at most 8 × 8 entries; None when absent."""
    if _mapping(v, path, MAX_REJECT_KINDS) is None:
        return None
    for kind, reasons in v.items():
        require(matches(CODE_RE, kind), path, "keyed by topic kind", kind)
        require(isinstance(reasons, dict) and len(reasons) <= MAX_REJECT_REASONS, path,
                 f"objects of at most {MAX_REJECT_REASONS} reason codes", reasons)
        for code, n in reasons.items():
            require(matches(CODE_RE, code), path, "keyed by reason code", code)
            check_int(n, path, 0, MAX_COUNT)
    return {kind: dict(reasons) for kind, reasons in v.items()}


def _slot_errors(v: Any) -> dict[str, str] | None:
    for slot, why in (_mapping(v, "slot_errors", len(SLOTS)) or {}).items():
        require(slot in SLOTS, "slot_errors", "keyed by slot 'a' or 'b'", slot)
        require(is_text(why, REASON_CHARS), "slot_errors", f"printable text of at most {REASON_CHARS} characters", why)
    return None if v is None else dict(v)


def parse_state(device_id: str, payload: bytes) -> DeviceState | OfflineMark:
    """A device's retained state (``device_id`` comes from the topic and must match the body)."""
    obj = load_object(payload, MAX_STATE_BYTES, "state")
    require(obj.get("schema") == STATE_SCHEMA, "schema", repr(STATE_SCHEMA), obj.get("schema"))
    if obj.get("device_id") != device_id:
        raise ProtocolError(f"field 'device_id' {_shown(obj.get('device_id'))} does not match the topic's "
                            f"{device_id!r}", "wrong_device", "device_id")
    require(isinstance(obj.get("online"), bool), "online", "true or false", obj.get("online"))
    if not obj["online"] and set(obj) <= {"schema", "device_id", "online"}:
        return OfflineMark(device_id)
    model = obj.get("model")
    slot = model.get("slot") if isinstance(model, dict) else None
    require(slot is None or slot in SLOTS, "model.slot", "'a', 'b' or null", slot)
    g = obj.get
    return DeviceState(
        device_id=device_id, online=obj["online"], agent_version=_text(g("agent_version"), "agent_version", SHORT_CHARS),
        profile=check_id(g("profile"), "profile", LABEL_KEY_RE), labels=_labels(g("labels")),
        model=_model(model, "model"), update=_update(g("update")), health=_health(g("health")),
        ts=_num(g("ts"), "ts", 0, 1e11) or 0.0, model_slot=slot,
        model_runtime=check_id(model.get("runtime"), "model.runtime") if isinstance(model, dict) else None,
        status=_text(g("status"), "status", SHORT_CHARS), error=_text(g("error"), "error", STATUS_CHARS),
        config_error=_text(g("config_error"), "config_error", STATUS_CHARS),
        fallback=_text(g("fallback"), "fallback", STATUS_CHARS), sources=_sources(g("sources")),
        rejected_messages=parse_rejected(g("rejected_messages")), slot_errors=_slot_errors(g("slot_errors")))


def _ref_json(ref: ModelRef | None, **extra: str | None) -> dict[str, Any] | None:
    return None if ref is None else {"name": ref.name, "version": ref.version,
                                     **{k: v for k, v in extra.items() if v is not None}}


def encode_state(state: DeviceState | OfflineMark) -> bytes:
    """The ``edgeopt.state/1`` payload: free texts sanitized, then checked by ``parse_state`` itself, so
    an identifier or number that breaks its rule raises ``ProtocolError`` here instead of being sent
    and dropped. ``rejected_messages`` is left out when None; ``slot_errors`` is null when no slot is unusable."""
    check_id(state.device_id, "device_id", DEVICE_ID_RE, optional=False)  # the parser takes it from the topic
    if isinstance(state, OfflineMark):
        body: dict[str, Any] = {"schema": STATE_SCHEMA, "device_id": state.device_id, "online": False}
    else:
        s, u, h = state, state.update, state.health
        body = {
            "schema": STATE_SCHEMA, "device_id": s.device_id, "online": s.online,
            "agent_version": clean_text(s.agent_version, SHORT_CHARS), "profile": s.profile, "labels": s.labels,
            "model": _ref_json(s.model, slot=s.model_slot, runtime=s.model_runtime),
            "update": {"state": u.state, "target": _ref_json(u.target), "rollout": u.rollout,
                       "reason": clean_text(u.reason, REASON_CHARS), "since": u.since},
            "health": None if h is None else {"error_rate": h.error_rate, "latency_p95_ms": h.latency_p95_ms,
                                              "agreement": h.agreement, "nan_outputs": h.nan_outputs},
            "status": clean_text(s.status, SHORT_CHARS), "error": clean_text(s.error, STATUS_CHARS),
            "config_error": clean_text(s.config_error, STATUS_CHARS), "fallback": clean_text(s.fallback, STATUS_CHARS),
            "sources": {clean_text(n, SHORT_CHARS) or "?": {"type": v.type, "status": v.status,
                                                            "error": clean_text(v.error, REASON_CHARS)}
                        for n, v in s.sources.items()},
            "slot_errors": None if s.slot_errors is None else
            {k: clean_text(v, REASON_CHARS) for k, v in s.slot_errors.items()},
            "ts": s.ts,
        }
        if s.rejected_messages is not None:
            body["rejected_messages"] = s.rejected_messages
    data = _dump_checked(body, "state")
    parse_state(state.device_id, data)
    return data


def _dump_checked(body: dict[str, Any], what: str) -> bytes:
    """JSON for a body the caller then parses: a NaN is written here so the parser names its field."""
    try:
        return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
    except (TypeError, ValueError) as exc:  # a value JSON has no form for
        raise ProtocolError(f"{what} cannot be encoded: {str(exc)[:80]}", "bad_json") from None


def state_message(device_id: str, **fields: Any) -> bytes:
    """``encode_state(DeviceState(device_id, **fields))``: what the simulator and tests send."""
    return encode_state(DeviceState(device_id, **fields))


def offline_will(device_id: str) -> bytes:
    return encode_state(OfflineMark(device_id))


# -- telemetry ------------------------------------------------------------------------------------------
def parse_telemetry(device_id: str, payload: bytes) -> Telemetry:
    """The parts of a telemetry message the fleet uses: ``model`` {name, version}; latency p95 as
    ``latency_ms.p95_ms`` (the agent's) or ``latency_p95_ms``; ``error_rate`` in [0, 1];
    ``rejected_messages``. Anything else is ignored."""
    obj = load_object(payload, MAX_TELEMETRY_BYTES, "telemetry")
    body_id = obj.get("device_id", obj.get("device"))
    if body_id is not None and body_id != device_id:
        raise ProtocolError(f"telemetry names device {_shown(body_id)} on {device_id!r}'s topic", "wrong_device",
                            "device_id")
    latency = obj.get("latency_ms")
    require(latency is None or isinstance(latency, dict), "latency_ms", "an object or null", latency)
    p95 = (_num(latency.get("p95_ms"), "latency_ms.p95_ms", 0.0, 1e7) if latency is not None
           else _num(obj.get("latency_p95_ms"), "latency_p95_ms", 0.0, 1e7))
    dropped = _mapping(obj.get("dropped"), "dropped", 32) or {}
    errors = dropped.get("inference_errors")
    return Telemetry(device_id, _model(obj.get("model"), "model"), p95,
                     _num(obj.get("error_rate"), "error_rate", 0.0, 1.0), parse_rejected(obj.get("rejected_messages")),
                     _num(obj.get("windows_per_s"), "windows_per_s", 0.0, 1e9),
                     _num(latency.get("p50_ms"), "latency_ms.p50_ms", 0.0, 1e7) if latency is not None else None,
                     None if errors is None else check_int(errors, "dropped.inference_errors", 0, MAX_COUNT),
                     parse_profile(obj.get("profile")), _last_download(obj.get("update_downloads")))


def _last_download(v: Any) -> dict[str, Any] | None:
    """``update_downloads.last``: the agent's last model download (what a rollout's transfer sums)."""
    last = (_mapping(v, "update_downloads", 16) or {}).get("last")
    if _mapping(last, "update_downloads.last", 8) is None:
        return None
    target = _model(last.get("target"), "update_downloads.last.target")
    require(target is not None, "update_downloads.last.target", "{name, version}", None)
    delta = last.get("delta")
    require(isinstance(delta, bool), "update_downloads.last.delta", "true or false", delta)
    return {"target": str(target), "bytes": check_int(last.get("bytes"), "update_downloads.last.bytes", 0, MAX_COUNT),
            "full_bytes": check_int(last.get("full_bytes"), "update_downloads.last.full_bytes", 0, MAX_COUNT),
            "delta": delta}


def parse_profile(v: Any, path: str = "profile") -> dict[str, dict[str, float | None]] | None:
    """The agent's per-stage profile, ``{thread: {"us_per_window": {stage: µs or null}, ...}}`` (what
    ``edgeopt agent status`` shows), reduced to thread → stage → µs per window; at most 32 × 32."""
    if _mapping(v, path, MAX_PROFILE_ENTRIES) is None:
        return None
    out: dict[str, dict[str, float | None]] = {}
    for thread, info in v.items():
        require(is_text(thread, 64), path, "keyed by thread names of at most 64 printable characters", thread)
        require(isinstance(info, dict), f"{path}.{thread}", "an object", info)
        stages = _mapping(info.get("us_per_window"), f"{path}.{thread}.us_per_window", MAX_PROFILE_ENTRIES) or {}
        for stage, us in stages.items():
            require(is_text(stage, 64), f"{path}.{thread}", "keyed by stage names of at most 64 characters", stage)
            _num(us, f"{path}.{thread}.{stage}", 0.0, 1e12)
        out[thread] = dict(stages)
    return out


def _sanitized(value: Any, depth: int) -> Any:
    """Free-form telemetry made strict: texts cleaned, non-finite numbers null, nesting bounded."""
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if depth >= MAX_TELEMETRY_DEPTH:
        return None
    if isinstance(value, Mapping):
        return {clean_text(k, SHORT_CHARS): _sanitized(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_sanitized(v, depth + 1) for v in value]
    return clean_text(value, STATUS_CHARS)


def encode_telemetry(device_id: str, snapshot: Mapping[str, Any]) -> bytes:
    """A telemetry payload from the agent's snapshot (free-form, sanitized); the fields the fleet
    reads must pass its parser, or ``ProtocolError`` is raised instead of sending it."""
    check_id(device_id, "device_id", DEVICE_ID_RE, optional=False)
    body = _sanitized({k: v for k, v in snapshot.items() if k not in ("device", "device_id")}, 0)
    data = _dump_checked({"device": device_id, **body}, "telemetry")
    parse_telemetry(device_id, data)
    return data
