"""The device↔fleet protocol (``edgeopt.protocol``): every field of state / telemetry / desired
messages is validated, anything malformed raises ProtocolError (never another exception), and what
the encoders produce the parsers accept. The hostile corpus is in test_protocol_hostile.py."""

from __future__ import annotations

import contextlib
import json
import random

import pytest

from edgeopt.agent.update.machine import State
from edgeopt.protocol import (
    MAX_STATE_BYTES,
    STATE_SCHEMA,
    UPDATE_STATES,
    Desired,
    DeviceState,
    Health,
    ModelRef,
    OfflineMark,
    ProtocolError,
    UpdateStatus,
    encode_desired,
    offline_will,
    parse_desired,
    parse_device_topic,
    parse_state,
    parse_telemetry,
    state_message,
)


def good_state(**over):
    body = {"schema": STATE_SCHEMA, "device_id": "dev-1", "online": True, "agent_version": "0.1.0",
            "profile": "raspberry-pi-4", "labels": {"site": "lab", "ring": "canary"},
            "model": {"name": "kws", "version": "1"},
            "update": {"state": "PROBATION", "target": {"name": "kws", "version": "2"}, "rollout": "r-1",
                       "reason": None, "since": 1700000000.5},
            "health": {"error_rate": 0.01, "latency_p95_ms": 3.5, "agreement": 0.99, "nan_outputs": 0},
            "ts": 1700000001.0}
    body.update(over)
    return body


def enc(obj) -> bytes:
    return json.dumps(obj).encode()


def test_update_state_names_match_the_agent_machine():
    assert set(UPDATE_STATES) == {s.value for s in State}


def test_state_round_trip():
    payload = state_message("dev-1", agent_version="0.1", profile="raspberry-pi-4", labels={"site": "lab"},
                            model=ModelRef("kws", "1"),
                            update=UpdateStatus("DOWNLOADING", ModelRef("kws", "2"), "r-1", None, 5.0),
                            health=Health(0.0, 1.5, None, 0), ts=7.0)
    st = parse_state("dev-1", payload)
    assert isinstance(st, DeviceState)
    assert st.model == ModelRef("kws", "1") and st.update.target == ModelRef("kws", "2")
    assert st.update.state == "DOWNLOADING" and st.update.rollout == "r-1" and st.labels == {"site": "lab"}
    assert st.health == Health(0.0, 1.5, None, 0) and st.online and st.ts == 7.0


def test_full_contract_example_parses():
    st = parse_state("dev-1", enc(good_state()))
    assert st.profile == "raspberry-pi-4" and st.health.agreement == 0.99 and st.update.since == 1700000000.5


def test_last_will_is_an_offline_mark():
    assert parse_state("dev-1", offline_will("dev-1")) == OfflineMark("dev-1")
    # a full state that says offline (a clean shutdown) keeps its fields
    st = parse_state("dev-1", enc(good_state(online=False)))
    assert isinstance(st, DeviceState) and not st.online


def test_optional_fields_may_be_missing_or_null():
    body = good_state(health=None, profile=None, agent_version=None, model=None)
    del body["ts"]
    st = parse_state("dev-1", enc(body))
    assert st.health is None and st.model is None and st.ts == 0.0


BAD_STATES = [
    ("not json", b"{nope", "not JSON"),
    ("a list", b"[1, 2]", "not a JSON object"),
    ("binary", b"\xff\xfe\x00", "not JSON"),
    ("too big", enc(good_state(agent_version="x" * (MAX_STATE_BYTES + 1))), "exceeds"),
    ("schema", enc(good_state(schema="edgeopt.state/9")), "schema"),
    ("other device", enc(good_state(device_id="dev-2")), "does not match"),
    ("online string", enc(good_state(online="yes")), "online"),
    ("labels list", enc(good_state(labels=["a"])), "labels"),
    ("label key", enc(good_state(labels={"bad key": "x"})), "label"),
    ("label value", enc(good_state(labels={"site": "a b"})), "label"),
    ("label value type", enc(good_state(labels={"site": 3})), "label"),
    ("too many labels", enc(good_state(labels={f"k{i}": "v" for i in range(40)})), "labels"),
    ("model no version", enc(good_state(model={"name": "kws"})), "version"),
    ("model traversal", enc(good_state(model={"name": "../x", "version": "1"})), "name"),
    ("model string", enc(good_state(model="kws@1")), "model"),
    ("update missing", enc({k: v for k, v in good_state().items() if k != "update"}), "update"),
    ("update state", enc(good_state(update={"state": "EXPLODED"})), "update.state"),
    ("update target", enc(good_state(update={"state": "IDLE", "target": {"name": "a/b", "version": "1"}})), "update"),
    ("update rollout", enc(good_state(update={"state": "IDLE", "rollout": "r 1"})), "rollout"),
    ("update since nan", b'{"schema": "edgeopt.state/1", "device_id": "dev-1", "online": true, '
                         b'"update": {"state": "IDLE", "since": NaN}}', "since"),
    ("update reason ctrl", enc(good_state(update={"state": "IDLE", "reason": "a\x00b"})), "reason"),
    ("update reason long", enc(good_state(update={"state": "IDLE", "reason": "r" * 500})), "reason"),
    ("health list", enc(good_state(health=[0.1])), "health"),
    ("error rate > 1", enc(good_state(health={"error_rate": 1.5})), "error_rate"),
    ("error rate bool", enc(good_state(health={"error_rate": True})), "error_rate"),
    ("agreement string", enc(good_state(health={"error_rate": 0, "agreement": "high"})), "agreement"),
    ("nan outputs negative", enc(good_state(health={"error_rate": 0, "nan_outputs": -1})), "nan_outputs"),
    ("latency infinite", b'{"schema": "edgeopt.state/1", "device_id": "dev-1", "online": true, '
                         b'"update": {"state": "IDLE"}, "health": {"error_rate": 0, "latency_p95_ms": Infinity}}',
     "latency"),
    ("ts string", enc(good_state(ts="now")), "ts"),
    ("agent version long", enc(good_state(agent_version="v" * 65)), "agent_version"),
    ("profile chars", enc(good_state(profile="pi 4; rm -rf")), "profile"),
]


@pytest.mark.parametrize("case,payload,needle", BAD_STATES, ids=[c[0] for c in BAD_STATES])
def test_malformed_state_is_refused_naming_the_field(case, payload, needle):
    with pytest.raises(ProtocolError, match=needle):
        parse_state("dev-1", payload)


def test_random_mutations_raise_only_message_error():
    rng = random.Random(7)
    base = enc(good_state())
    values = [None, True, -1, 1e308, "x" * 300, [], {}, {"name": 1}, "IDLE", float("nan")]
    for _ in range(3000):
        if rng.random() < 0.5:  # byte-level damage
            data = bytearray(base)
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            payload = bytes(data[: rng.randint(0, len(data))])
        else:  # structural damage
            body = good_state()
            target = body if rng.random() < 0.6 else body[rng.choice(["update", "health", "labels", "model"])]
            key = rng.choice(list(target) + ["extra"])
            target[key] = rng.choice(values)
            payload = json.dumps(body).encode()
        with contextlib.suppress(ProtocolError):
            parse_state("dev-1", payload)


def test_device_topic():
    assert parse_device_topic("edgeopt", "edgeopt/devices/dev-1/state") == ("dev-1", "state")
    assert parse_device_topic("p/q", "p/q/devices/a.b_c/telemetry") == ("a.b_c", "telemetry")
    for bad in ("edgeopt/devices/dev-1/other", "edgeopt/devices/../state", "other/devices/dev-1/state",
                "edgeopt/devices//state", "edgeopt/devices/dev-1/state/x"):
        with pytest.raises(ProtocolError):
            parse_device_topic("edgeopt", bad)


def test_telemetry_agent_shape_and_flat_shape():
    t = parse_telemetry("dev-1", enc({"device": "dev-1", "model": {"name": "kws", "version": "2"},
                                      "latency_ms": {"p50_ms": 1.0, "p95_ms": 4.0}, "windows_out": 10}))
    assert t.latency_p95_ms == 4.0 and t.model == ModelRef("kws", "2") and t.error_rate is None
    t = parse_telemetry("dev-1", enc({"latency_p95_ms": 2.0, "error_rate": 0.25}))
    assert t.latency_p95_ms == 2.0 and t.error_rate == 0.25 and t.model is None
    t = parse_telemetry("dev-1", enc({"latency_ms": {"p95_ms": None}}))
    assert t.latency_p95_ms is None


@pytest.mark.parametrize("payload,needle", [
    (enc({"device_id": "dev-2"}), "names device"),
    (enc({"latency_ms": {"p95_ms": -3}}), "p95_ms"),
    (enc({"error_rate": 2}), "error_rate"),
    (enc({"model": {"name": "kws"}}), "version"),
    (b"\x00" * 10, "not JSON"),
    (b"x" * 70_000, "exceeds"),
])
def test_malformed_telemetry(payload, needle):
    with pytest.raises(ProtocolError, match=needle):
        parse_telemetry("dev-1", payload)


def test_desired_round_trip_and_clear():
    assert parse_desired(encode_desired(ModelRef("kws", "2"), "r-1")) == Desired(ModelRef("kws", "2"), "r-1")
    assert parse_desired(encode_desired(ModelRef("kws", "2"), None)) == Desired(ModelRef("kws", "2"), None)
    assert encode_desired(None, "r-1") == b"" and parse_desired(b"") == Desired(None, None)
    for bad in (b"[]", enc({"name": "kws"}), enc({"name": "kws", "version": "../1"}),
                enc({"name": "kws", "version": "1", "rollout": 5})):
        with pytest.raises(ProtocolError):
            parse_desired(bad)


def test_model_ref_parse():
    assert ModelRef.parse("kws@2.1") == ModelRef("kws", "2.1") and str(ModelRef("a", "b")) == "a@b"
    for bad in ("kws", "kws@", "@1", "a/b@1", "kws@1@2", "..@1"):
        with pytest.raises(ProtocolError):
            ModelRef.parse(bad)
