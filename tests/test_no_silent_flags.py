"""No silent flags: every (target, quantize mode, option) either is refused by name before any work, or
is used by the target — by its own declaration (``honoured_pass_params``, ``calibrates``,
``unused_params``), and that declaration is checked against what the target really reads while it
compiles. Walking the pairs costs no conversion: an accepted setting runs into a refused output
location, a refused one stops before it.
"""

from __future__ import annotations

import pytest

from edgeopt import registry
from edgeopt.converters.settings import PASS_OPTIONS, target_option
from edgeopt.converters.targets import get_target

from conftest import run_cli
from onnx_models import chain, save

TARGETS = registry.names(registry.TARGETS)
NO_PARENT = "/nonexistent-edgeopt-parent/out"  # the output check comes right after the settings check
ACCEPTED = "parent directory of the output location does not exist"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    import numpy as np

    root = tmp_path_factory.mktemp("flags")
    np.savez(root / "cal.npz", x=np.random.default_rng(0).standard_normal((32, 8)).astype(np.float32))
    return {"model": save(chain([8, 16, 4]), root / "tiny.onnx"), "data": root / "cal.npz"}


def _value(param) -> list[str]:
    """A valid, non-default value of a declared parameter, as command-line words."""
    if param.type is bool:
        return []
    if param.choices:
        return [str(next(c for c in reversed(param.choices) if c != param.default))]
    if param.name == "cross_compiler":
        return ["gcc"]
    if param.type is float:
        return ["0.75"]
    return [str((param.default or 1) + 1)]


def _settings():
    """(option words, kind, key) for every option whose use depends on the target: each target's own
    parameters (offered to every target, as a user may type them) and the pass options."""
    found = {}
    for name in TARGETS:
        for param in get_target(name).params:
            found.setdefault(param.name, ([target_option(param.name), *_value(param)], "target", param.name))
    values = {"calibration_method": "entropy", "block_size": "64", "keep_float": "some/node", "kept_precision": "int16"}
    for (pass_name, param), option in PASS_OPTIONS.items():
        words = [option] + ([values[param]] if param in values else [])
        found[option] = (words, "pass", (pass_name, param))
    return list(found.values())


def _declared_use(target_name: str, quantize: str, kind: str, key) -> bool:
    target = get_target(target_name)()
    if kind == "target":
        return any(p.name == key for p in target.params) and key not in target.unused_params(quantize)
    return key[1] in target.honoured_pass_params(quantize).get(key[0], ())


# what a mode needs besides --target and --quantize to be accepted at all
BASE = {("coreml", "int4"): ["--minimum-deployment-target", "iOS18"]}  # per-block int4 runs on iOS 18 and later


def test_every_target_flag_pair_is_used_or_refused_by_name(files):
    """Outcomes of 4 targets x their quantize modes x every target-dependent option: refused in one line
    naming the option and the target, or accepted — and accepted only where the target declares it uses it."""
    walked = refused = 0
    for target_name in TARGETS:
        for quantize in get_target(target_name).quantize_modes:
            base = ["convert", files["model"], "-o", NO_PARENT, "--target", target_name, "--quantize", quantize,
                    *BASE.get((target_name, quantize), [])]
            res = run_cli(*base)
            assert res.code == 2 and ACCEPTED in res.err, (target_name, quantize, res.err)
            for words, kind, key in _settings():
                res = run_cli(*base, *words)
                line = res.err.strip()
                assert res.code == 2 and len(line.splitlines()) == 1, (target_name, quantize, words, res.err)
                walked += 1
                if ACCEPTED in line:
                    assert _declared_use(target_name, quantize, kind, key), \
                        f"{words} accepted by {target_name} --quantize {quantize}, which does not declare using it"
                    continue
                refused += 1
                assert words[0] in line and target_name in line, (target_name, quantize, words, line)
                # honoured options may still be refused for a value or a combination the target cannot do
                # (tflite's calibrator has no entropy; coreml compresses one way at a time): never silently
    assert walked == sum(len(get_target(t).quantize_modes) for t in TARGETS) * len(_settings())
    assert 0 < refused < walked


@pytest.mark.parametrize("words,line", [
    (["--target", "tflite", "--quantize", "int8", "--calibration-method", "entropy"],
     "edgeopt: error: --calibration-method entropy: target 'tflite' calibrates with LiteRT's calibrator, which "
     "records min/max ranges only: use --calibration-method minmax, or --target onnx for entropy"),
    (["--target", "tflite", "--quantize", "fp16", "--fp16-io"],
     "edgeopt: error: --fp16-io: target 'tflite' does not use it with --quantize fp16; it applies with --target onnx "
     "--quantize fp16"),
    (["--profile", "raspberry-pi-4", "--quantize", "none", "--batch", "2"],  # target from the profile: tflite
     "edgeopt: error: --batch applies to target tvm, not tflite"),
])
def test_refusals_say_what_is_unused_and_where_it_applies(files, words, line):
    res = run_cli("convert", files["model"], "-o", NO_PARENT, *words)
    assert res.code == 2 and res.err.strip() == line


def test_calibration_data_nothing_reads_is_noted_in_the_report(files, tmp_path):
    """--calibration with --validation, for a mode that does not calibrate: the report says it was not read."""
    res = run_cli("convert", files["model"], "-o", tmp_path / "out", "--target", "onnx", "--quantize", "fp16",
                  "--calibration", files["data"], "--validation", files["data"], "-q", "--json")
    assert res.code == 0, res.err
    assert any(n.startswith("--calibration was not read: target 'onnx' does not calibrate with --quantize fp16")
               for n in res.json()["notes"]), res.json()["notes"]
    res = run_cli("convert", files["model"], "-o", tmp_path / "int8", "--target", "onnx", "--quantize", "int8",
                  "--calibration", files["data"], "--validation", files["data"], "-q", "--json")
    assert res.code == 0 and not any("--calibration" in n for n in res.json()["notes"])


def test_options_are_named_as_the_command_line_spells_them():
    from edgeopt.cli.convert import convert_cmd

    options = {opt for p in convert_cmd.params for opt in p.opts}
    assert set(PASS_OPTIONS.values()) <= options
    assert {target_option(p.name) for t in TARGETS for p in get_target(t).params} <= options


# -- the declarations checked against what the targets read while they compile ----------------------------
class _Reads(dict):
    """A dict that records which keys are read (item access, get, unpacking, items)."""

    def __init__(self, data, log: set, prefix: tuple):
        super().__init__({k: _Reads(v, log, prefix + (k,)) if isinstance(v, dict) else v for k, v in data.items()})
        self._log, self._prefix = log, prefix

    def __getitem__(self, key):
        self._log.add(self._prefix + (key,))
        return super().__getitem__(key)

    def get(self, key, default=None):
        if key in self:
            return self[key]
        return default

    def items(self):
        return [(k, self[k]) for k in self.keys()]

    def __iter__(self):  # not dict's own: then ``**reads`` unpacks through __getitem__, and is recorded
        return iter(list(self.keys()))


COMPILES = [(t, q, None) for t in TARGETS for q in get_target(t).quantize_modes] + [("tvm", "none", "raspberry-pi-4")]


@pytest.mark.parametrize("target_name,quantize,profile", COMPILES,
                         ids=[f"{t}-{q}" + (f"-{p}" if p else "") for t, q, p in COMPILES])
def test_a_target_reads_exactly_the_settings_it_declares_it_uses(files, tmp_path, target_name, quantize, profile):
    """A real compile of a tiny model: every own parameter the target declares it uses for this mode is
    read, and none it declares unused; the same for the pass options and the calibration data."""
    import dataclasses

    from edgeopt.converters.passes import PassContext
    from edgeopt.data import load_dataset
    from edgeopt.onnx_io import input_specs, load_model
    from edgeopt.profiles import load_profile

    if target_name == "tvm":
        pytest.importorskip("tvm")
    if target_name == "coreml":
        pytest.importorskip("coremltools")
    if profile and __import__("shutil").which("aarch64-linux-gnu-gcc") is None:
        pytest.skip("needs aarch64-linux-gnu-gcc")
    model = load_model(files["model"])
    settings = {"minimum_deployment_target": "iOS18"} if target_name == "coreml" else {}
    passes = {"quantize-int8": {"calibration_method": "minmax", "keep_float": "", "kept_precision": "float"},
              "quantize-int4": {"block_size": 32},
              "quantize-fp16": {"keep_io_types": True}}
    target = get_target(target_name)(pass_params=passes, profile=load_profile(profile) if profile else None, **settings)
    target.check_quantize(quantize)
    declared_params = {p.name for p in target.params} - set(target.unused_params(quantize))
    declared_passes = {(name, param) for name, params in target.honoured_pass_params(quantize).items()
                       for param in params if (name, param) in PASS_OPTIONS}

    reads: set = set()

    @dataclasses.dataclass
    class Ctx(PassContext):
        def __getattribute__(self, name):
            if name == "calibration":
                reads.add(("calibration",))
            return super().__getattribute__(name)

    ctx = Ctx(workdir=tmp_path, calibration=load_dataset(files["data"], input_specs(model)))
    target.config = _Reads(target.config, reads, ("config",))
    target.pass_params = _Reads(passes, reads, ("pass",))
    target.canonicalize_settings()
    target.activation_bytes(target.mode_for(quantize))
    (tmp_path / "out").mkdir()
    before = dict(vars(target))
    compiled = target.compile(model, quantize, ctx, tmp_path / "out")

    assert {k[1] for k in reads if k[0] == "config"} == declared_params
    assert {k[1:] for k in reads if k[0] == "pass" and len(k) == 3} & set(PASS_OPTIONS) == declared_passes
    assert (("calibration",) in reads) == target.calibrates(quantize)

    # stateless: compiling leaves the target as it was, and everything about the result is in what it returns
    assert vars(target) == before
    assert compiled.path == tmp_path / "out" / target.model_file and compiled.path.exists()
    assert compiled.runnable.exists()
    (tmp_path / "again").mkdir()
    again = target.compile(model, quantize, dataclasses.replace(ctx, workdir=tmp_path / "again"), tmp_path / "again")
    assert dataclasses.replace(again, path=compiled.path, host_model=compiled.host_model) == compiled
