"""The operator test cases that ship with the onnx package (``onnx.backend.test.case.node``), for every
case whose ops the tflite target claims: each one either converts and matches the case's expected
outputs on LiteRT, or is refused before anything is written with a one-line reason (an attribute,
dtype or mode outside the supported set). The per-op counts are recorded in docs/benchmarks.md by
benchmarks/onnx_node_cases_tflite.py."""

from __future__ import annotations

import collections

import pytest

from edgeopt.converters.targets.tflite.lowering import RULES

from tflite_harness import claimed_node_cases, run_node_case


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx-node-cases")
    return [run_node_case(case, root / str(i)) for i, case in enumerate(claimed_node_cases())]


def test_no_claimed_case_converts_wrongly_or_crashes(results):
    bad = [f"{r.name}: {r.outcome}: {r.detail}" for r in results if r.outcome not in ("passed", "rejected")]
    assert bad == []
    assert sum(r.outcome == "passed" for r in results) >= 300


def test_refusals_are_one_line_and_name_the_cause(results):
    for r in results:
        if r.outcome == "rejected":
            assert r.detail and "\n" not in r.detail.strip(), r


def test_every_claimed_op_passes_its_own_cases(results):
    passed = collections.Counter(r.ops for r in results if r.outcome == "passed")
    with_cases = {r.ops for r in results if "+" not in r.ops}
    missing = sorted(op for op in with_cases & set(RULES) if passed[op] == 0)
    assert missing == []
