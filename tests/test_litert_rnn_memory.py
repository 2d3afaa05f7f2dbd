"""An unrolled LSTM/GRU in LiteRT holds its recurrent weights about once, not once per time step.

XNNPACK packs the weights of every FULLY_CONNECTED it delegates separately; the unrolled recurrence
reads the same recurrent weights at every step, so a constant there was held T + 1 times (398 MiB
in LiteRT for the 52 MiB ddddocr CRNN). Memory is read from the kernel (VmRSS / VmHWM after a
reset through /proc/self/clear_refs) in a fresh interpreter; bounds are in MiB, never in seconds."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from onnx import numpy_helper

from onnx_models import gru_stateful, lstm_sequence
from tflite_harness import convert, max_rel_error

pytestmark = pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(),
                                reason="needs Linux /proc/self/clear_refs")

STEPS, HIDDEN = 32, 256

_LOAD = textwrap.dedent("""
    import json, sys
    from edgeopt.runtime.litert import LiteRtRuntime

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    LiteRtRuntime.unavailable_reason()  # the LiteRT library itself loaded before measuring
    open("/proc/self/clear_refs", "w").write("5")
    before = status("VmRSS")
    rt = LiteRtRuntime(sys.argv[1], threads=1)
    print(json.dumps({"load_mib": (status("VmHWM") - before) / 2**20}))
""")


def _load_mib(path: Path) -> float:
    out = subprocess.run([sys.executable, "-c", _LOAD, str(path)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)["load_mib"]


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_recurrent_weights_are_not_packed_per_step(tmp_path, kind):
    if kind == "lstm":
        model, gates = lstm_sequence(opset=13, steps=STEPS, features=8, hidden=HIDDEN), 4
        feeds = {"x": np.random.default_rng(0).standard_normal((STEPS, 1, 8)).astype(np.float32)}
    else:
        model, gates = gru_stateful(steps=STEPS, features=8, hidden=HIDDEN), 3
        rng = np.random.default_rng(0)
        feeds = {"x": rng.standard_normal((1, STEPS, 8)).astype(np.float32),
                 "state": rng.standard_normal((2, 1, HIDDEN)).astype(np.float32)}
    for init in model.graph.initializer:  # contracting recurrences: float rounding does not grow over 32 steps
        if init.name.startswith("R"):
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 0.1, init.name))
    layers = 1 if kind == "lstm" else 2
    recurrent_mib = layers * gates * HIDDEN * HIDDEN * 4 / 2**20  # 1 MiB (LSTM), 1.5 MiB (2 GRUs)
    conv = convert(model, tmp_path / "float")
    assert max_rel_error(model, conv, feeds) < 1e-4
    loaded = _load_mib(conv.path)
    # per-step packing held STEPS x recurrent_mib more: 47 / 67 MiB at load, against 16 / 19 MiB now
    # (the rest is LiteRT's and XNNPACK's own start-up)
    assert loaded < 8 * recurrent_mib + 12, (kind, loaded, recurrent_mib)
