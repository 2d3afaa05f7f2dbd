"""Hardware profiles: one TOML file per board, shipped in ``edgeopt.hardware/profiles``.

``--profile NAME`` picks a shipped profile; ``--profile path/to/board.toml`` loads a user's own.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from edgeopt.errors import UserInputError, closest

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(value: Any, where: str) -> int:
    """'4 GiB' / '512MB' / 1024 → bytes."""
    if isinstance(value, int) and value >= 0:
        return value
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise UserInputError(f"{where}: not a size: {value!r} (use e.g. 512 MiB, 4 GiB or a byte count)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    arch: str  # x86_64, aarch64, armv7, cortex-m, apple-arm64
    cpu: str
    cores: int
    cpu_features: tuple[str, ...]
    ram_bytes: int
    storage_bytes: int
    model_ram_budget_bytes: int  # RAM the model (weights + activations) may use
    model_storage_budget_bytes: int
    accelerators: tuple[str, ...]
    formats: tuple[str, ...]
    default_target: str
    default_quantize: str  # for a target without its own entry in quantize_by_target
    latency_budget_ms: float | None
    default_batch: int | None = None  # fixes a dynamic batch dim (e.g. 1 for TFLite Micro boards)
    quantize_by_target: dict[str, str] = field(default_factory=dict)  # [default_recipe] tvm = { quantize = ... }
    tvm_target: dict[str, Any] | None = None
    coreml_deployment_target: str | None = None
    runtime: str | None = None  # "tflite-micro": a microcontroller (full-integer int8, C++ sources, measured arena)
    code_bytes: int | None = None  # [tflite_micro] code_bytes: flash the runtime's own code takes (an estimate)
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def default_quantize_for(self, target: str) -> str:
        """What --quantize defaults to for ``target`` on this board: its own entry of the default
        recipe, else the recipe's ``quantize`` (the right mode differs per target: TVM's int8, for
        one, buys no speed and needs calibration data)."""
        return self.quantize_by_target.get(target, self.default_quantize)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "description": self.description, "arch": self.arch, "cpu": self.cpu,
            "cores": self.cores, "cpu_features": list(self.cpu_features), "ram_bytes": self.ram_bytes,
            "storage_bytes": self.storage_bytes, "model_ram_budget_bytes": self.model_ram_budget_bytes,
            "model_storage_budget_bytes": self.model_storage_budget_bytes,
            "accelerators": list(self.accelerators), "formats": list(self.formats),
            "default_recipe": {"target": self.default_target,
                               "quantize": self.default_quantize_for(self.default_target),
                               "quantize_by_target": {f: self.default_quantize_for(f) for f in self.formats},
                               "batch": self.default_batch},
            "latency_budget_ms": self.latency_budget_ms, "tvm_target": self.tvm_target,
            "coreml_deployment_target": self.coreml_deployment_target, "runtime": self.runtime,
            "code_bytes": self.code_bytes,
        }


_REQUIRED = ("name", "description", "cpu", "memory", "formats", "default_recipe")


def _parse(doc: dict[str, Any], source: str) -> Profile:
    for key in _REQUIRED:
        if key not in doc:
            raise UserInputError(f"{source}: profile is missing the '{key}' table/field")
    cpu, mem, recipe = doc["cpu"], doc["memory"], doc["default_recipe"]
    try:
        return Profile(
            name=str(doc["name"]), description=str(doc["description"]),
            arch=str(cpu["arch"]), cpu=str(cpu.get("model", "")), cores=int(cpu["cores"]),
            cpu_features=tuple(cpu.get("features", ())),
            ram_bytes=parse_size(mem["ram"], f"{source}: memory.ram"),
            storage_bytes=parse_size(mem["storage"], f"{source}: memory.storage"),
            model_ram_budget_bytes=parse_size(mem["model_ram_budget"], f"{source}: memory.model_ram_budget"),
            model_storage_budget_bytes=parse_size(mem["model_storage_budget"],
                                                  f"{source}: memory.model_storage_budget"),
            accelerators=tuple(doc.get("accelerators", ())),
            formats=tuple(doc["formats"]),
            default_target=str(recipe["target"]), default_quantize=str(recipe.get("quantize", "none")),
            latency_budget_ms=float(doc["latency_budget_ms"]) if "latency_budget_ms" in doc else None,
            default_batch=int(recipe["batch"]) if "batch" in recipe else None,
            quantize_by_target=_quantize_by_target(recipe, tuple(doc["formats"]), source),
            tvm_target=doc.get("tvm", {}).get("target"),
            coreml_deployment_target=doc.get("coreml", {}).get("minimum_deployment_target"),
            runtime=_runtime(doc, source),
            code_bytes=(parse_size(doc["tflite_micro"]["code_bytes"], f"{source}: tflite_micro.code_bytes")
                        if "tflite_micro" in doc else None),
            source=source,
            extra={k: v for k, v in doc.items() if k not in (*_REQUIRED, "accelerators", "latency_budget_ms",
                                                              "tvm", "coreml", "runtime", "tflite_micro")},
        )
    except KeyError as exc:
        raise UserInputError(f"{source}: profile is missing field {exc.args[0]!r}") from None
    except (TypeError, ValueError) as exc:
        raise UserInputError(f"{source}: malformed profile ({exc})") from None


RUNTIMES = ("tflite-micro",)


def _runtime(doc: dict[str, Any], source: str) -> str | None:
    """``runtime``: what runs the model where it is not the format's usual runtime (TFLite Micro on a
    microcontroller); such a board needs [tflite_micro] code_bytes, the flash its runtime code takes."""
    runtime = doc.get("runtime")
    if runtime is None:
        return None
    if runtime not in RUNTIMES:
        raise UserInputError(f"{source}: runtime {runtime!r} is not one of {', '.join(RUNTIMES)}")
    if doc["formats"] != ["tflite"] or "code_bytes" not in doc.get("tflite_micro", {}):
        raise UserInputError(f"{source}: a runtime = \"tflite-micro\" profile has formats = [\"tflite\"] and a "
                             f"[tflite_micro] table with code_bytes (the flash TFLite Micro's code takes)")
    return runtime


_RECIPE_KEYS = ("target", "quantize", "batch")


def _quantize_by_target(recipe: dict[str, Any], formats: tuple[str, ...], source: str) -> dict[str, str]:
    """The per-target entries of [default_recipe]: ``tvm = { quantize = "none" }``."""
    out = {}
    for name, value in recipe.items():
        if name in _RECIPE_KEYS:
            continue
        where = f"{source}: default_recipe.{name}"
        if not isinstance(value, dict):
            raise UserInputError(f"{where}: unknown key (expected {', '.join(_RECIPE_KEYS)}, or a table per "
                                 f"target such as tvm = {{ quantize = \"none\" }})")
        if name not in formats:
            raise UserInputError(f"{where}: the profile's formats are {', '.join(formats)}; {name!r} is not one")
        unknown = sorted(set(value) - {"quantize"})
        if unknown or not isinstance(value.get("quantize"), str):
            raise UserInputError(f"{where}: expected {{ quantize = \"MODE\" }}, got {value!r}")
        out[name] = value["quantize"]
    return out


def _shipped() -> dict[str, Any]:
    return {p.name[:-5]: p for p in resources.files("edgeopt.hardware").joinpath("profiles").iterdir()
            if p.name.endswith(".toml")}


def profile_names() -> list[str]:
    return sorted(_shipped())


def load_profile(name_or_path: str) -> Profile:
    """A shipped profile by name, or a profile TOML file by path."""
    shipped = _shipped()
    if name_or_path in shipped:
        text, source = shipped[name_or_path].read_text(), f"profile '{name_or_path}'"
    elif name_or_path.endswith(".toml") or "/" in name_or_path:
        path = Path(name_or_path)
        if not path.is_file():
            raise UserInputError(f"profile file not found: {path}")
        text, source = path.read_text(), str(path)
    else:
        raise UserInputError(f"unknown profile '{name_or_path}'{closest(name_or_path, list(shipped))}; "
                             f"see 'edgeopt profiles list'")
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UserInputError(f"{source}: invalid TOML ({exc})") from exc
    return _parse(doc, source)
