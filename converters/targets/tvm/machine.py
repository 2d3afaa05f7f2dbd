"""Which machine a TVM library is built for, and the C compiler that links it.

The board profile's ``[tvm] target`` table (e.g. ``{kind = "llvm", mtriple = "aarch64-linux-gnu",
mcpu = "cortex-a72", mattr = ["+neon"]}``) is handed to ``tvm.target.Target`` as a dict (TVM 0.27
rejects option strings). Without a profile the library is built for this host. A target whose
triple names another CPU architecture is cross-compiled: LLVM emits the object code and a GNU
cross linker (``<triple>-gcc``) links the shared library.
"""

from __future__ import annotations

import platform
import shutil
from dataclasses import dataclass
from typing import Any

from edgeopt.errors import EnvironmentFault, UserInputError
from edgeopt.profiles import Profile

HOST_TARGET: dict[str, Any] = {"kind": "llvm"}

# GNU triple → the Debian/Ubuntu package that provides "<triple>-gcc"
CROSS_PACKAGES = {
    "aarch64-linux-gnu": "gcc-aarch64-linux-gnu",
    "arm-linux-gnueabihf": "gcc-arm-linux-gnueabihf",
    "x86_64-linux-gnu": "gcc-x86-64-linux-gnu",
    "riscv64-linux-gnu": "gcc-riscv64-linux-gnu",
}
_ARCH_ALIASES = {"arm64": "aarch64", "amd64": "x86_64", "armv7l": "arm"}


class MissingCrossCompiler(EnvironmentFault):
    """The cross compiler that links a library for another CPU is not installed."""


def host_arch() -> str:
    machine = platform.machine().lower()
    return _ARCH_ALIASES.get(machine, machine)


def triple_arch(mtriple: str) -> str:
    arch = mtriple.split("-", 1)[0].lower()
    return _ARCH_ALIASES.get(arch, arch)


@dataclass(frozen=True)
class BuildMachine:
    """The TVM target for a build and whether it runs on this host."""

    spec: dict[str, Any]
    profile: str | None

    @property
    def mtriple(self) -> str | None:
        return self.spec.get("mtriple")

    @property
    def arch(self) -> str:
        return triple_arch(self.mtriple) if self.mtriple else host_arch()

    @property
    def is_host(self) -> bool:
        return self.arch == host_arch()

    def describe(self) -> str:
        where = f"profile '{self.profile}'" if self.profile else "this host"
        cpu = f", {self.spec['mcpu']}" if "mcpu" in self.spec else ""
        return f"{self.arch}{cpu} ({where})"

    def tvm_target(self, num_cores: int | None = None):
        import tvm

        spec = dict(self.spec)
        if num_cores:
            spec["num-cores"] = num_cores  # MetaSchedule requires it to plan parallel loops
        try:
            return tvm.target.Target(spec)
        except Exception as exc:
            where = f"profile '{self.profile}'" if self.profile else "the host target"
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise UserInputError(f"{where}: TVM rejects the target {spec}: {first}") from exc


def build_machine(profile: Profile | None) -> BuildMachine:
    if profile is None or not profile.tvm_target:
        return BuildMachine(dict(HOST_TARGET), None)
    spec = dict(profile.tvm_target)
    if spec.get("kind", "llvm") != "llvm":
        raise UserInputError(f"profile '{profile.name}': [tvm] target kind {spec.get('kind')!r} is not supported; "
                             f"edgeopt builds CPU libraries (kind = \"llvm\")")
    spec.setdefault("kind", "llvm")
    return BuildMachine(spec, profile.name)


def find_cross_compiler(machine: BuildMachine, override: str | None) -> str:
    """The linker command for a non-host build: ``override`` or ``<mtriple>-gcc``, which must exist."""
    triple = machine.mtriple or ""
    command = override or f"{triple}-gcc"
    if shutil.which(command):
        return command
    package = CROSS_PACKAGES.get(triple)
    install = (f"install it with: apt-get install {package} (Debian/Ubuntu)" if package
               else f"install a GNU cross toolchain for {triple}")
    raise MissingCrossCompiler(f"linking a TVM library for {machine.describe()} needs the cross compiler "
                               f"'{command}', which is not on PATH; {install}, or point --cross-compiler at one")
