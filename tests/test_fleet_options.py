"""The fleet's options as declarations (issue 16 point 3): ``ROLLOUT_PARAMS`` and ``SERVE_PARAMS`` are
what the CLI's flags, docs/fleet.md's tables and the checks come from — for a rollout, text (as a web
form sends it) and typed values (as click gives them) parse alike, and a wrong one is named by its
flag."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeopt.cli.fleet import serve_cmd
from edgeopt.cli.fleet_rollout import create_cmd
from edgeopt.errors import UserInputError
from edgeopt.fleet import rollout_spec as rollout_module
from edgeopt.fleet import serve_options
from edgeopt.fleet.rollout_spec import ROLLOUT_PARAMS, Gates, WaveStep, rollout_spec
from edgeopt.fleet.service import ServiceConfig
from edgeopt.protocol import ModelRef

DOCS = Path(__file__).resolve().parent.parent / "docs" / "fleet.md"
KWS = ModelRef("kws", "2")


@pytest.mark.parametrize("command,params", [(create_cmd, ROLLOUT_PARAMS), (serve_cmd, serve_options.SERVE_PARAMS)],
                         ids=["rollout create", "serve"])
def test_the_cli_flags_are_the_declarations(command, params):
    by_flag = {p.opts[0]: p for p in command.params}
    for p in params:
        option = by_flag[p.flag]
        assert option.help.lower().startswith(p.help[:20].lower())
        assert option.default == (bool(p.default) if p.type is bool else p.default)


def test_the_service_takes_its_defaults_from_the_declarations():
    config = ServiceConfig(repo=Path("."), db="sqlite://")
    for p in serve_options.SERVE_PARAMS:
        if p.name != "log_level":  # the CLI's, not the service's
            assert getattr(config, p.name) == p.default, p.name


@pytest.mark.parametrize("marker,module", [("rollout-options", rollout_module), ("serve-options", serve_options)])
def test_docs_embed_the_generated_option_tables(marker, module):
    text = DOCS.read_text()
    begin, end = f"<!-- {marker}:begin -->\n", f"<!-- {marker}:end -->"
    assert text[text.index(begin) + len(begin):text.index(end)] == module.reference_markdown(), \
        f"docs/fleet.md is out of date: paste {module.__name__}.reference_markdown()"


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
