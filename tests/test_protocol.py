"""The device↔fleet protocol (``edgeopt.protocol``): every field of state / telemetry / desired
messages is validated, anything malformed raises ProtocolError (never another exception), and what
the encoders produce the parsers accept. The hostile corpus is in test_protocol_hostile.py."""

from __future__ import annotations

import contextlib
import json
import random

import pytest

from edgeopt.agent.telemetry import RejectedMessages
from edgeopt.agent.update.machine import State
from edgeopt.protocol import (
    DEVICE_ID_RE,
    LABEL_KEY_RE,
    LABEL_VALUE_RE,
    MAX_LABELS,
    MAX_REJECT_KINDS,
    MAX_REJECT_REASONS,
    MAX_SOURCES,
    MAX_STATE_BYTES,
    NAME_RE,
    REPO_PATH_RE,
    REQUEST_ID_RE,
    ROLLOUT_ID_RE,
    SHORT_CHARS,
    STATE_SCHEMA,
    UPDATE_STATES,
    Desired,
    DeviceState,
    Health,
    ModelRef,
    OfflineMark,
    ProtocolError,
    SourceStatus,
    UpdateStatus,
    clean_text,
    encode_desired,
    encode_state,
    encode_telemetry,
    offline_will,
    parse_desired,
    parse_device_topic,
    parse_state,
    parse_telemetry,
    state_message,
)
from edgeopt.repo_client import MqttRepoLink
from edgeopt.repo_frames import ChunkResponse


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


def test_random_mutations_raise_only_protocol_error():
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


def test_telemetry_carries_throughput_errors_and_the_agents_profile():
    profile = {"source:imu": {"windows": 10, "seconds": 0.5, "us_per_window": {"read": 3.5, "window": None}},
               "inference": {"windows": 10, "seconds": 0.4, "us_per_window": {"inference": 40.0, "sink:mqtt": 2.0}}}
    t = parse_telemetry("dev-1", enc({"windows_per_s": 120.5, "latency_ms": {"p50_ms": 1.5, "p95_ms": 4.0},
                                      "dropped": {"inference_errors": 3, "nan_windows": 1}, "profile": profile}))
    assert (t.windows_per_s, t.latency_p50_ms, t.inference_errors) == (120.5, 1.5, 3)
    assert t.profile == {"source:imu": {"read": 3.5, "window": None}, "inference": {"inference": 40.0, "sink:mqtt": 2.0}}


def test_telemetry_carries_the_last_model_download():
    last = {"target": {"name": "kws", "version": "2"}, "bytes": 1200, "full_bytes": 51200, "delta": True}
    t = parse_telemetry("dev-1", enc({"update_downloads": {"bytes_network": 9, "last": last}}))
    assert t.last_download == {"target": "kws@2", "bytes": 1200, "full_bytes": 51200, "delta": True}
    assert parse_telemetry("dev-1", enc({"update_downloads": {"last": None}})).last_download is None
    assert parse_telemetry("dev-1", enc({"update_downloads": None})).last_download is None


@pytest.mark.parametrize("body,needle", [
    ({"update_downloads": {"last": {"target": None, "bytes": 1, "full_bytes": 1, "delta": False}}},
     "update_downloads.last.target"),
    ({"update_downloads": {"last": {"target": {"name": "k", "version": "1"}, "bytes": -1, "full_bytes": 1,
                                    "delta": False}}}, "update_downloads.last.bytes"),
    ({"update_downloads": {"last": {"target": {"name": "k", "version": "1"}, "bytes": 1, "full_bytes": 1,
                                    "delta": "yes"}}}, "update_downloads.last.delta"),
    ({"windows_per_s": -1}, "windows_per_s"),
    ({"dropped": {"inference_errors": 1.5}}, "dropped.inference_errors"),
    ({"dropped": [1]}, "dropped"),
    ({"profile": {f"t{i}": {"us_per_window": {}} for i in range(33)}}, "profile"),
    ({"profile": {"inference": {"us_per_window": {"inference": "fast"}}}}, "profile.inference.inference"),
    ({"profile": {"inference": 5}}, "profile.inference"),
    ({"profile": {"bad\nthread": {"us_per_window": {}}}}, "thread names"),
])
def test_hostile_telemetry_fields_are_refused_by_name(body, needle):
    with pytest.raises(ProtocolError, match=needle):
        parse_telemetry("dev-1", enc(body))


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


# -- encoders: what one side sends, the other accepts ---------------------------------------------------------
def test_the_state_encoder_sanitizes_texts_so_the_fleet_never_drops_the_state():
    echoed = "not_allowed: imu@12\n is not in the signed targets\x00\u202e" + "x" * 500
    payload = state_message("dev-1", update=UpdateStatus("ROLLED_BACK", ModelRef("imu", "1"), None, echoed, 1.0),
                            error="line one\nline two", slot_errors={"b": "unreadable:\tmanifest.json"},
                            sources={"imu": SourceStatus("synthetic", "error", "eof\r\n")})
    st = parse_state("dev-1", payload)
    assert st.update.reason.startswith("not_allowed: imu@12\\n is not in") and len(st.update.reason) == 200
    assert st.error == "line one\\nline two" and st.slot_errors == {"b": "unreadable:\\tmanifest.json"}
    assert st.sources["imu"].error == "eof\\r\\n"


@pytest.mark.parametrize("fields,field", [
    ({"update": UpdateStatus("IDLE", ModelRef("imu", "12\n"))}, "update.target.version"),
    ({"model": ModelRef("imu\u0430", "1")}, "model.name"),
    ({"labels": {"site": "a b"}}, "labels"),
    ({"profile": "pi 4"}, "profile"),
    ({"update": UpdateStatus("EXPLODED")}, "update.state"),
    ({"health": Health(float("nan"))}, "health.error_rate"),
    ({"rejected_messages": {"desired": {"Bad Code": 1}}}, "rejected_messages"),
    ({"slot_errors": {"c": "x"}}, "slot_errors"),
    ({"model_slot": "c", "model": ModelRef("imu", "1")}, "model.slot"),
])
def test_the_state_encoder_refuses_identifiers_that_break_a_rule(fields, field):
    with pytest.raises(ProtocolError) as exc:
        state_message("dev-1", **fields)
    assert exc.value.field == field


def test_encoders_refuse_what_the_parsers_would_drop():
    with pytest.raises(ProtocolError, match="version"):
        encode_desired(ModelRef("imu", "12\n"), None)
    with pytest.raises(ProtocolError, match="rollout"):
        encode_desired(ModelRef("imu", "12"), "r 1")
    with pytest.raises(ProtocolError, match="device_id"):
        offline_will("dev\n1")
    with pytest.raises(ProtocolError, match="too_large|exceeds"):
        encode_telemetry("dev-1", {"blob": ["x" * 400] * 200})
    with pytest.raises(ProtocolError, match="rejected_messages"):
        encode_telemetry("dev-1", {"rejected_messages": {"desired": {"bad": -1}}})


def test_telemetry_encoder_makes_free_form_values_strict():
    snapshot = {"device": "spoofed", "error": "a\nb", "windows_per_s": float("nan"), "deep": [[[[[[[[[[1]]]]]]]]]],
                "latency_ms": {"p95_ms": 2.5}, "rejected_messages": {"desired": {"bad_version": 1}}}
    body = json.loads(encode_telemetry("dev-1", snapshot))
    assert body["device"] == "dev-1" and body["error"] == "a\\nb" and body["windows_per_s"] is None
    t = parse_telemetry("dev-1", encode_telemetry("dev-1", snapshot))
    assert t.latency_p95_ms == 2.5 and t.rejected_messages == {"desired": {"bad_version": 1}}


def test_the_largest_state_the_encoder_allows_fits_the_limit():
    long = "\U0001f600" * 1000  # 4 bytes each in UTF-8, cut to each field's limit
    state = DeviceState(
        "d" * 64, agent_version=long, profile="p" * 63,
        labels={f"{i:02d}" + "k" * 61: "v" * 128 for i in range(MAX_LABELS)},
        model=ModelRef("m" * 64, "v" * 64), model_slot="a", model_runtime="r" * 64,
        update=UpdateStatus("ROLLED_BACK", ModelRef("m" * 64, "v" * 64), "r" * 64, long, 1e10),
        health=Health(1.0, 1e7, 1.0, 2**53), ts=1e10, status=long, error=long, config_error=long, fallback=long,
        sources={f"{i:02d}{long}": SourceStatus("t" * 64, "s" * 64, long) for i in range(MAX_SOURCES)},
        rejected_messages={f"kind{i}" + "k" * 27: {f"code{j}" + "c" * 27: 2**53 for j in range(MAX_REJECT_REASONS)}
                           for i in range(MAX_REJECT_KINDS)},
        slot_errors={"a": long, "b": long})
    payload = encode_state(state)
    assert len(payload) <= MAX_STATE_BYTES
    assert parse_state("d" * 64, payload).sources.keys() == {clean_text(n, SHORT_CHARS) for n in state.sources}


def test_whole_string_rules_also_hold_for_match():
    for pattern in (NAME_RE, DEVICE_ID_RE, ROLLOUT_ID_RE, LABEL_KEY_RE, LABEL_VALUE_RE, REQUEST_ID_RE, REPO_PATH_RE):
        assert pattern.match("metadata/x\n") is None and pattern.match("a\n") is None
    assert DEVICE_ID_RE.match("a..b") is None and NAME_RE.match("1..2") is None
    assert REPO_PATH_RE.match("targets/a..b.tar") is None


def test_slot_errors_are_bounded():
    ok = state_message("dev-1", slot_errors={"a": "hash mismatch", "b": "unreadable"})
    assert parse_state("dev-1", ok).slot_errors == {"a": "hash mismatch", "b": "unreadable"}
    assert parse_state("dev-1", state_message("dev-1")).slot_errors is None  # absent: none
    for bad in ({"a": "x", "b": "y", "c": "z"}, {"a": "r" * 201}, {"a": None}, {"A": "x"}, ["a"]):
        with pytest.raises(ProtocolError, match="slot_errors"):
            parse_state("dev-1", enc(good_state(slot_errors=bad)))


# -- the agent's side of rejected_messages ------------------------------------------------------------------
def test_rejected_counts_stay_bounded():
    counts = RejectedMessages()
    for i in range(20):
        for j in range(20):
            counts.add(f"kind{i}", f"code{j}")
    counts.add("Not A Kind", "not a code\n")
    snap = counts.snapshot()
    assert len(snap) == MAX_REJECT_KINDS and all(len(r) <= MAX_REJECT_REASONS for r in snap.values())
    assert sum(sum(r.values()) for r in snap.values()) == 401
    parse_state("dev-1", state_message("dev-1", rejected_messages=snap))  # what the agent sends passes


class _Topics:
    def __init__(self):
        self.handlers = {}

    def publish(self, topic, payload, qos=0, retain=False):
        pass

    def subscribe(self, topic, handler):
        self.handlers[topic] = handler


def test_the_repository_link_reports_refused_responses_by_reason():
    topics, refused = _Topics(), []
    MqttRepoLink(topics, "dev-1", max_chunk=64 * 1024, on_rejected=lambda exc: refused.append(exc.code))
    deliver = topics.handlers["edgeopt/repo/resp/dev-1"]
    for payload in (b"", b"\xff" * 300_000, b"\x00\x00\x00\x02{}", ChunkResponse("r\n", "metadata/1.root.json").encode(),
                    ChunkResponse("r", "metadata/../x").encode()):
        deliver("edgeopt/repo/resp/dev-1", payload)
    assert refused == ["bad_frame", "too_large", "bad_id", "bad_id", "bad_path"]


def test_the_agent_counts_messages_on_topics_it_did_not_subscribe_to():
    from edgeopt.agent.config import parse_config
    from edgeopt.agent.service import Agent

    agent = Agent(parse_config({"agent": {"device_id": "dev-1"}, "source": [{"type": "synthetic"}]}))
    agent._on_unmatched("edgeopt/devices/dev-2/desired")
    agent._on_unmatched("edgeopt/devices/dev-1/results")
    agent._on_unmatched("elsewhere/x")
    assert agent.rejected.snapshot() == {"desired": {"wrong_device": 1}, "results": {"unexpected": 1},
                                         "other": {"bad_topic": 1}}


def test_agent_config_refuses_identity_the_fleet_would_drop():
    from edgeopt.agent.config import parse_config
    from edgeopt.errors import UserInputError

    for agent in ({"device_id": "dev\n1"}, {"device_id": "dev-1", "labels": ["site=a b"]},
                  {"device_id": "dev-1", "profile": "pi 4"}, {"device_id": "dev-1", "labels": ["s\u0456te=lab"]}):
        with pytest.raises(UserInputError, match=r"\[agent\]"):
            parse_config({"agent": agent, "source": [{"type": "synthetic"}]})


def test_a_chunk_that_arrives_after_the_agent_unsubscribed_is_dropped_quietly():
    """The updater subscribes to a chunk's cast topic for one request (fleet/repo_server.py); a cast
    already on its way when it unsubscribes is not a message the device never asked for."""
    from types import SimpleNamespace

    from edgeopt.agent.config import MqttSection
    from edgeopt.agent.transport import MqttTransport

    transport, unmatched, got = MqttTransport(MqttSection(), "dev-1", "t", b""), [], []
    transport.on_unmatched = unmatched.append
    cast = "edgeopt/repo/cast/" + "0" * 64 + "/0"
    transport.subscribe(cast, got.append)
    transport._on_message(None, None, SimpleNamespace(topic=cast, payload=b"chunk"))
    transport.unsubscribe(cast)
    transport._on_message(None, None, SimpleNamespace(topic=cast, payload=b"late"))
    transport._on_message(None, None, SimpleNamespace(topic="edgeopt/devices/dev-2/desired", payload=b"{}"))
    assert got == [b"chunk"] and unmatched == ["edgeopt/devices/dev-2/desired"]
