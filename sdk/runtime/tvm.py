"""TVM runtime backend: runs a library compiled by ``edgeopt convert --target tvm`` in TVM's Relax VM.

The library carries its own I/O signature (``SIGNATURE_FUNCTION``, returning JSON
``{"inputs": [TensorSpec...], "outputs": [...]}``, which the TVM target compiles in), so a bare
``model.so`` is enough. ``threads`` sets the size of TVM's CPU thread pool, which is process-wide:
each runtime re-applies its own setting before it runs when another one changed it.
"""

from __future__ import annotations

import json
import platform
import struct
from pathlib import Path
from typing import ClassVar

import numpy as np

from edgeopt.errors import MissingDependency, UserInputError
from edgeopt.params import Param
from edgeopt.runtime import Runtime
from edgeopt.specs import TensorSpec

SIGNATURE_FUNCTION = "edgeopt_signature"  # the Relax function in the library that returns its I/O signature

_pool_threads: list[int | None] = [None]  # the thread count TVM's pool was last configured with

# ELF e_machine → the name ``platform.machine()`` gives that CPU on Linux
ELF_MACHINES = {3: "i686", 40: "armv7l", 62: "x86_64", 183: "aarch64", 243: "riscv64"}


def elf_machine(path: Path) -> str | None:
    """The CPU an ELF shared object is built for (None: not ELF, or a CPU this table does not name).
    Read from the header, because dlopen of a library for another CPU says only "cannot open shared
    object file: No such file or directory" about a file that exists."""
    try:
        with open(path, "rb") as f:
            header = f.read(20)
    except OSError:
        return None
    if len(header) < 20 or header[:4] != b"\x7fELF":
        return None
    (machine,) = struct.unpack("<H" if header[5] == 1 else ">H", header[18:20])
    return ELF_MACHINES.get(machine, f"ELF machine {machine}")


def parse_signature(text: str) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The inputs and outputs in the JSON that ``SIGNATURE_FUNCTION`` returns."""
    sig = json.loads(text)
    return ([TensorSpec.from_json(s) for s in sig["inputs"]], [TensorSpec.from_json(s) for s in sig["outputs"]])


def host_machine() -> str:
    return {"arm64": "aarch64", "amd64": "x86_64"}.get(platform.machine().lower(), platform.machine().lower())


class TVMRuntime(Runtime):
    name: ClassVar[str] = "tvm"
    formats: ClassVar[tuple[str, ...]] = ("tvm",)
    params: ClassVar[tuple[Param, ...]] = Runtime.params

    def _load(self) -> None:
        try:
            import tvm
            from tvm import relax
        except ImportError as exc:
            raise MissingDependency("apache-tvm", "tvm", "running a TVM library") from exc

        built_for, here = elf_machine(self.model_path), host_machine()
        if built_for is not None and built_for != here:
            raise UserInputError(
                f"{self.model_path}: a TVM library for {built_for}; this machine is {here}: run it on the board "
                f"(the agent, or edgeopt bench there), or under qemu-user in an emulated {built_for} Python "
                f"(docs/tvm.md, 'Running the aarch64 build under qemu-user')")
        try:
            library = tvm.runtime.load_module(str(self.model_path))
            self.vm = relax.VirtualMachine(library, tvm.cpu())
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise UserInputError(f"{self.model_path}: TVM cannot load the library (built for another CPU, "
                                 f"or not a TVM Relax library?): {first}") from exc
        try:
            text = str(self.vm[SIGNATURE_FUNCTION]())
        except Exception as exc:
            raise UserInputError(f"{self.model_path}: TVM library has no '{SIGNATURE_FUNCTION}' function "
                                 f"(not built by edgeopt convert --target tvm)") from exc
        self.inputs, self.outputs = parse_signature(text)
        self._main = self.vm["main"]
        self._tvm = tvm

    def _run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        threads = self.config["threads"]
        if threads and _pool_threads[0] != threads:
            self._tvm.get_global_func("runtime.config_threadpool")(0, threads)
            _pool_threads[0] = threads
        args = [self._tvm.runtime.tensor(np.ascontiguousarray(feeds[s.name])) for s in self.inputs]
        result = self._main(*args)
        items = list(result) if len(self.outputs) > 1 else [result]
        return [item.numpy() for item in items]
