"""What an operator asks for: waves, thresholds, gates and a label selector, declared as
``ROLLOUT_PARAMS`` (the CLI's flags and docs/fleet.md's table are generated from them) and parsed by
``rollout_spec`` into a ``RolloutSpec``; and how the matched devices are planned into waves.
(The decisions about a running rollout are in ``fleet.rollout``.)"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field, replace
from typing import Any

from edgeopt.errors import UserInputError, closest
from edgeopt.params import Param, in_range, reference_table
from edgeopt.protocol import LABEL_KEY_RE, LABEL_VALUE_RE, ModelRef

MAX_WAVES = 20


@dataclass(frozen=True)
class WaveStep:
    """How many devices have been told by the end of a wave: a share (``percent``) or a count."""

    value: float
    percent: bool

    def __str__(self) -> str:
        return f"{self.value:g}%" if self.percent else f"{int(self.value)}"


def parse_waves(text: str) -> tuple[WaveStep, ...]:
    """'1%,10%,50%,100%' (cumulative), '1%,9%,40%,50%' (wave sizes summing to 100%), or cumulative
    counts that end at 100% ('2,20,100%'). Returns cumulative steps."""
    tokens = [t.strip() for t in (text or "").split(",") if t.strip()]
    if not tokens or len(tokens) > MAX_WAVES:
        raise UserInputError(f"--waves {text!r}: give 1 to {MAX_WAVES} comma-separated waves, e.g. 1%,10%,50%,100%")
    steps = []
    for tok in tokens:
        m = re.fullmatch(r"(\d+(?:\.\d+)?)(%?)", tok)
        if not m:
            raise UserInputError(f"--waves {text!r}: {tok!r} is neither a percentage (10%) nor a device count (20)")
        value, percent = float(m.group(1)), bool(m.group(2))
        if (percent and not 0 < value <= 100) or (not percent and (value < 1 or value != int(value))):
            raise UserInputError(f"--waves {text!r}: {tok!r} must be in (0%, 100%] or a whole count >= 1")
        steps.append(WaveStep(value, percent))
    if all(s.percent for s in steps):
        values = [s.value for s in steps]
        increasing = all(a < b for a, b in zip(values, values[1:], strict=False))
        if increasing and math.isclose(values[-1], 100.0):
            return tuple(steps)
        if math.isclose(sum(values), 100.0, abs_tol=1e-9):
            total, cumulative = 0.0, []
            for v in values:
                total += v
                cumulative.append(WaveStep(min(round(total, 9), 100.0), True))
            return tuple(cumulative)
        raise UserInputError(f"--waves {text!r}: percentages must end at 100% (cumulative, e.g. 1%,10%,50%,100%) "
                             f"or sum to 100% (wave sizes, e.g. 1%,9%,40%,50%); these sum to {sum(values):g}%")
    counts = [s.value for s in steps if not s.percent]
    if any(a >= b for a, b in zip(counts, counts[1:], strict=False)):
        raise UserInputError(f"--waves {text!r}: device counts are cumulative and must increase")
    return tuple(steps)


def parse_duration(text: str, what: str) -> float:
    """'10m', '90s', '1.5h', '2d' or plain seconds → seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*", str(text))
    if not m:
        raise UserInputError(f"{what} {text!r}: expected a duration such as 90s, 10m, 1h")
    scale = {"ms": 0.001, "s": 1, None: 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    return float(m.group(1)) * scale


def parse_percent(text: str, what: str) -> float:
    """'95%' or '0.95' → 0.95."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(%?)\s*", str(text))
    value = float(m.group(1)) / (100 if m.group(2) else 1) if m else -1
    if not 0 <= value <= 1:
        raise UserInputError(f"{what} {text!r}: expected a percentage such as 95% (or a fraction 0..1)")
    return value


def parse_failure_threshold(text: str) -> tuple[float | None, int | None]:
    """'5%' → abort past 5 % of told devices; '3' → past 3 devices; '5%,3' → whichever comes first."""
    pct: float | None = None
    count: int | None = None
    for tok in (t.strip() for t in str(text).split(",") if t.strip()):
        if tok.endswith("%"):
            pct = parse_percent(tok, "--failure-threshold")
        elif tok.isdigit():
            count = int(tok)
        else:
            raise UserInputError(f"--failure-threshold {text!r}: expected 5% and/or a device count such as 3")
    if pct is None and count is None:
        raise UserInputError(f"--failure-threshold {text!r}: expected 5% and/or a device count such as 3")
    return pct, count


def parse_selector(terms: tuple[str, ...] | list[str]) -> dict[str, str]:
    """('site=lab', 'ring=canary,hw=pi4') → {'site': 'lab', 'ring': 'canary', 'hw': 'pi4'} (all must match)."""
    selector: dict[str, str] = {}
    for term in (t.strip() for arg in terms for t in arg.split(",") if t.strip()):
        key, sep, value = term.partition("=")
        if not sep or not LABEL_KEY_RE.fullmatch(key.strip()) or not LABEL_VALUE_RE.fullmatch(value.strip()):
            raise UserInputError(f"--selector {term!r}: expected LABEL=VALUE (letters, digits, '_', '.', '-')")
        selector[key.strip()] = value.strip()
    return selector


def selector_text(selector: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(selector.items())) or "(all devices)"


def matches(labels: dict[str, str], selector: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# -- the rollout as data -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Gates:
    """Bounds on what a device running the target reports (None: not checked)."""

    max_error_rate: float | None = None
    min_agreement: float | None = None
    max_latency_p95_ms: float | None = None
    max_nan_outputs: int | None = None


@dataclass(frozen=True)
class RolloutSpec:
    target: ModelRef
    selector: dict[str, str]
    waves: tuple[WaveStep, ...]
    bake_s: float = 600.0
    success_threshold: float = 0.95
    failure_pct: float | None = 0.05
    failure_count: int | None = None
    device_timeout_s: float = 900.0
    gates: Gates = field(default_factory=Gates)

    def to_json(self) -> dict[str, Any]:
        return {"target": self.target.to_json(), "selector": self.selector,
                "waves": [{"value": s.value, "percent": s.percent} for s in self.waves],
                "bake_s": self.bake_s, "success_threshold": self.success_threshold, "failure_pct": self.failure_pct,
                "failure_count": self.failure_count, "device_timeout_s": self.device_timeout_s,
                "gates": self.gates.__dict__.copy()}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> RolloutSpec:
        return cls(ModelRef(obj["target"]["name"], obj["target"]["version"]), dict(obj["selector"]),
                   tuple(WaveStep(w["value"], w["percent"]) for w in obj["waves"]), obj["bake_s"],
                   obj["success_threshold"], obj["failure_pct"], obj["failure_count"], obj["device_timeout_s"],
                   Gates(**obj.get("gates", {})))


def _at_least_zero(v: float) -> str | None:
    return None if v >= 0 else "must be >= 0"


ROLLOUT_PARAMS: tuple[Param, ...] = (
    Param("waves", str, "1%,10%,50%,100%",
          "cumulative shares (1%,10%,50%,100%), wave sizes summing to 100% (1%,9%,40%,50%), or cumulative "
          "device counts ending at 100% (5,50,100%)"),
    Param("bake", str, "10m", "how long a wave's success share must hold before the next wave starts"),
    Param("success_threshold", str, "95%", "share of a wave's devices that must run the new version"),
    Param("failure_threshold", str, "5%",
          "abort past this share of the told devices failing, and/or past a count: 5%, 3 or 5%,3"),
    Param("device_timeout", str, "15m",
          "a device without progress towards the new version for this long counts as failed"),
    Param("max_error_rate", float, None, "health gate: highest error rate a device may report",
          check=in_range(0.0, 1.0)),
    Param("min_agreement", float, None, "health gate: lowest agreement with the previous model",
          check=in_range(0.0, 1.0)),
    Param("max_latency_p95", float, None, "health gate: highest latency p95 in ms", check=_at_least_zero),
    Param("max_nan_outputs", int, None, "health gate: most NaN outputs a device may report", check=_at_least_zero),
    Param("online_only", bool, False,
          "plan only the matching devices that are online now (default: every matching device; an offline one "
          "counts as failed once the device timeout passes)"),
)
_ROLLOUT_PARAMS = {p.name: p for p in ROLLOUT_PARAMS}


def rollout_spec(model: ModelRef, selectors: tuple[str, ...] | list[str], **options: Any) -> RolloutSpec:
    """The rollout of ``model`` to the devices ``selectors`` match, with ``options`` (``ROLLOUT_PARAMS``;
    text is taken for numbers, as a form gives it; one missing takes its default). A wrong one is one
    error naming its flag. ``online_only`` chooses devices: the caller reads it."""
    for name in options:
        if name not in _ROLLOUT_PARAMS:
            raise UserInputError(f"unknown rollout option '{name}'{closest(name, list(_ROLLOUT_PARAMS))}")
    v: dict[str, Any] = {}
    for p in ROLLOUT_PARAMS:
        value = options.get(p.name, p.default)
        if isinstance(value, str) and p.type is not str:
            value = replace(p, check=None).coerce(value, p.flag) if value.strip() else None  # checked below
        if value is not None and p.check is not None and (problem := p.check(value)):
            raise UserInputError(f"{p.flag} {value}: {problem}")
        v[p.name] = value
    failure_pct, failure_count = parse_failure_threshold(v["failure_threshold"])
    return RolloutSpec(model, parse_selector(selectors), parse_waves(v["waves"]), parse_duration(v["bake"], "--bake"),
                       parse_percent(v["success_threshold"], "--success-threshold"), failure_pct, failure_count,
                       parse_duration(v["device_timeout"], "--device-timeout"),
                       Gates(v["max_error_rate"], v["min_agreement"], v["max_latency_p95"], v["max_nan_outputs"]))


def reference_markdown() -> str:
    """The options of ``edgeopt fleet rollout create`` (docs/fleet.md embeds it; a test checks)."""
    return "\n".join(reference_table(ROLLOUT_PARAMS, name=lambda p: f"`{p.flag}`", header="option")) + "\n"


def wave_sizes(steps: tuple[WaveStep, ...], n: int) -> list[int]:
    """How many devices each wave adds, for ``n`` matched devices (UserInputError if the waves do
    not cover exactly ``n``)."""
    cumulative = []
    for i, s in enumerate(steps):
        c = math.ceil(s.value * n / 100 - 1e-9) if s.percent else int(s.value)
        if c > n:
            raise UserInputError(f"wave {i + 1} ({s}) asks for {c} devices but the selector matches {n}")
        cumulative.append(max(c, cumulative[-1] if cumulative else 0))
    if cumulative[-1] != n:
        raise UserInputError(f"the waves cover {cumulative[-1]} of the {n} matching devices: end with 100% "
                             f"(or the device count {n})")
    return [c - p for c, p in zip(cumulative, [0, *cumulative[:-1]], strict=True)]


def plan_waves(rollout_id: str, steps: tuple[WaveStep, ...], device_ids: list[str]) -> list[list[str]]:
    """Which devices go in which wave: a reproducible shuffle (by hash of rollout id and device id),
    so each rollout's first wave is a different sample of the fleet."""
    order = sorted(device_ids, key=lambda d: hashlib.sha256(f"{rollout_id}/{d}".encode()).digest())
    waves, start = [], 0
    for size in wave_sizes(steps, len(order)):
        waves.append(order[start:start + size])
        start += size
    return waves
