"""Exceptions, grouped by who is at fault so callers can choose to reject or retry.

- ``UserInputError``: the input or the invocation is wrong (a corrupt model, a wrong shape, an
  unknown profile). Retrying will not help; the message says what to change. CLI exit code 2.
- ``CheckFailed``: everything ran, but a result is outside what was asked for (accuracy gate, fit on
  the board, parity). CLI exit code 1; the artifact is kept and its report says why.
- ``RemoteError``: the other side (a broker, a repository) misbehaved or is unreachable; retrying
  later may help.
- ``EnvironmentFault``: this machine cannot do it (disk full, permission, a toolchain not installed).

Only the CLI turns these into one-line messages (see ``edgeopt.cli``).
"""

from __future__ import annotations


class EdgeoptError(Exception):
    """Base of every error edgeopt raises on purpose. ``str(err)`` is one line for a human."""

    exit_code = 2


class UserInputError(EdgeoptError):
    """The user's input (files, flags, config, data) is wrong."""


class NotFound(UserInputError):
    """What the user named (a rollout, a device) does not exist (HTTP 404 on the dashboard)."""


class UnsupportedOpsError(UserInputError):
    """A model uses operators that a target cannot compile; lists each op with its node names."""

    def __init__(self, target: str, unsupported: dict[str, list[str]]):
        self.target = target
        self.unsupported = unsupported
        parts = []
        for op, nodes in sorted(unsupported.items()):
            shown = ", ".join(repr(n) for n in nodes[:3])
            more = f" and {len(nodes) - 3} more" if len(nodes) > 3 else ""
            parts.append(f"{op} (node {shown}{more})")
        super().__init__(f"target '{target}' does not support: {'; '.join(parts)}")


class CheckFailed(EdgeoptError):
    """A quality or fit check failed; the work itself completed."""

    exit_code = 1


class RemoteError(EdgeoptError):
    """The remote side (broker, repository, server) failed or sent something invalid."""


class EnvironmentFault(EdgeoptError):
    """This machine's environment prevents the work: disk full, permissions, missing tools."""


class MissingDependency(EnvironmentFault):
    """An optional toolchain is not installed; the message names the pip extra to install."""

    def __init__(self, module: str, extra: str, purpose: str):
        self.module = module
        self.extra = extra
        super().__init__(
            f"{purpose} needs the Python package '{module}', which is not installed; "
            f"install it with: pip install 'edgeopt[{extra}]'"
        )


# Optional third-party modules: import name → (distribution, the pip extra that installs it)
OPTIONAL_MODULES = {
    "onnx": ("onnx", "convert"), "onnxslim": ("onnxslim", "convert"), "onnx_ir": ("onnx-ir", "convert"),
    "onnxruntime": ("onnxruntime", "convert"), "paho": ("paho-mqtt", "agent"), "tuf": ("tuf", "agent"),
    "securesystemslib": ("securesystemslib", "agent"), "cryptography": ("cryptography", "agent"),
    "ai_edge_litert": ("ai-edge-litert", "litert"), "flatbuffers": ("flatbuffers", "tflite"),
    "litert_quantizer": ("litert-quantizer", "tflite"), "coremltools": ("coremltools", "coreml"),
    "tvm": ("apache-tvm", "tvm"), "torch": ("torch", "train"), "torch_pruning": ("torch-pruning", "train"),
    "amqtt": ("amqtt", "fleet"), "psycopg": ("psycopg", "fleet"), "serial": ("pyserial", "serial"),
    "matplotlib": ("matplotlib", "plot"),
}


def missing_dependency(exc: ModuleNotFoundError, purpose: str) -> MissingDependency | None:
    """The MissingDependency a failed import of an optional module means (None for anything else,
    e.g. a broken install of edgeopt itself)."""
    top = (exc.name or "").split(".")[0]
    if top not in OPTIONAL_MODULES:
        return None
    package, extra = OPTIONAL_MODULES[top]
    return MissingDependency(package, extra, purpose)


def closest(name: str, choices: list[str] | tuple[str, ...]) -> str:
    """A ' (did you mean X?)' suffix for an unknown name, or '' when nothing is close."""
    import difflib

    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""
