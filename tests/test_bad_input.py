"""Bad input, as one table: the command, its exit code, what the one line it prints holds, and every
path left on disk afterwards (byte for byte what was there before: nothing written, nothing deleted,
no staging sibling). The converter's temporary directory must be empty too, and no pass may have
run (the checks come before any work)."""

from __future__ import annotations

import io
import os
import shutil
import struct
import tempfile

import numpy as np
import pytest

from conftest import run_cli
from onnx_models import chain, dynamic_dims, save, with_custom_op


# -- what the rows set up in the test's directory -------------------------------------------------------
def _images(n: int = 32) -> np.ndarray:
    return np.random.default_rng(0).random((n, 1, 8, 8), dtype=np.float32)


def _poked(value: float, sample: int, n: int = 32) -> np.ndarray:
    x = _images(n)
    x[sample, 0, 3, 4] = value
    return x


def _big(sample: int) -> np.ndarray:
    x = np.zeros((32, 1, 8, 8))
    x[sample, 0, 0, 0] = 1e300  # finite as float64, Inf as the model's float32
    return x


def _npy_bytes() -> bytes:
    buf = io.BytesIO()
    np.save(buf, _images())
    return buf.getvalue()


def data(kind: str, name: str = "cal.npz"):
    """A setup writing one data file of the digits CNN (input 'image' [N, 1, 8, 8], 10 classes)."""
    labels = np.arange(32) % 10

    def write(tmp, models) -> None:
        path = tmp / name
        writers = {
            "nan": lambda: np.savez(path, image=_poked(np.nan, 17)),
            "inf": lambda: np.savez(path, image=_poked(np.inf, 5)),
            "-inf": lambda: np.savez(path, image=_poked(-np.inf, 0)),
            "too-big": lambda: np.savez(path, image=_images().astype(np.float64) + _big(9)),
            "empty": lambda: np.savez(path, image=np.zeros((0, 1, 8, 8), np.float32)),
            "too-few": lambda: np.savez(path, image=np.zeros((3, 1, 8, 8), np.float32)),
            "wrong-name": lambda: np.savez(path, pixels=np.zeros((16, 1, 8, 8), np.float32)),
            "wrong-shape": lambda: np.savez(path, image=np.zeros((16, 1, 9, 9), np.float32)),
            "wrong-dtype": lambda: np.savez(path, image=np.zeros((16, 1, 8, 8), np.int64)),
            "label-range": lambda: np.savez(path, image=_images(), labels=np.where(np.arange(32) == 3, 10, labels)),
            "label-negative": lambda: np.savez(path, image=_images(), labels=np.where(np.arange(32) == 6, -1, labels)),
            "label-float": lambda: np.savez(path, image=_images(), labels=labels.astype(np.float32)),
            "label-scalar": lambda: np.savez(path, image=_images(), labels=np.int64(3)),
            "label-text": lambda: np.savez(path, image=_images(), labels=np.array(["cat"] * 32)),
            "label-nan": lambda: np.savez(path, image=_images(), labels=np.where(np.arange(32) == 4, np.nan, 1.0)),
            "text": lambda: path.write_text("image,label\n0.1,3\n"),
            "npy-as-npz": lambda: path.write_bytes(_npy_bytes()),
            "pickled": lambda: np.savez(path, image=np.array([object()] * 32, dtype=object)),
            "tiny-cal": lambda: np.savez(path, x=np.random.default_rng(0).standard_normal((32, 8)).astype(np.float32)),
        }
        writers[kind]()

    return write


def victim(*names):
    """victim/ holding copies of the model, calibration data and a note, as a user's folder would."""

    def setup(tmp, models) -> None:
        (tmp / "victim").mkdir()
        for name in names:
            if name == "model.onnx":
                shutil.copyfile(models["tiny"], tmp / "victim" / name)
            elif name.endswith(".npz"):
                data("tiny-cal", f"victim/{name}")(tmp, models)
            else:
                (tmp / "victim" / name).write_text("my notes")

    return setup


def artifact_and_a_note(tmp, models) -> None:
    assert run_cli("convert", models["tiny"], "-o", tmp / "victim", "--target", "onnx", "-q").code == 0
    (tmp / "victim" / "notes.txt").write_text("my notes")


def a_folder_of_mine(tmp, models) -> None:
    (tmp / "out").mkdir()
    (tmp / "out" / "keep.txt").write_text("mine")


def png_named_onnx(tmp, models) -> None:
    (tmp / "photo.onnx").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8)


def truncated_onnx(tmp, models) -> None:
    blob = models["cnn"].read_bytes()
    (tmp / "cut.onnx").write_bytes(blob[: len(blob) // 2])


def custom_op_model(tmp, models) -> None:
    save(with_custom_op(), tmp / "custom.onnx")


def dynamic_dims_model(tmp, models) -> None:
    save(dynamic_dims(), tmp / "dyn.onnx")


def aarch64_library(tmp, models) -> None:
    """The first 64 bytes of an aarch64 shared object (what `--profile raspberry-pi-4 --target tvm` writes)."""
    header = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8) + struct.pack("<HHI", 3, 183, 1) + bytes(44)
    (tmp / "model.so").write_bytes(header + bytes(1024))


def nothing(tmp, models) -> None:
    pass


def unwritable(tmp) -> str:
    """An output location whose parent cannot be written, for root too (the tests may run as root)."""
    if os.geteuid() != 0:
        (tmp / "ro").mkdir(mode=0o555, exist_ok=True)
        return str(tmp / "ro" / "out")
    return "/sys/edgeopt-test-out"  # sysfs: mkdir is refused (EPERM) even for root


CNN = ["convert", "{cnn}", "-o", "{tmp}/out", "--target", "onnx", "-q"]
TINY = ["convert", "{tiny}", "-o", "{tmp}/victim", "--force", "--target", "onnx"]
ARTIFACT = ["victim/golden.npz", "victim/manifest.json", "victim/model.onnx", "victim/report.json"]
USAGE = ["{tmp}/m.onnx", "-o", "{tmp}/o"]


def see(command: str) -> str:
    return f"(see 'edgeopt {command} --help')"


# id, setup(tmp, models), argv ({tmp}, {cnn}, {tiny}, {unwritable}), exit code, the one line holds, left on disk
BAD_INPUT = [
    # the model
    ("model-file-missing", nothing, ["convert", "{tmp}/nope.onnx", "-o", "{tmp}/out", "--target", "onnx"], 2,
     ["model file not found", "nope.onnx"], []),
    ("model-is-a-png", png_named_onnx, ["convert", "{tmp}/photo.onnx", "-o", "{tmp}/out", "--target", "onnx"], 2,
     ["photo.onnx", "not"], ["photo.onnx"]),
    ("model-truncated", truncated_onnx, ["convert", "{tmp}/cut.onnx", "-o", "{tmp}/out", "--target", "onnx"], 2,
     ["cut.onnx"], ["cut.onnx"]),
    ("op-no-target-supports", custom_op_model, ["convert", "{tmp}/custom.onnx", "-o", "{tmp}/out", "--target", "onnx"],
     2, ["com.example:FancyOp", "fancy_1"], ["custom.onnx"]),
    ("dynamic-dim-left-unresolved", dynamic_dims_model, ["convert", "{tmp}/dyn.onnx", "-o", "{tmp}/out", "--target",
                                                         "onnx"], 2, ["input 'x'", "--input-shape x:N,3,"], ["dyn.onnx"]),
    # data files: one line naming the file, the input and the first bad sample
    *[(f"{flag[2:]}-{kind}", data(kind), [*CNN, flag, "{tmp}/cal.npz", *extra], 2, needles, ["cal.npz"])
      for flag, kind, extra, needles in [
          ("--calibration", "nan", ["--quantize", "int8"], ["cal.npz: input 'image' sample 17 holds NaN"]),
          ("--calibration", "inf", ["--quantize", "int8"], ["cal.npz: input 'image' sample 5 holds Inf"]),
          ("--validation", "-inf", [], ["cal.npz: input 'image' sample 0 holds -Inf"]),
          ("--validation", "too-big", [], ["cal.npz: input 'image' sample 9 holds 1e+300, beyond the range of float32"]),
          ("--calibration", "empty", ["--quantize", "int8"], ["cal.npz: input 'image' has no samples"]),
          ("--calibration", "too-few", ["--quantize", "int8"], ["3 samples", "at least 16"]),
          ("--calibration", "wrong-name", ["--quantize", "int8"], ["cal.npz", "'pixels'", "image"]),
          ("--calibration", "wrong-shape", ["--quantize", "int8"], ["cal.npz", "'image'", "[16, 1, 9, 9]", "[N, 1, 8, 8]"]),
          ("--calibration", "wrong-dtype", ["--quantize", "int8"], ["cal.npz", "'image'", "int64", "float32"]),
          ("--validation", "label-range", [], ["cal.npz: 'labels' sample 3 is 10, outside the classes 0..9 of output"]),
          ("--validation", "label-negative", [], ["cal.npz: 'labels' sample 6 is -1, outside the classes 0..9"]),
          ("--validation", "label-float", [],
           ["cal.npz: 'labels' are float32 but output 'logits' [N, 10] is a classifier's"]),
          ("--validation", "label-scalar", [], ["cal.npz: 'labels' is a single value"]),
          ("--validation", "label-text", [], ["cal.npz: 'labels' has dtype <U3"]),
          ("--validation", "label-nan", [], ["cal.npz: 'labels' sample 4 holds NaN"]),
          ("--validation", "text", [], ["cal.npz: not an .npz file: numpy.savez writes a zip archive"]),
          ("--calibration", "npy-as-npz", ["--quantize", "int8"], ["cal.npz: is an .npy array, not an .npz archive"]),
          ("--calibration", "pickled", ["--quantize", "int8"], ["cal.npz: array 'image' holds Python objects (pickled)"]),
          ("--distill", "nan", ["--prune-channels", "0.5"], ["cal.npz: input 'image' sample 17 holds NaN"]),
          ("--distill", "label-range", ["--prune-channels", "0.5"], ["cal.npz: 'labels' sample 3 is 10, outside the classes 0..9"]),
      ]],
    ("int8-without-calibration-data", nothing, [*CNN, "--quantize", "int8"], 2, ["--calibration"], []),
    # the output location: never replace what the user did not ask to, and find out before any work
    ("existing-output-without-force", a_folder_of_mine, CNN, 2, ["already exists", "--force"], ["out", "out/keep.txt"]),
    ("force-over-the-folder-holding-the-model", victim("model.onnx", "cal.npz", "notes.txt"),
     ["convert", "{tmp}/victim/model.onnx", "-o", "{tmp}/victim", "--force", "--target", "onnx"], 2,
     ["output location", "victim/model.onnx, an input of this conversion", "write the artifact to another directory"],
     ["victim", "victim/cal.npz", "victim/model.onnx", "victim/notes.txt"]),
    ("force-over-the-folder-holding-the-data", victim("cal.npz"),
     [*TINY, "--quantize", "int8", "--calibration", "{tmp}/victim/cal.npz"], 2,
     ["victim/cal.npz, an input of this conversion"], ["victim", "victim/cal.npz"]),
    ("force-over-an-unrelated-folder", victim("notes.txt"), TINY, 2,
     ["is not empty and is not an edgeopt artifact (no manifest.json)", "choose another -o or empty it"],
     ["victim", "victim/notes.txt"]),
    ("force-over-an-artifact-and-a-note", artifact_and_a_note, TINY, 2,
     ["holds notes.txt besides an edgeopt artifact", "move it away"], ["victim", *sorted(ARTIFACT + ["victim/notes.txt"])]),
    ("log-file-inside-the-output-location", victim(), [*TINY, "--log-file", "{tmp}/victim/c.log"], 2,
     ["--log-file", "inside the output location", "write the log elsewhere"], ["victim"]),
    ("unwritable-output-found-before-pruning-and-distillation", data("tiny-cal", "train.npz"),
     ["convert", "{tiny}", "-o", "{unwritable}", "--target", "onnx", "--prune-channels", "0.5", "--distill",
      "{tmp}/train.npz"], 2, ["output location", "cannot write"], ["train.npz"]),
    # settings the target would not honour, profiles and targets
    ("calibration-method-tflite-cannot-apply", data("tiny-cal"),
     ["convert", "{tiny}", "-o", "{tmp}/out", "--target", "tflite", "--quantize", "int8", "--calibration",
      "{tmp}/cal.npz", "--calibration-method", "entropy"], 2,
     ["--calibration-method entropy", "target 'tflite'", "min/max"], ["cal.npz"]),
    ("unknown-profile", nothing, ["convert", "{cnn}", "-o", "{tmp}/out", "--profile", "raspbery-pi-4"], 2,
     ["unknown profile 'raspbery-pi-4'", "did you mean 'raspberry-pi-4'"], []),
    ("unknown-target", nothing, ["convert", "{cnn}", "-o", "{tmp}/out", "--target", "onxx"], 2,
     ["unknown target 'onxx'", "did you mean 'onnx'"], []),
    ("target-the-profile-cannot-run", nothing,
     ["convert", "{cnn}", "-o", "{tmp}/out", "--profile", "iphone-15", "--target", "onnx"], 2, ["iphone-15", "coreml"], []),
    ("malformed-input-shape", nothing, [*CNN, "--input-shape", "image=1,1,8,8"], 2, ["--input-shape", "NAME:d0,d1"], []),
    # usage errors: one line naming the option
    ("usage-missing-model", nothing, ["convert"], 2, [f"edgeopt: error: Missing argument 'MODEL' {see('convert')}"], []),
    ("usage-quantize-int9", nothing, ["convert", *USAGE, "--quantize", "int9"], 2,
     ["edgeopt: error: --quantize: 'int9' is not one of 'none', 'fp16', 'int8', 'int8-dynamic', 'int16x8', 'int4'"], []),
    ("usage-batch-0", nothing, ["convert", *USAGE, "--target", "tvm", "--batch", "0"], 2,
     [f"edgeopt: error: --batch: must be >= 1, got 0 {see('convert')}"], []),
    ("usage-threads-0", nothing, ["convert", *USAGE, "--target", "onnx", "--threads", "0"], 2,
     [f"edgeopt: error: --threads: must be at least 1, got 0 {see('convert')}"], []),
    ("usage-bench-batch-0", nothing, ["bench", "{tmp}/m.onnx", "--batch", "0"], 2,
     ["edgeopt: error: --batch: expected comma-separated positive integers, got '0'"], []),
    ("usage-misspelt-option", nothing, ["convert", *USAGE, "--frce"], 2,
     ["edgeopt: error: No such option '--frce'. Did you mean '--force'?"], []),
    ("usage-epochs-0", nothing, ["convert", *USAGE, "--distill", "{tmp}/d.npz", "--epochs", "0"], 2,
     [f"edgeopt: error: --epochs: must be >= 1, got 0 {see('convert')}"], []),
    ("usage-unknown-command", nothing, ["nonsense"], 2, ["edgeopt: error: No such command 'nonsense' (see 'edgeopt --help')"],
     []),
    # the device side and bench
    ("install-model-of-a-path-that-does-not-exist", nothing,
     ["agent", "install-model", "{tmp}/nonexist", "--state-dir", "{tmp}/state"], 2, ["nonexist", "does not exist"], []),
    ("bench-an-aarch64-library-here", aarch64_library, ["bench", "{tmp}/model.so"], 2,
     ["model.so", "aarch64", "this machine is x86_64", "on the board", "qemu"], ["model.so"]),
]


def _tree(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else b"<dir>") for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A 2-layer MatMul model x[1, 8] → y[1, 4] (fast to convert for every target)."""
    return save(chain([8, 16, 4]), tmp_path_factory.mktemp("tiny") / "tiny.onnx")


@pytest.mark.parametrize("case", BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_bad_input(case, digits_models, tiny_model, tmp_path_factory, monkeypatch):
    from edgeopt.converters.passes.prune_structured import PruneStructured

    name, setup, argv, code, needles, left = case
    if name == "bench-an-aarch64-library-here" and os.uname().machine != "x86_64":
        pytest.skip("the message names this machine's CPU; written for x86_64")
    tmp, private_tmp = tmp_path_factory.mktemp("case"), tmp_path_factory.mktemp("tmp")
    monkeypatch.setattr(tempfile, "tempdir", str(private_tmp))  # the converter's temporary directories

    def no_work(*args, **kwargs):
        raise AssertionError("a pass ran before the input was checked")

    monkeypatch.setattr(PruneStructured, "_apply", no_work)
    models = {"cnn": digits_models["cnn"], "tiny": tiny_model}
    setup(tmp, models)
    paths = {"tmp": tmp, **models, "unwritable": unwritable(tmp) if "{unwritable}" in argv else ""}
    before = _tree(tmp)
    res = run_cli(*[a.format(**paths) for a in argv])
    assert res.code == code, res.err
    lines = res.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgeopt: error: ") and "Traceback" not in res.err, res.err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    after = _tree(tmp)
    assert after == before and sorted(k for k in after if k != "ro") == sorted(left)
    assert list(private_tmp.iterdir()) == []


# -- failures after the work started ------------------------------------------------------------------------
def _assert_clean_failure(res, tmp_path, out, *needles):
    assert res.code == 2, (res.code, res.err)
    lines = res.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgeopt: error: "), res.err
    assert "Traceback" not in res.err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert not out.exists()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(f".{out.name}.")]
    assert leftovers == [], leftovers


def test_a_fixed_input_shape_converts_the_dynamic_model(tmp_path):
    model = save(dynamic_dims(), tmp_path / "dyn.onnx")
    res = run_cli("convert", model, "-o", tmp_path / "out", "--target", "onnx", "--input-shape", "x:1,3,16", "-q")
    assert res.code == 0, res.err


def test_failure_during_the_work_leaves_nothing(digits_models, tmp_path, monkeypatch):
    """A failure after the staging directory exists (here: in validation) removes it again."""
    from edgeopt.converters import pipeline
    from edgeopt.errors import UserInputError

    def broken(*args, **kwargs):
        raise UserInputError("validation exploded")

    monkeypatch.setattr(pipeline, "compare_models", broken)
    out = tmp_path / "out"
    res = run_cli("convert", digits_models["cnn"], "-o", out, "--target", "onnx")
    _assert_clean_failure(res, tmp_path, out, "validation exploded")


def test_disk_full_is_an_environment_error_and_leaves_nothing(digits_models, tmp_path, monkeypatch):
    import errno

    from edgeopt.converters.targets.onnx import OnnxTarget

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(OnnxTarget, "_compile", full)
    out = tmp_path / "out"
    res = run_cli("convert", digits_models["cnn"], "-o", out, "--target", "onnx")
    _assert_clean_failure(res, tmp_path, out, "no space left on device")
