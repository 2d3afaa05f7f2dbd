"""The agent's configuration file (TOML): every key, its type, default and one-line doc.

The declarations below are the single source of truth: each key is a ``Param`` (edgeopt.params, the
declarations passes, targets and rollouts use too; its name and type come from the field).
``load_config`` validates a file against them (an unknown key is an error naming the key and the
closest known one), and ``reference_markdown()`` renders the key reference that docs/agent.md
embeds (a test checks the page is up to date).

    [agent] [model] [preprocessing] [batching] [mqtt] [telemetry] [outbox] [systemd]
    [[source]]   one table per source; ``type`` picks the kind
    [[sink]]     one table per sink; ``type`` picks the kind
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import socket
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from edgeopt.errors import UserInputError, closest
from edgeopt.params import Param, reference_table, toml_value
from edgeopt.protocol import DEVICE_ID_RE, LABEL_KEY_RE, LABEL_VALUE_RE, MAX_LABELS

MIB = 1024 * 1024


def key(default: Any, doc: str, *, choices: tuple[Any, ...] | None = None, check=None) -> Any:
    """A config key: a dataclass field holding its ``Param`` (named and typed by ``params_of``)."""
    meta = {"param": Param("", object, default, doc, choices, check)}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def at_least(lo: float):
    return lambda v: None if v >= lo else f"must be >= {lo}"


def positive(v: float) -> str | None:
    return None if v > 0 else "must be > 0"


REPLAY = ("recorded", "fast")


@dataclass
class AgentSection:
    """Identity, where state lives, and how the agent ends."""

    section: ClassVar[str] = "agent"
    device_id: str = key("", "device id used in MQTT topics and results (empty: the host name)")
    state_dir: str = key("", "state directory holding the model slots and the outbox "
                             "(empty: $STATE_DIRECTORY set by systemd, else /var/lib/edgeopt-agent)")
    log_level: str = key("info", "log level on stderr", choices=("debug", "info", "warning", "error"))
    exit_when_sources_end: bool = key(False, "exit 0 once every source has ended and its windows are "
                                             "published (batch replay of recorded files)")
    shutdown_timeout_s: float = key(4.0, "on SIGTERM, seconds allowed to flush the last batch and "
                                         "publish it before exiting", check=positive)
    profile: str = key("", "hardware profile name reported in the state message (fleet selectors use it)")
    labels: list = key([], "labels reported in the state message, as \"key=value\" strings (fleet selectors)")


@dataclass
class ModelSection:
    """The model run from the state directory's active slot."""

    section: ClassVar[str] = "model"
    runtime: str = key("", "registered runtime to use (empty: the one the artifact's manifest names)")
    threads: int = key(1, "CPU threads for inference", check=at_least(1))
    process: str = key("auto", "where the model's calls run: \"auto\" in a worker process forked from the agent "
                               "once the model loads (where it can: Linux, 2+ CPUs, 1 thread, float32 I/O, not "
                               "stateful, LiteRT or ONNX Runtime; its own memory is reported in telemetry), "
                               "\"thread\" on the agent's own thread", choices=("auto", "thread"))
    poll_interval_s: float = key(2.0, "while no model is active (or it failed to load), seconds between "
                                      "looks at the active slot", check=positive)


@dataclass
class PreprocessingSection:
    """Overrides of the manifest's preprocessing (0 / empty: take the manifest's)."""

    section: ClassVar[str] = "preprocessing"
    window: int = key(0, "samples per window (0: the manifest's; must match the model input)",
                      check=at_least(0))
    hop: int = key(0, "samples between window starts (0: the manifest's)", check=at_least(0))
    nan_policy: str = key("drop", "a window holding NaN/Inf samples: drop it (counted), replace them by "
                                  "zero, or hold the channel's last finite value",
                          choices=("drop", "zero", "hold"))


@dataclass
class BatchingSection:
    """Dynamic batching between the windowers and the model."""

    section: ClassVar[str] = "batching"
    max_batch: int = key(32, "most windows per inference call (capped by a model's fixed batch)", check=at_least(1))
    max_wait_ms: float = key(20.0, "longest wait for a batch to fill after its first window", check=at_least(0))
    queue_windows: int = key(1024, "capacity of the window queue", check=at_least(1))
    queue_bytes: int = key(16 << 20, "and at most this many bytes of windows in it (the capacity is the "
                                     "smaller of the two, never under max_batch windows)", check=at_least(1))
    overflow: str = key("drop-oldest", "when the queue is full: drop the oldest window (counted) or block "
                                       "the source until there is room", choices=("drop-oldest", "block"))


@dataclass
class MqttSection:
    """Connection to the MQTT broker (results, telemetry, state, mqtt sources)."""

    section: ClassVar[str] = "mqtt"
    host: str = key("", "broker host name (empty: no MQTT)")
    port: int = key(1883, "broker port", check=at_least(1))
    prefix: str = key("edgeopt", "topic prefix: {prefix}/devices/{device_id}/...")
    client_id: str = key("", "MQTT client id (empty: edgeopt-agent-{device_id})")
    username: str = key("", "user name (empty: anonymous)")
    password_file: str = key("", "file holding the password (kept out of the config)")
    tls: bool = key(False, "connect with TLS")
    ca_file: str = key("", "CA bundle for TLS (empty: the system's)")
    cert_file: str = key("", "client certificate for TLS (PEM)")
    key_file: str = key("", "client key for TLS (PEM)")
    keepalive_s: int = key(30, "MQTT keep-alive in seconds", check=at_least(5))
    reconnect_min_s: float = key(0.5, "first reconnect delay; doubles per failure, with jitter",
                                 check=positive)
    reconnect_max_s: float = key(30.0, "longest reconnect delay", check=positive)
    max_inflight: int = key(32, "result messages sent and not yet acknowledged (QoS 1)", check=at_least(1))


@dataclass
class UpdateSection:
    """Signed model updates: follow {prefix}/devices/{device_id}/desired, check, switch, or roll back."""

    section: ClassVar[str] = "update"
    enabled: bool = key(True, "follow the retained desired message when a broker is configured")
    root: str = key("", "pinned root metadata (root.json from 'edgeopt fleet provision'); copied to "
                        "{state_dir}/trust on first start (empty: it must already be there)")
    repo_url: str = key("", "fetch the signed repository over HTTP(S) from this URL — a web server, object store "
                            "or CDN holding its metadata/ and targets/ (or fleet serve --http-repo) — with range "
                            "requests; empty: over MQTT. desired still comes over MQTT",
                        check=lambda v: None if not v or re.match(r"https?://[^/\s]+", v) else
                        "expected http(s)://HOST[:PORT]/PATH/")
    repo_ca_file: str = key("", "CA bundle for an https repo_url (empty: the system's)")
    chunk_bytes: int = key(64 * 1024, "artifact bytes asked for per request (keep under the broker's "
                                      "payload limit; over HTTP, 1 MiB or more). Over MQTT the device takes "
                                      "chunks the repository server casts, on the power of two at or below "
                                      "this: give devices the same size as fleet serve --chunk-size",
                           check=at_least(1024))
    request_timeout_s: float = key(5.0, "seconds to wait for one chunk before asking again", check=positive)
    request_retries: int = key(8, "attempts per chunk before the download step gives up and retries later",
                               check=at_least(0))
    max_download_bytes: int = key(1024 * MIB, "largest artifact accepted", check=at_least(1024))
    retry_interval_s: float = key(10.0, "pause before retrying a step the network interrupted", check=at_least(0))
    max_retries: int = key(30, "retries of one step before the update is rolled back", check=at_least(0))
    refused_retry_s: float = key(60.0, "a version refused for a transport or integrity reason (download, hash, "
                                       "archive, signature, not yet signed) is tried again after this pause "
                                       "while the same desired stands, doubling with each refusal; a new "
                                       "rollout id tries it at once", check=positive)
    refused_retry_max_s: float = key(3600.0, "longest pause between such tries", check=positive)
    self_test_timeout_s: float = key(60.0, "self-test time limit (the child process is killed after it)",
                                     check=positive)
    latency_budget_ms: float = key(0.0, "batch-1 latency budget for the self-test and probation "
                                        "(0: the manifest's latency_budget_ms)", check=at_least(0))
    shadow_windows: int = key(0, "SHADOW: live windows to run beside the current model before switching "
                                 "(0: no shadow)", check=at_least(0))
    shadow_min_agreement: float = key(0.95, "SHADOW: top-1 agreement with the current model required",
                                      check=lambda v: None if 0 <= v <= 1 else "must be in [0, 1]")
    shadow_timeout_s: float = key(600.0, "SHADOW: give up (roll back) when fewer windows arrive in this time",
                                  check=positive)
    baseline_s: float = key(2.0, "before switching, seconds spent measuring the current model's latency and "
                                 "confidence (the candidate is held to them)", check=at_least(0))
    probation_windows: int = key(100, "PROBATION: live windows the new model must handle", check=at_least(0))
    probation_s: float = key(10.0, "PROBATION: and for at least this long", check=at_least(0))
    probation_timeout_s: float = key(600.0, "PROBATION: commit on time alone when windows arrive slower than this",
                                     check=positive)
    probation_max_error_rate: float = key(0.01, "PROBATION: failed or NaN windows allowed (fraction)",
                                          check=lambda v: None if 0 <= v <= 1 else "must be in [0, 1]")
    probation_max_nan: int = key(0, "PROBATION: windows with NaN/Inf outputs allowed", check=at_least(0))
    probation_latency_factor: float = key(3.0, "PROBATION: latency p95 allowed, as a multiple of the previous "
                                               "model's (plus 1 ms)", check=positive)
    probation_min_confidence_ratio: float = key(0.5, "PROBATION: mean top-1 confidence required, as a fraction "
                                                     "of the previous model's", check=at_least(0))
    state_hook: str = key("", "executable run on entering each update state with the state, model name and "
                              "version as arguments (like Mender state scripts)")
    state_hook_timeout_s: float = key(30.0, "state hook time limit", check=positive)


@dataclass
class TelemetrySection:
    """Periodic telemetry to MQTT and a local status file."""

    section: ClassVar[str] = "telemetry"
    interval_s: float = key(10.0, "seconds between telemetry messages and status file updates",
                            check=positive)
    status_file: str = key("", "local status file, JSON (empty: {state_dir}/status.json)")


@dataclass
class OutboxSection:
    """The bounded on-disk queue of results waiting for the broker."""

    section: ClassVar[str] = "outbox"
    dir: str = key("", "outbox directory (empty: {state_dir}/outbox)")
    max_bytes: int = key(16 * MIB, "size cap; past it the oldest results are dropped (and counted)",
                         check=at_least(4096))
    segment_bytes: int = key(1 * MIB, "size of one outbox segment file (the unit that is dropped)",
                             check=at_least(1024))
    fsync_interval_s: float = key(1.0, "seconds between fsyncs of the outbox (0: after every write)",
                                  check=at_least(0))


@dataclass
class SystemdSection:
    """systemd integration (sd_notify over $NOTIFY_SOCKET)."""

    section: ClassVar[str] = "systemd"
    notify: bool = key(True, "send READY=1 / STATUS= / WATCHDOG=1 (from the inference loop, every "
                             "WatchdogSec/2) when $NOTIFY_SOCKET is set")


# -- sources ----------------------------------------------------------------------------------------
@dataclass
class SourceBase:
    type: str = key("", "kind of source (see below)")
    name: str = key("", "name in window ids and results (empty: TYPE-INDEX)")
    channels: list = key([], "names of the channels in the order this source sends them (empty: a CSV "
                             "header, else the model's channel order)")


@dataclass
class ReplaySource(SourceBase):
    path: str = key("", "file to replay")
    replay: str = key("recorded", "'recorded': at the recorded rate; 'fast': as fast as possible",
                      choices=REPLAY)
    rate_hz: float = key(0.0, "sample rate when the file has no timestamps (0: the manifest's "
                              "sample_rate_hz, else 50)", check=at_least(0))
    loop: bool = key(False, "start again at the end of the file")


@dataclass
class CsvSource(ReplaySource):
    """Replay a sensor CSV: a column per channel (header optional), a row per time step."""

    kind: ClassVar[str] = "csv"
    timestamp_column: str = key("", "column holding timestamps in seconds (empty: 't', 'time' or "
                                    "'timestamp' when present)")


@dataclass
class NpySource(ReplaySource):
    """Replay a .npy array of samples [T, C] (float)."""

    kind: ClassVar[str] = "npy"


@dataclass
class LineSource(SourceBase):
    timestamped: bool = key(False, "the first field of each line is a UNIX timestamp (s); else the "
                                   "arrival time is used")


@dataclass
class StdinSource(LineSource):
    """Lines 'v0,v1,...' on standard input."""

    kind: ClassVar[str] = "stdin"


@dataclass
class UnixStreamSource(LineSource):
    """Lines on a Unix stream socket the agent listens on (several clients may connect)."""

    kind: ClassVar[str] = "unix-stream"
    path: str = key("", "socket path to create")


@dataclass
class UnixDgramSource(LineSource):
    """Datagrams on a Unix datagram socket, each holding one or more lines."""

    kind: ClassVar[str] = "unix-dgram"
    path: str = key("", "socket path to create")


@dataclass
class SerialSource(LineSource):
    """Lines from a serial port (needs pyserial: pip install 'edgeopt[serial]')."""

    kind: ClassVar[str] = "serial"
    port: str = key("", "device, e.g. /dev/ttyUSB0")
    baudrate: int = key(115200, "baud rate", check=at_least(1))


@dataclass
class MqttSource(LineSource):
    """Messages on an MQTT topic (the [mqtt] broker), each holding one or more lines."""

    kind: ClassVar[str] = "mqtt"
    topic: str = key("", "topic to subscribe to (QoS 1)")


@dataclass
class SyntheticSource(SourceBase):
    """A synthetic accelerometer/IMU stream for demos (activities: still, walk, run, shake)."""

    kind: ClassVar[str] = "synthetic"
    rate_hz: float = key(0.0, "sample rate (0: the manifest's sample_rate_hz, else 50)", check=at_least(0))
    seconds: float = key(0.0, "length of the stream (0: endless)", check=at_least(0))
    seed: int = key(0, "random seed")
    replay: str = key("recorded", "'recorded': in real time; 'fast': as fast as possible", choices=REPLAY)


SOURCE_KINDS: dict[str, type[SourceBase]] = {c.kind: c for c in (  # type: ignore[attr-defined]
    CsvSource, NpySource, StdinSource, UnixStreamSource, UnixDgramSource, SerialSource, MqttSource,
    SyntheticSource)}
REQUIRED = {"csv": ("path",), "npy": ("path",), "unix-stream": ("path",), "unix-dgram": ("path",),
            "serial": ("port",), "mqtt": ("topic",)}


# -- sinks ------------------------------------------------------------------------------------------
@dataclass
class SinkBase:
    type: str = key("", "kind of sink (see below)")


@dataclass
class MqttSink(SinkBase):
    """Results to {prefix}/devices/{device_id}/results (QoS 1), through the on-disk outbox."""

    kind: ClassVar[str] = "mqtt"


@dataclass
class JsonlSink(SinkBase):
    """Results as JSON Lines in a file, rotated by size."""

    kind: ClassVar[str] = "jsonl"
    path: str = key("", "file to write (rotated files get .1, .2, ...)")
    max_bytes: int = key(10 * MIB, "rotate when the file reaches this size", check=at_least(1024))
    keep: int = key(5, "rotated files to keep", check=at_least(1))


@dataclass
class StdoutSink(SinkBase):
    """Results as JSON Lines on standard output."""

    kind: ClassVar[str] = "stdout"


SINK_KINDS: dict[str, type[SinkBase]] = {c.kind: c for c in (MqttSink, JsonlSink, StdoutSink)}  # type: ignore
SINK_REQUIRED = {"jsonl": ("path",)}

SECTIONS = (AgentSection, ModelSection, PreprocessingSection, BatchingSection, MqttSection, UpdateSection,
            TelemetrySection, OutboxSection, SystemdSection)


@dataclass
class AgentConfig:
    agent: AgentSection
    model: ModelSection
    preprocessing: PreprocessingSection
    batching: BatchingSection
    mqtt: MqttSection
    update: UpdateSection
    telemetry: TelemetrySection
    outbox: OutboxSection
    systemd: SystemdSection
    sources: list[SourceBase]
    sinks: list[SinkBase]
    path: Path | None = None

    @property
    def device_id(self) -> str:
        return self.agent.device_id or socket.gethostname()

    @property
    def labels(self) -> dict[str, str]:
        return dict(item.split("=", 1) for item in self.agent.labels)

    @property
    def state_dir(self) -> Path:
        return Path(self.agent.state_dir or os.environ.get("STATE_DIRECTORY", "").split(":")[0]
                    or "/var/lib/edgeopt-agent")

    @property
    def status_file(self) -> Path:
        return Path(self.telemetry.status_file) if self.telemetry.status_file else self.state_dir / "status.json"

    @property
    def outbox_dir(self) -> Path:
        return Path(self.outbox.dir) if self.outbox.dir else self.state_dir / "outbox"

    def topic(self, leaf: str) -> str:
        return f"{self.mqtt.prefix}/devices/{self.device_id}/{leaf}"


# -- parsing ----------------------------------------------------------------------------------------
@functools.cache
def params_of(cls: type) -> dict[str, Param]:
    """A section's keys as ``Param``s, by name: the field's declaration, named and typed by the field."""
    hints = typing.get_type_hints(cls)

    def kind(hint: Any) -> type:
        return list if hint is list or typing.get_origin(hint) is list else hint

    return {f.name: dataclasses.replace(f.metadata["param"], name=f.name, type=kind(hints[f.name]))
            for f in dataclasses.fields(cls)}


def _build(cls: type, table: dict[str, Any], where: str) -> Any:
    params = params_of(cls)
    for name in table:
        if name not in params:
            raise UserInputError(f"{where}: unknown key '{name}'{closest(name, list(params))}")
    return cls(**{name: params[name].validate(value, where) for name, value in table.items()})


def _build_kinds(items: Any, kinds: dict[str, type], required: dict[str, tuple[str, ...]], what: str,
                 file: str) -> list[Any]:
    if not isinstance(items, list):
        raise UserInputError(f"{file}: '{what}' must be an array of tables ([[{what}]])")
    out = []
    for i, table in enumerate(items):
        where = f"{file}: [[{what}]] #{i + 1}"
        if not isinstance(table, dict):
            raise UserInputError(f"{where}: must be a table")
        kind = table.get("type")
        if kind not in kinds:
            raise UserInputError(f"{where}: 'type' must be one of {', '.join(kinds)}, got {kind!r}"
                                 f"{closest(str(kind), list(kinds))}")
        where = f"{file}: [[{what}]] #{i + 1} ({kind})"
        obj = _build(kinds[kind], table, where)
        for name in required.get(kind, ()):
            if not getattr(obj, name):
                raise UserInputError(f"{where}: '{name}' is required")
        out.append(obj)
    return out


def parse_config(data: dict[str, Any], file: str = "agent.toml") -> AgentConfig:
    """Validate a parsed TOML document against the declarations."""
    known = {s.section for s in SECTIONS} | {"source", "sink"}
    for name in data:
        if name not in known:
            raise UserInputError(f"{file}: unknown section or key '{name}'{closest(name, sorted(known))}")
    sections = {}
    for cls in SECTIONS:
        table = data.get(cls.section, {})
        if not isinstance(table, dict):
            raise UserInputError(f"{file}: '{cls.section}' must be a table ([{cls.section}])")
        sections[cls.section] = _build(cls, table, f"{file}: [{cls.section}]")
    sources = _build_kinds(data.get("source", []), SOURCE_KINDS, REQUIRED, "source", file)
    if not sources:
        raise UserInputError(f"{file}: no [[source]] configured; the agent needs at least one")
    names = set()
    for i, src in enumerate(sources):
        src.name = src.name or f"{src.type}-{i + 1}"
        if src.name in names:
            raise UserInputError(f"{file}: two sources are named '{src.name}'")
        names.add(src.name)
    sinks = _build_kinds(data.get("sink", []), SINK_KINDS, SINK_REQUIRED, "sink", file)
    mqtt: MqttSection = sections["mqtt"]
    if not sinks:
        sinks = [MqttSink(type="mqtt") if mqtt.host else StdoutSink(type="stdout")]
    needs_broker = [f"[[sink]] {s.type}" for s in sinks if s.type == "mqtt"]
    needs_broker += [f"[[source]] {s.name}" for s in sources if s.type == "mqtt"]
    if needs_broker and not mqtt.host:
        raise UserInputError(f"{file}: {', '.join(needs_broker)} needs a broker: set [mqtt] host")
    for item in sections["agent"].labels:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise UserInputError(f"{file}: [agent] labels: {item!r} is not \"key=value\"")
        if not LABEL_KEY_RE.fullmatch(k) or not LABEL_VALUE_RE.fullmatch(v):
            raise UserInputError(f"{file}: [agent] labels: {item!r}: keys take letters, digits, '_', '.', '-'; "
                                 f"values also ':', '/', '@', '+' (the fleet refuses other labels)")
    if len(sections["agent"].labels) > MAX_LABELS:
        raise UserInputError(f"{file}: [agent] labels: at most {MAX_LABELS} (the fleet refuses more)")
    identity = sections["agent"]
    if not DEVICE_ID_RE.fullmatch(identity.device_id or socket.gethostname()):
        raise UserInputError(f"{file}: [agent] device_id {identity.device_id or socket.gethostname()!r}: use letters, "
                             f"digits, '.', '_', '-' (at most 64; it is part of every MQTT topic)")
    if identity.profile and not LABEL_KEY_RE.fullmatch(identity.profile):
        raise UserInputError(f"{file}: [agent] profile {identity.profile!r}: use letters, digits, '.', '_', '-'")
    if mqtt.reconnect_max_s < mqtt.reconnect_min_s:
        raise UserInputError(f"{file}: [mqtt] reconnect_max_s must be >= reconnect_min_s")
    return AgentConfig(**sections, sources=sources, sinks=sinks)


def load_config(path: str | Path) -> AgentConfig:
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"config file not found: {path}")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise UserInputError(f"{path}: not valid TOML ({exc})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserInputError(f"{path}: cannot read ({exc})") from None
    config = parse_config(data, str(path))
    config.path = path
    return config


# -- documentation ----------------------------------------------------------------------------------
def _rows(cls: type, skip: set[str] = frozenset()) -> list[str]:
    return reference_table([p for name, p in params_of(cls).items() if name not in skip])[2:]


def reference_markdown() -> str:
    """The key reference embedded in docs/agent.md (generated; do not edit the page by hand)."""
    head = ["| key | type | default | meaning |", "|---|---|---|---|"]
    out: list[str] = []
    for cls in SECTIONS:
        out += [f"### `[{cls.section}]`", "", cls.__doc__.strip(), "", *head, *_rows(cls), ""]
    for what, kinds, base in (("source", SOURCE_KINDS, SourceBase), ("sink", SINK_KINDS, SinkBase)):
        common = {f.name for f in dataclasses.fields(base)}
        out += [f"### `[[{what}]]`", "", f"Keys every {what} takes:", "", *head, *_rows(base), ""]
        for kind, cls in kinds.items():
            rows = _rows(cls, skip=common)
            out += [f"#### `type = \"{kind}\"`", "", cls.__doc__.strip(), ""]
            out += [*head, *rows, ""] if rows else ["No further keys.", ""]
    return "\n".join(out).rstrip() + "\n"


def default_value(f: dataclasses.Field) -> Any:
    """A key's default (a list key declares it through ``default_factory``)."""
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]


def default_config_text(device_id: str = "", mqtt_host: str = "") -> str:
    """The config ``edgeopt agent install-service`` writes: a Unix-socket sensor source, results to
    MQTT when a broker is given (else a JSON Lines file), and every other key at its default, commented
    (uncommented, each line is valid TOML giving that default)."""
    lines = ["# edgeopt-agent configuration (keys and defaults: docs/agent.md).", ""]
    given = {(AgentSection, "device_id"): device_id, (MqttSection, "host"): mqtt_host}
    for cls in SECTIONS:
        lines.append(f"[{cls.section}]")
        for f in dataclasses.fields(cls):
            if given.get((cls, f.name)):
                lines.append(f"{f.name} = {toml_value(given[cls, f.name])}")
            else:
                lines.append(f"# {f.name} = {toml_value(default_value(f))}  # {f.metadata['param'].help}")
        lines.append("")
    lines += ["[[source]]", 'type = "unix-stream"', 'name = "sensor"',
              'path = "/run/edgeopt-agent/sensor.sock"  # RuntimeDirectory= of the unit', ""]
    if mqtt_host:
        lines += ["[[sink]]", 'type = "mqtt"', ""]
    else:
        lines += ["[[sink]]", 'type = "jsonl"', 'path = "/var/log/edgeopt-agent/results.jsonl"  # LogsDirectory=', ""]
    return "\n".join(lines)


if __name__ == "__main__":  # python -m edgeopt.agent.config > reference.md (embedded in docs/agent.md)
    import sys

    sys.stdout.write(reference_markdown())
