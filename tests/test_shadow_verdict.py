"""The shadow decision as pure functions (issue 16 point 4), beside the probation verdict: how many live
windows of a batch the candidate answers as the current model does, and the verdict over the run —
every combination of a grid around the limits against an oracle written from the documented rules
(docs/agent.md, "Signed updates")."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import numpy as np
import pytest

from edgeopt.agent.update.machine import INCONCLUSIVE, shadow_verdict, windows_agreeing


def limits(min_agreement: float) -> SimpleNamespace:
    return SimpleNamespace(shadow_min_agreement=min_agreement, shadow_timeout_s=30.0)


def oracle(compared: int, agreed: int, wanted: int, min_agreement: float, timed_out: bool) -> str | None:
    if compared < wanted:
        return "inconclusive" if timed_out else None
    return "disagree" if agreed < min_agreement * compared else None


def test_every_combination_agrees_with_the_rules():
    checked = 0
    for wanted, compared, min_agreement, timed_out in itertools.product(
            [1, 50, 200], [0, 1, 49, 50, 51, 199, 200, 260], [0.0, 0.5, 0.95, 1.0], [False, True]):
        for agreed in sorted({0, compared // 2, int(np.ceil(min_agreement * compared)),
                              max(0, int(np.ceil(min_agreement * compared)) - 1), compared}):
            got = shadow_verdict(compared, agreed, wanted, limits(min_agreement), timed_out)
            want = oracle(compared, agreed, wanted, min_agreement, timed_out)
            if want is None:
                assert got is None, (compared, agreed, wanted, min_agreement, timed_out, got)
            elif want == "inconclusive":
                assert got.startswith(f"{INCONCLUSIVE}: only {compared} of {wanted}"), got
            else:
                assert got.startswith(f"top-1 agreement {agreed / compared:.1%}"), got
                assert f"over {compared} live windows" in got
            checked += 1
    assert checked > 300


def test_enough_windows_decide_even_when_the_time_ran_out():
    assert shadow_verdict(200, 200, 200, limits(0.95), timed_out=True) is None
    assert "below 95%" in shadow_verdict(200, 180, 200, limits(0.95), timed_out=True)


def probabilities(classes: list[int], n_classes: int = 4) -> np.ndarray:
    y = np.full((len(classes), n_classes), 0.1 / (n_classes - 1), np.float32)
    y[np.arange(len(classes)), classes] = 0.9
    return y


@pytest.mark.parametrize("softmax", [True, False])
def test_a_classifier_agrees_window_by_window_on_its_top1(softmax):
    current = probabilities([0, 1, 2, 3, 0])
    candidate = probabilities([0, 1, 3, 3, 1])
    if not softmax:  # logits: compared by their top-1 just the same
        current, candidate = np.log(current) * 3, np.log(candidate) * 3
    assert windows_agreeing({"y": current}, {"y": candidate}) == 3


def test_other_models_agree_batch_by_batch_within_the_output_scale():
    current = {"y": np.array([[100.0, -3.0], [4.0, 5.0]], np.float32), "z": np.zeros((2, 1), np.float32)}
    close = {"y": current["y"] + 0.099, "z": current["z"] + 9e-4}   # within 1e-3 x max(1, |output|)
    far = {"y": current["y"] + 0.2, "z": current["z"]}
    assert windows_agreeing(current, close) == 2
    assert windows_agreeing(current, far) == 0
    # a single output that is not a class distribution (one column) is compared the same way
    assert windows_agreeing({"y": np.ones((3, 1))}, {"y": np.ones((3, 1)) * 1.01}) == 0


def test_a_candidate_that_failed_the_batch_agrees_on_none():
    assert windows_agreeing({"y": probabilities([0, 1])}, None) == 0
