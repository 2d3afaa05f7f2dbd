"""The probation verdict as a pure function (issue 16 point 4), tested exhaustively as the rollout
decisions are: every combination of a grid around each limit against an oracle written from the
documented rules (docs/agent.md, "Signed updates"), and each rule's boundary on its own."""

from __future__ import annotations

import itertools
from dataclasses import replace
from types import SimpleNamespace

import pytest

from edgeopt.agent.config import parse_config
from edgeopt.agent.update.machine import Health, probation_verdict

LIMITS = parse_config({"source": [{"type": "synthetic"}]}).update  # the defaults: nan 0, 1 %, 3x + 1 ms, 0.5x
BUDGETED = SimpleNamespace(**{k: getattr(LIMITS, k) for k in (
    "probation_max_nan", "probation_max_error_rate", "probation_latency_factor",
    "probation_min_confidence_ratio")}, latency_budget_ms=5.0)
BASE = Health(windows=500, p95_ms=2.0, latencies=100, mean_confidence=0.9, confidences=500)
GOOD = Health(windows=500, p95_ms=2.0, latencies=100, mean_confidence=0.9, confidences=500)


def oracle(c: Health, b: Health, limits) -> str | None:
    """Which rule fails first, from the rules as documented."""
    if c.nan_outputs > limits.probation_max_nan:
        return "nan"
    if c.windows >= 20 and c.error_rate > limits.probation_max_error_rate:
        return "error"
    if c.p95_ms is not None and c.latencies >= 10:
        if limits.latency_budget_ms and c.p95_ms > limits.latency_budget_ms:
            return "budget"
        if b.p95_ms is not None and c.p95_ms > limits.probation_latency_factor * b.p95_ms + 1.0:
            return "latency"
    if (c.mean_confidence is not None and b.mean_confidence is not None and c.confidences >= 20
            and c.mean_confidence < limits.probation_min_confidence_ratio * b.mean_confidence):
        return "confidence"
    return None


WORDS = {"nan": "NaN/Inf outputs", "error": "error rate", "budget": "above the budget",
         "latency": "the previous model's", "confidence": "confidence"}


def test_every_combination_agrees_with_the_rules():
    grid = itertools.product(
        [0, 1],                      # NaN windows
        [19, 20, 500],               # windows
        [0.0, 0.01, 0.0101, 0.5],    # error rate
        [None, 2.0, 6.9, 7.0, 7.01],  # p95 (baseline 2.0: the limit is 3 x 2 + 1 = 7; the budget 5)
        [9, 10],                     # calls measured
        [None, 0.45, 0.44],          # mean confidence (the limit: 0.5 x 0.9 = 0.45)
        [19, 20],                    # confidences
        [None, 2.0],                 # the baseline's p95
        [LIMITS, BUDGETED])
    checked = 0
    for nan, windows, err, p95, calls, conf, confs, base_p95, limits in grid:
        c = Health(windows, nan, err, p95, calls, conf, confs)
        b = replace(BASE, p95_ms=base_p95)
        want, got = oracle(c, b, limits), probation_verdict(c, b, limits)
        assert (got is None) == (want is None), (c, b, limits, got)
        if want is not None:
            assert WORDS[want] in got, (c, want, got)
        checked += 1
    assert checked == 2 * 3 * 4 * 5 * 2 * 3 * 2 * 2 * 2


@pytest.mark.parametrize(("health", "fails"), [
    (GOOD, None),
    (replace(GOOD, nan_outputs=1), "1 window(s) with NaN/Inf outputs (allowed 0)"),
    (replace(GOOD, error_rate=0.011), "error rate 1.1% above 1.0%"),
    (replace(GOOD, error_rate=0.5, windows=19), None),          # too few windows to judge a rate
    (replace(GOOD, p95_ms=7.01), "latency p95 7.010 ms above 3x the previous model's 2.000 ms"),
    (replace(GOOD, p95_ms=7.0), None),                          # 3 x 2 + 1 exactly: allowed
    (replace(GOOD, p95_ms=70.0, latencies=9), None),            # too few calls
    (replace(GOOD, mean_confidence=0.449), "mean top-1 confidence 0.449 below 0.5x the previous model's 0.900"),
    (replace(GOOD, mean_confidence=0.1, confidences=19), None),
])
def test_each_rule_at_its_boundary(health, fails):
    assert probation_verdict(health, BASE, LIMITS) == fails


def test_no_baseline_judges_the_candidate_alone():
    """A first install: no previous model to compare latency and confidence with; the budget and
    the NaN and error limits still hold."""
    none = Health()
    assert probation_verdict(replace(GOOD, p95_ms=500.0, mean_confidence=0.01), none, LIMITS) is None
    assert "above the budget 5 ms" in probation_verdict(replace(GOOD, p95_ms=5.5), none, BUDGETED)
    assert "NaN" in probation_verdict(replace(GOOD, nan_outputs=3), none, LIMITS)
