"""edgeopt: compress, compile, validate and ship ONNX models to edge devices.

This package (the folder ``sdk/``) is the shared core: errors, the artifact format, data loading,
hardware profiles, runtime backends and the ``edgeopt`` command line. It imports nothing heavy at
import time so that ``edgeopt --help`` and the device agent start fast.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("edgeopt")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
