"""Passes: ONNX model in, ONNX model out, with declared parameters, registered by name.

A pass fills in ``_apply``; the public ``apply`` wraps unexpected failures of the underlying tool in
a ``ConversionError`` naming the pass, and checks the model it returns.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import onnx

from edgeopt import registry
from edgeopt.data import Dataset
from edgeopt.errors import EdgeoptError, UserInputError
from edgeopt.fsutil import ENVIRONMENT_ERRNOS, environment_fault
from edgeopt.logs import in_session, native_output, python_prints
from edgeopt.params import Configurable, Param
from edgeopt.runtime.onnxruntime import quiet_onnxruntime


class ConversionError(UserInputError):
    """A pass or target could not handle this model (the message names the pass and the cause)."""


ProgressFactory = Callable[[str, int | None], contextlib.AbstractContextManager]


@contextlib.contextmanager
def no_progress(description: str, total: int | None) -> Iterator[Callable[..., None]]:
    """The progress factory's protocol: yields ``advance(n=1, status=None)``; ``status`` is a short
    text shown next to the bar (e.g. a training loss)."""
    yield lambda n=1, status=None: None


@dataclass
class PassContext:
    """What a pass may use besides the model: data, a scratch directory, progress, notes."""

    workdir: Path
    calibration: Dataset | None = None
    distillation: Dataset | None = None  # the --distill data, loaded and checked before any pass runs
    validation: Dataset | None = None  # the validation inputs (quantize-int8's min_cosine search compares on them)
    progress: ProgressFactory = no_progress
    reference: onnx.ModelProto | None = None  # the model before compression (the distillation teacher)
    notes: list[str] = field(default_factory=list)  # warnings that end up in the report
    details: dict[str, Any] = field(default_factory=dict)  # per-pass facts for the report, by pass name
    # the all-INT8 model when mixed precision kept nodes float, in the format the pass wrote: the report
    # measures the latency the float nodes cost against it
    all_int8: Path | None = None


class Pass(Configurable):
    """Transforms an ONNX model. Subclasses set ``name``, ``params`` and implement ``_apply``."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    params: ClassVar[tuple[Param, ...]] = ()
    min_opset: ClassVar[int | None] = None  # the oldest ONNX opset it handles; canonicalize upgrades to it

    def _apply(self, model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
        raise NotImplementedError

    def preflight(self) -> None:
        """Checks that need no model (a toolchain is installed, a file exists), run before any work."""

    def apply(self, model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
        try:
            with quiet_loggers(), native_output(self.name), python_prints(self.name):
                out = self._apply(model, ctx)
        except EdgeoptError:
            raise
        except OSError as exc:
            if exc.errno not in ENVIRONMENT_ERRNOS:
                raise ConversionError(f"{self.name}: {exc}") from exc
            raise environment_fault(exc, ctx.workdir) from exc
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ConversionError(f"pass '{self.name}' failed: {first}") from exc
        try:
            onnx.checker.check_model(out) if out.ByteSize() < 2**31 else None
        except onnx.checker.ValidationError as exc:
            first = str(exc).strip().splitlines()[0]
            raise ConversionError(f"pass '{self.name}' produced an invalid model: {first}") from exc
        return out

    def describe(self) -> dict[str, Any]:
        return {"pass": self.name, "params": {k: v for k, v in self.config.items() if v is not None}}


@contextlib.contextmanager
def quiet_loggers() -> Iterator[None]:
    """ONNX Runtime's quantizers log every node at INFO on the root logger; keep the terminal readable
    (the CLI routes them itself, to --log-file when asked: ``edgeopt.logs``). ONNX Runtime's telemetry
    and native INFO/WARNING lines are switched off before any session exists."""
    quiet_onnxruntime()
    if in_session():
        yield
        return
    root = logging.getLogger()
    old = root.level
    root.setLevel(max(old, logging.WARNING))
    try:
        yield
    finally:
        root.setLevel(old)


def get_pass(name: str) -> type[Pass]:
    return registry.load(registry.PASSES, name)
