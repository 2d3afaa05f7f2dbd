"""edgeopt: compress, compile, validate and ship ONNX models to edge devices.

This package (the folder ``sdk/``) is the shared core: errors, the artifact format, data loading,
hardware profiles, runtime backends and the ``edgeopt`` command line. It imports nothing heavy at
import time so that ``edgeopt --help`` and the device agent start fast.
"""

# The one place the version is written: pyproject.toml reads it from here (a dynamic version). Asking
# importlib.metadata instead imports it with email and zipfile: 1.5 MiB of the device agent's peak RSS,
# whose bound is 60 MiB (docs/benchmarks.md, "Issue 18, third pass").
__version__ = "0.1.0"


# The Python API (docs/python.md): edgeopt.convert, edgeopt.analyze, edgeopt.optimize. The converter sits
# above this core package (tests/test_layering.py), so the names resolve on first use, never at import:
# `import edgeopt` stays light for the device agent, which has no converter installed.
API = ("convert", "analyze", "optimize", "Analysis", "Optimization", "ConvertResult", "ConvertCheckFailed")


def __getattr__(name: str):
    if name in API:
        import importlib

        return getattr(importlib.import_module("edgeopt.converters.api"), name)
    raise AttributeError(f"module 'edgeopt' has no attribute {name!r}")
