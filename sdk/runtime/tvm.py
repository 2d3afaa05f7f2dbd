"""TVM runtime backend: runs a library compiled by ``edgeopt convert --target tvm`` in TVM's Relax VM.

The library carries its own I/O signature (the ``edgeopt_signature`` function, JSON), so a bare
``model.so`` is enough. ``threads`` sets the size of TVM's CPU thread pool, which is process-wide:
each runtime re-applies its own setting before it runs when another one changed it.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from edgeopt.errors import MissingDependency, UserInputError
from edgeopt.params import Param
from edgeopt.runtime import Runtime

_pool_threads: list[int | None] = [None]  # the thread count TVM's pool was last configured with


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
        from edgeopt.converters.targets.tvm.build import SIGNATURE_FUNCTION, parse_signature

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
