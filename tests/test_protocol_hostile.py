"""Every field of every protocol message fed a corpus of hostile values.

For each field the table says which corpus values its rule accepts (a printable text may hold '..' or
a Cyrillic letter; an identifier holds none of them). Everything else must be refused with
``ProtocolError`` — never another exception — naming the field where the message could be read at
all. A good message still passes, and what parses re-encodes to a fixed point.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import pytest

from edgeopt.protocol import (
    STATE_SCHEMA,
    DeviceState,
    ProtocolError,
    encode_desired,
    encode_state,
    encode_telemetry,
    parse_desired,
    parse_state,
    parse_telemetry,
)
from edgeopt.repo_frames import ChunkRequest, ChunkResponse, decode_request, decode_response

# -- the corpus -------------------------------------------------------------------------------------------
RAW = "\ue000raw{}\ue000"  # a marker replaced by raw JSON text after encoding
SUFFIXES = ["\n", "\r\n", "\x00", "\x1b[2J", "\x7f", "\u0085", "\u202e", "\u200b", "\u2028", "\ufeff"]
PATHS = ["..", "../x", "/", ""]
LOOKALIKES = ["im\u0430", "imu\uff20", "1\u20242"]  # Cyrillic а, fullwidth ＠, one-dot leader ․
TYPES = [[], {}, [1], {"a": 1}, 1, 1.5, -1, 2**64, True, False, None]
RAW_TOKENS = {"NaN": "NaN", "Infinity": "Infinity", "-Infinity": "-Infinity", "1e999": "1e999",
              "10 MB": '"' + "x" * 10_000_000 + '"', "100k nested lists": "[" * 100_000 + "]" * 100_000,
              "2k nested lists": "[" * 2_000 + "]" * 2_000, "10k nested objects": '{"a":' * 10_000 + "1" + "}" * 10_000}


class Raw:
    def __init__(self, name: str):
        self.name, self.text = name, RAW_TOKENS[name]

    def __repr__(self) -> str:
        return f"<{self.name}>"


def corpus(base: str) -> list[Any]:
    """Hostile values for a field whose good value is ``base``."""
    return ([base + s for s in SUFFIXES] + [s + base for s in ("\n", " ", "\u200b")] + PATHS + LOOKALIKES + TYPES
            + [Raw(n) for n in RAW_TOKENS])


def render(message: Any) -> bytes:
    raws: dict[str, str] = {}

    def swap(v: Any) -> Any:
        if isinstance(v, Raw):
            marker = RAW.format(len(raws))
            raws[marker] = v.text
            return marker
        if isinstance(v, dict):
            return {swap(k) if isinstance(k, Raw) else k: swap(x) for k, x in v.items()}
        return [swap(x) for x in v] if isinstance(v, list) else v

    text = json.dumps(swap(message), ensure_ascii=False)
    for marker, raw in raws.items():
        text = text.replace(json.dumps(marker, ensure_ascii=False), raw)
    return text.encode("utf-8", "surrogatepass")


# -- which corpus values a rule accepts ------------------------------------------------------------------------
def ident(optional: bool = True):
    return lambda v: v is None and optional


def text(optional: bool = True, empty: bool = True):
    """Printable text: '..', '/', look-alike letters and a leading space are fine; no control,
    format or separator characters, no other types."""
    ok = set(PATHS) | set(LOOKALIKES)
    return lambda v: (v is None and optional) or (isinstance(v, str) and (v in ok or v.startswith(" "))
                                                  and (empty or v != ""))


def label_value(v):
    return isinstance(v, str) and v in PATHS


def number(lo: float, hi: float, optional: bool = True):
    return lambda v: (v is None and optional) or (type(v) in (int, float) and lo <= v <= hi)


def integer(lo: int, hi: int, optional: bool = False):
    return lambda v: (v is None and optional) or (type(v) is int and lo <= v <= hi)


def boolean(v):
    return isinstance(v, bool)


def one_of(*allowed):
    return lambda v: any(v is a or (type(v) is type(a) and v == a) for a in allowed)


NOTHING = one_of()

# -- the messages and their fields ----------------------------------------------------------------------------
GOOD_STATE = {
    "schema": STATE_SCHEMA, "device_id": "dev-1", "online": True, "agent_version": "0.1.0",
    "profile": "raspberry-pi-4", "labels": {"site": "lab"},
    "model": {"name": "imu", "version": "1", "slot": "a", "runtime": "onnxruntime"},
    "update": {"state": "PROBATION", "target": {"name": "imu", "version": "2"}, "rollout": "r-1",
               "reason": "probation", "since": 5.0},
    "health": {"error_rate": 0.0, "latency_p95_ms": 2.0, "agreement": 1.0, "nan_outputs": 0},
    "status": "running", "error": "none", "config_error": "none", "fallback": "none",
    "sources": {"imu": {"type": "synthetic", "status": "running", "error": "none"}},
    "rejected_messages": {"desired": {"bad_version": 1}}, "slot_errors": {"b": "unreadable"}, "ts": 7.0,
}
GOOD_TELEMETRY = {"device": "dev-1", "model": {"name": "imu", "version": "1"}, "error_rate": 0.0,
                  "latency_ms": {"p50_ms": 1.0, "p95_ms": 2.0}, "rejected_messages": {"repo": {"bad_frame": 2}}}
GOOD_DESIRED = {"name": "imu", "version": "12", "rollout": "r-1"}
GOOD_REQUEST = {"id": "req-1", "path": "metadata/timestamp.json", "offset": 0, "length": 1024}
GOOD_HEADER = {"id": "req-1", "path": "targets/abc.imu-1.tar", "offset": 0, "total": 10, "length": 4}
GOOD_ERROR_HEADER = {"id": "req-1", "path": "targets/abc.imu-1.tar", "error": "not_found"}


def frame(header: Any) -> bytes:
    raw = render(header)
    return struct.pack(">I", len(raw)) + raw + b"data"


MESSAGES = {
    "state": (GOOD_STATE, lambda p: parse_state("dev-1", p)),
    "telemetry": (GOOD_TELEMETRY, lambda p: parse_telemetry("dev-1", p)),
    "telemetry-flat": ({"latency_p95_ms": 2.0}, lambda p: parse_telemetry("dev-1", p)),
    "desired": (GOOD_DESIRED, parse_desired),
    "request": (GOOD_REQUEST, lambda p: decode_request(p, 64 * 1024)),
    "response": (GOOD_HEADER, None),
    "response-error": (GOOD_ERROR_HEADER, None),
}

# (message, path to the field, its good value for the corpus, which corpus values its rule accepts)
FIELDS = [
    ("state", "schema", "edgeopt.state/1", NOTHING),
    ("state", "device_id", "dev-1", NOTHING),
    ("state", "online", "x", boolean),
    ("state", "agent_version", "0.1.0", text()),
    ("state", "profile", "raspberry-pi-4", ident()),
    ("state", "labels", "x", one_of(None, {})),
    ("state", "labels.site", "lab", label_value),
    ("state", "model", "x", one_of(None)),
    ("state", "model.name", "imu", ident(False)),
    ("state", "model.version", "1", ident(False)),
    ("state", "model.slot", "a", ident()),
    ("state", "model.runtime", "onnxruntime", ident()),
    ("state", "update", "x", NOTHING),
    ("state", "update.state", "IDLE", NOTHING),
    ("state", "update.target", "x", one_of(None)),
    ("state", "update.target.name", "imu", ident(False)),
    ("state", "update.target.version", "12", ident(False)),
    ("state", "update.rollout", "r-1", ident()),
    ("state", "update.reason", "refused", text()),
    ("state", "update.since", "x", number(0, 1e11)),
    ("state", "health", "x", one_of(None)),
    ("state", "health.error_rate", "x", number(0, 1, optional=False)),
    ("state", "health.latency_p95_ms", "x", number(0, 1e7)),
    ("state", "health.agreement", "x", number(0, 1)),
    ("state", "health.nan_outputs", "x", integer(0, 2**53, optional=True)),
    ("state", "status", "running", text()),
    ("state", "error", "bad", text()),
    ("state", "config_error", "bad", text()),
    ("state", "fallback", "slot a", text()),
    ("state", "sources", "x", one_of(None, {})),
    ("state", "sources.imu", "x", NOTHING),
    ("state", "sources.imu.type", "synthetic", ident(False)),
    ("state", "sources.imu.status", "running", ident(False)),
    ("state", "sources.imu.error", "eof", text()),
    ("state", "rejected_messages", "x", one_of(None, {})),
    ("state", "rejected_messages.desired", "x", one_of({}, {"a": 1})),
    ("state", "rejected_messages.desired.bad_version", "x", integer(0, 2**53)),
    ("state", "slot_errors", "x", one_of(None, {})),
    ("state", "slot_errors.b", "unreadable", text(optional=False)),
    ("state", "ts", "x", number(0, 1e11)),
    ("telemetry", "device", "dev-1", one_of(None)),
    ("telemetry", "model", "x", one_of(None)),
    ("telemetry", "model.name", "imu", ident(False)),
    ("telemetry", "model.version", "1", ident(False)),
    ("telemetry", "error_rate", "x", number(0, 1)),
    ("telemetry", "latency_ms", "x", one_of(None, {}, {"a": 1})),
    ("telemetry", "latency_ms.p95_ms", "x", number(0, 1e7)),
    ("telemetry", "rejected_messages", "x", one_of(None, {})),
    ("telemetry", "rejected_messages.repo.bad_frame", "x", integer(0, 2**53)),
    ("telemetry-flat", "latency_p95_ms", "x", number(0, 1e7)),
    ("telemetry-flat", "device_id", "dev-1", one_of(None)),
    ("desired", "name", "imu", ident(False)),
    ("desired", "version", "12", ident(False)),
    ("desired", "rollout", "r-1", ident()),
    ("request", "id", "req-1", ident(False)),
    ("request", "path", "metadata/timestamp.json", NOTHING),
    ("request", "offset", "x", integer(0, 2**40)),
    ("request", "length", "x", integer(1, 64 * 1024)),
    ("request", "cast", "x", integer(0, 2**20)),
    ("response", "id", "req-1", ident(False)),
    ("response", "path", "targets/abc.imu-1.tar", NOTHING),
    ("response", "offset", "x", integer(0, 6)),     # offset + 4 data bytes within the total of 10
    ("response", "total", "x", integer(4, 2**40)),
    ("response", "length", "x", one_of()),          # must equal the 4 data bytes
    ("response-error", "error", "not_found", text(optional=False, empty=False)),
]
# keys of the objects that are keyed by something with a rule: (message, path of the object, its rule for keys)
KEYS = [
    ("state", "labels", ident(False)),
    ("state", "sources", text(optional=False, empty=False)),
    ("state", "rejected_messages", ident(False)),
    ("state", "rejected_messages.desired", ident(False)),
    ("state", "slot_errors", ident(False)),
    ("telemetry", "rejected_messages", ident(False)),
]


def with_value(message: dict, path: str, value: Any) -> dict:
    out = json.loads(json.dumps(message))
    *parents, leaf = path.split(".")
    node = out
    for p in parents:
        node = node[p]
    node[leaf] = value
    return out


def with_key(message: dict, path: str, key: Any) -> dict:
    out = json.loads(json.dumps(message))
    node = out
    for p in path.split("."):
        node = node[p]
    first = next(iter(node))
    node[key] = node.pop(first)
    return out


def parse(kind: str, message: dict):
    if kind.startswith("response"):
        return decode_response(frame(message), 64 * 1024)
    return MESSAGES[kind][1](render(message))


def check(kind: str, message: dict, value: Any, accepted: bool, where: str) -> None:
    try:
        parsed = parse(kind, message)
    except ProtocolError as exc:
        assert not accepted, f"{kind} {where}={value!r}: refused, but the rule accepts it: {exc}"
        generic = exc.code in ("too_large", "too_deep", "bad_json", "bad_frame", "wrong_device")
        assert generic or where.split(".")[0] in str(exc) or where.split(".")[-1] in str(exc), \
            f"{kind} {where}={value!r}: the error does not name the field: {exc}"
        return
    assert accepted, f"{kind} {where}={value!r} was accepted"
    assert_round_trip(kind, parsed, message)


def assert_round_trip(kind: str, parsed: Any, message: dict) -> None:
    """encode(parse(x)) is a fixed point."""
    if kind == "state" and isinstance(parsed, DeviceState):
        once = encode_state(parsed)
        assert encode_state(parse_state("dev-1", once)) == once
    elif kind == "desired":
        once = encode_desired(parsed.model, parsed.rollout)
        assert parse_desired(once) == parsed and encode_desired(parsed.model, parsed.rollout) == once
    elif kind.startswith("telemetry"):
        once = encode_telemetry("dev-1", message)
        assert encode_telemetry("dev-1", json.loads(once)) == once
        assert parse_telemetry("dev-1", once) == parsed
    elif kind == "request":
        assert decode_request(parsed.encode(), 64 * 1024) == parsed
    else:
        assert decode_response(parsed.encode(), 64 * 1024) == parsed


@pytest.mark.parametrize("kind,path,good,accepts", FIELDS, ids=[f"{f[0]}:{f[1]}" for f in FIELDS])
def test_every_field_refuses_the_hostile_corpus(kind, path, good, accepts):
    base = MESSAGES[kind][0]
    check(kind, base, "good", True, "(good message)")
    for value in corpus(good):
        check(kind, with_value(base, path, value), value, accepts(value), path)


@pytest.mark.parametrize("kind,path,accepts", KEYS, ids=[f"{k[0]}:{k[1]}:keys" for k in KEYS])
def test_every_key_refuses_the_hostile_corpus(kind, path, accepts):
    base = MESSAGES[kind][0]
    for value in corpus("k"):
        if isinstance(value, str) and value != "k":
            check(kind, with_key(base, path, value), value, accepts(value), path)


def test_the_newline_version_is_refused_everywhere_it_could_enter():
    """The bug that blinded the fleet: a version that ends in a newline."""
    for payload in (b'{"name": "imu", "version": "12\\n"}', b'{"name": "imu\\n", "version": "12"}',
                    b'{"name": "imu", "version": "12", "rollout": "r-1\\n"}'):
        with pytest.raises(ProtocolError) as exc:
            parse_desired(payload)
        assert exc.value.code in ("bad_version", "bad_name", "bad_rollout")
    state = with_value(GOOD_STATE, "update.target.version", "12\n")
    with pytest.raises(ProtocolError, match="update.target.version"):
        parse_state("dev-1", render(state))
    with pytest.raises(ProtocolError, match="path"):
        decode_request(render(with_value(GOOD_REQUEST, "path", "metadata/timestamp.json\n")))
    with pytest.raises(ProtocolError, match="id"):
        decode_response(ChunkResponse("req-1\n", "metadata/1.root.json", 0, 4, b"data").encode())
    assert decode_request(ChunkRequest("req-1", "metadata/timestamp.json", 0, 1).encode()).path.endswith(".json")
