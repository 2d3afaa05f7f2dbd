"""Every registered pass, target and runtime loads through the entry-point mechanism plugins use."""

from __future__ import annotations

import pytest

from edgeopt import registry
from edgeopt.converters.passes import Pass
from edgeopt.converters.targets import QUANTIZE_MODES, Target
from edgeopt.errors import UserInputError
from edgeopt.runtime import Runtime


@pytest.mark.parametrize("group,base", [(registry.PASSES, Pass), (registry.TARGETS, Target),
                                        (registry.RUNTIMES, Runtime)])
def test_every_registered_name_imports(group, base):
    names = registry.names(group)
    assert names
    for name in names:
        cls = registry.load(group, name)
        assert issubclass(cls, base) and cls.name == name
        for p in cls.params:
            assert p.help and p.type, f"{name}.{p.name} lacks a type or help"
            if p.default is not None:
                p.coerce(p.default, name)  # every default is valid


def test_targets_declare_what_they_produce():
    for name in registry.names(registry.TARGETS):
        cls = registry.load(registry.TARGETS, name)
        assert cls.format and cls.runtime in registry.names(registry.RUNTIMES) and cls.model_file
        assert set(cls.quantize_modes) <= set(QUANTIZE_MODES)


def test_unknown_names_suggest():
    with pytest.raises(UserInputError, match="unknown pass 'quantize-in8'.*did you mean 'quantize-int8'"):
        registry.load(registry.PASSES, "quantize-in8")


def test_pass_params_are_checked():
    cls = registry.load(registry.PASSES, "quantize-int8")
    with pytest.raises(UserInputError, match="unknown parameter 'calibration_mthod'.*calibration_method"):
        cls(calibration_mthod="minmax")
    with pytest.raises(UserInputError, match="must be one of"):
        cls(calibration_method="median")
    with pytest.raises(UserInputError, match=r"must be in \[90.0, 100.0\]"):
        cls(percentile=50)


def test_builtin_table_is_what_pyproject_registers():
    """registry.BUILTIN (loaded without entry points) names the same classes as the entry points."""
    for group, table in registry.BUILTIN.items():
        eps = {n: ep.value for n, ep in registry._entry_points(group).items()}
        assert {n: eps.get(n) for n in table} == table
        for name in table:
            assert registry.load(group, name).name == name


def test_loading_the_agents_runtime_reads_no_entry_points():
    """The device agent loads its model's runtime without importing importlib.metadata (1.5 MiB of its RSS)."""
    import subprocess
    import sys

    code = ("import sys\nfrom edgeopt.runtime import runtime_class\n"
            "cls = runtime_class({'model': {'runtime': 'onnxruntime', 'format': 'onnx'}})\n"
            "import edgeopt.agent.service, edgeopt.cli.agent\n"
            "print(cls.name, 'importlib.metadata' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["onnxruntime", "False"]
