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
