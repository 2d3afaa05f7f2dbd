"""Conversion cost (issue 15 point 7): the report's facts about a model (MACs, peak activations) and
generated validation inputs cost memory in proportion to what they need, not to the weights.

Peak RSS is read from the kernel (VmHWM, reset through /proc/self/clear_refs) in a fresh interpreter,
so earlier tests' allocations do not count. Bounds are in MiB, never in seconds."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeopt.converters.pipeline import ConvertOptions, _validation_set
from edgeopt.data import generate_inputs
from edgeopt.memory import release_free_memory
from edgeopt.onnx_io import SKELETON_KEEP_ELEMENTS, count_macs, static_shapes, weightless
from edgeopt.specs import TensorSpec


def _mlp(width: int) -> onnx.ModelProto:
    """x[N, width] → MatMul(width x width) → Reshape to a computed shape → Relu: a big weight, and a
    small shape tensor whose values inference needs."""
    w = numpy_helper.from_array(np.ones((width, width), np.float32), "w")
    shape = numpy_helper.from_array(np.array([-1, width // 2, 2], np.int64), "shape")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("Reshape", ["h", "shape"], ["r"], name="reshape"),
             helper.make_node("Constant", [], ["c"], name="const",
                              value=numpy_helper.from_array(np.full((width,), 2.0, np.float32).reshape(-1, 2), "c")),
             helper.make_node("Mul", ["r", "c"], ["m"], name="mul"),
             helper.make_node("Relu", ["m"], ["y"], name="relu")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w, shape])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_weightless_keeps_shapes_and_small_values():
    model = _mlp(64)
    light = weightless(model)
    inits = {t.name: t for t in light.graph.initializer}
    assert list(inits["w"].dims) == [64, 64] and not inits["w"].raw_data and not inits["w"].float_data
    assert numpy_helper.to_array(inits["shape"]).tolist() == [-1, 32, 2]  # small: kept whole
    const = next(n for n in light.graph.node if n.op_type == "Constant").attribute[0].t
    assert SKELETON_KEEP_ELEMENTS >= 64 and numpy_helper.to_array(const).shape == (32, 2)
    assert static_shapes(model) == static_shapes(light) and static_shapes(model)["y"] == (1, 32, 2)
    big = _mlp(2048)
    const = next(n for n in weightless(big).graph.node if n.op_type == "Constant").attribute[0].t
    assert list(const.dims) == [1024, 2] and not const.raw_data  # over the limit: dims only
    assert static_shapes(big)["y"] == (1, 1024, 2)
    assert count_macs(big) == 2048 * 2048
    assert len(model.graph.initializer[0].raw_data) == 64 * 64 * 4  # the model itself is untouched


_PROBE = textwrap.dedent("""
    import json, sys
    import numpy as np
    sys.path.insert(0, {tests!r})
    from test_conversion_memory import _mlp
    from edgeopt.converters.fit import peak_activation_elements
    from edgeopt.data import generate_inputs
    from edgeopt.onnx_io import count_macs
    from edgeopt.specs import TensorSpec

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    def extra(fn):
        open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
        before = status("VmRSS")
        kept = fn()
        return (status("VmHWM") - before) / 2**20, kept

    model = _mlp(8192)  # 256 MiB of weights
    macs, _ = extra(lambda: count_macs(model))
    act, _ = extra(lambda: peak_activation_elements(model))
    spec = TensorSpec("x", (None, 3, 320, 320), "float32")
    gen, kept = extra(lambda: generate_inputs([spec], 64))
    print(json.dumps({{"count_macs": macs, "peak_activation": act, "generate": gen,
                      "generated_mib": kept.inputs["x"].nbytes / 2**20}}))
""")


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc/self/clear_refs")
def test_model_facts_and_generated_inputs_do_not_copy_the_weights():
    """On a model with 256 MiB of weights, MACs and the peak-activation estimate each held a whole
    serialised copy (upb's ``ByteSize`` and ``infer_shapes`` both encode the model); generating 64
    images drew them in float64 first (2x their float32 size more)."""
    out = subprocess.run([sys.executable, "-c", _PROBE.format(tests=str(Path(__file__).parent))],
                         capture_output=True, text=True, check=True)
    peaks = json.loads(out.stdout)
    assert peaks["count_macs"] < 32 and peaks["peak_activation"] < 32, peaks
    assert peaks["generate"] < peaks["generated_mib"] + 16, peaks


def test_generated_inputs_are_the_seeded_normal_draw():
    """Drawn in chunks, the values are still ``default_rng(seed).standard_normal`` in order."""
    spec = TensorSpec("x", (None, 3, 40, 40), "float32")
    data = generate_inputs([spec], 300, seed=5)
    assert data.inputs["x"].dtype == np.float32
    expected = np.random.default_rng(5).standard_normal((300, 3, 40, 40)).astype(np.float32)
    assert np.array_equal(data.inputs["x"], expected)


@pytest.mark.parametrize("sample, given, expected", [((3, 320, 320), None, 13), ((3, 416, 416), None, 8),
                                                     ((64,), None, 64), ((3, 416, 416), 20, 20)])
def test_generated_validation_inputs_shrink_for_big_inputs(tmp_path, sample, given, expected):
    """Without data, 64 random samples at most, fewer for big inputs (2^22 elements, at least 8);
    --validation-samples N still gives exactly N."""
    opts = ConvertOptions(model=tmp_path / "m.onnx", output=tmp_path / "out", validation_samples=given)
    data, source = _validation_set(opts, [TensorSpec("x", (None, *sample), "float32")], [], None, [])
    assert len(data) == expected and source.startswith(f"{expected} generated random inputs")


def test_release_free_memory_returns_heap_pages():
    """glibc keeps freed heap memory; malloc_trim gives it back (no-op where the C library lacks it)."""
    assert release_free_memory() == (platform.libc_ver()[0] == "glibc")
