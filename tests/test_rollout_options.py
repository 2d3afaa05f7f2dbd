"""The rollout options as declarations (issue 16 point 3): ``ROLLOUT_PARAMS`` in the fleet are what the
CLI's flags, docs/fleet.md's table and ``rollout_spec``'s checks come from — text (as a web form sends
it) and typed values (as click gives them) parse alike, and a wrong one is named by its flag."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeopt.cli.fleet_rollout import create_cmd
from edgeopt.errors import UserInputError
from edgeopt.fleet.rollout_spec import ROLLOUT_PARAMS, Gates, WaveStep, reference_markdown, rollout_spec
from edgeopt.protocol import ModelRef

DOCS = Path(__file__).resolve().parent.parent / "docs" / "fleet.md"
KWS = ModelRef("kws", "2")


def test_the_cli_flags_are_the_declarations():
    flags = {opt for p in create_cmd.params for opt in p.opts}
    assert {p.flag for p in ROLLOUT_PARAMS} <= flags
    by_flag = {p.opts[0]: p for p in create_cmd.params}
    for p in ROLLOUT_PARAMS:
        option = by_flag[p.flag]
        assert option.help.lower().startswith(p.help[:20].lower())
        assert option.default == (bool(p.default) if p.type is bool else p.default)


def test_docs_embed_the_generated_option_table():
    text = DOCS.read_text()
    begin, end = "<!-- rollout-options:begin -->\n", "<!-- rollout-options:end -->"
    assert text[text.index(begin) + len(begin):text.index(end)] == reference_markdown(), \
        "docs/fleet.md is out of date: paste edgeopt.fleet.rollout_spec.reference_markdown()"


def test_defaults_text_and_typed_values_give_the_same_spec():
    default = rollout_spec(KWS, ())
    assert default.waves == (WaveStep(1, True), WaveStep(10, True), WaveStep(50, True), WaveStep(100, True))
    assert (default.bake_s, default.success_threshold, default.failure_pct, default.device_timeout_s) == \
        (600.0, 0.95, 0.05, 900.0)
    typed = rollout_spec(KWS, ["site=lab"], waves="50%,100%", bake="90s", max_error_rate=0.1, max_nan_outputs=0)
    form = rollout_spec(KWS, ["site=lab"], waves="50%,100%", bake="90s", max_error_rate="0.1", max_nan_outputs="0",
                        min_agreement="", max_latency_p95=" ")
    assert typed == form
    assert typed.gates == Gates(max_error_rate=0.1, max_nan_outputs=0)
    assert typed.selector == {"site": "lab"}


@pytest.mark.parametrize("options,needle", [
    ({"max_error_rate": 3.0}, "--max-error-rate 3.0: must be in [0.0, 1.0]"),
    ({"min_agreement": "-0.5"}, "--min-agreement -0.5: must be in [0.0, 1.0]"),
    ({"max_nan_outputs": -1}, "--max-nan-outputs -1: must be >= 0"),
    ({"max_latency_p95": "fast"}, "--max-latency-p95"),
    ({"bake": "soon"}, "--bake 'soon'"),
    ({"waves": "10%,x"}, "neither a percentage"),
    ({"wavez": "100%"}, "unknown rollout option 'wavez' (did you mean 'waves'?)"),
])
def test_a_wrong_option_is_named(options, needle):
    with pytest.raises(UserInputError) as err:
        rollout_spec(KWS, (), **options)
    assert needle in str(err.value)
