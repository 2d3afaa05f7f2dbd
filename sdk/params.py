"""Declared parameters for passes, targets and runtimes (type, default, one-line help).

A component lists its parameters next to the code that uses them; the CLI options, their ``--help``
text and the docs are generated from the same declarations.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from edgeopt.errors import UserInputError, closest


@dataclass(frozen=True)
class Param:
    name: str
    type: type
    default: Any
    help: str
    choices: tuple[Any, ...] | None = None
    check: Callable[[Any], str | None] | None = None  # returns an error message or None

    def coerce(self, value: Any, owner: str) -> Any:
        if value is None:
            return None
        try:
            if self.type is bool and isinstance(value, str):
                lowered = value.strip().lower()
                if lowered not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError(value)
                value = lowered in ("1", "true", "yes", "on")
            else:
                value = self.type(value)
        except (TypeError, ValueError):
            raise UserInputError(
                f"{owner}: parameter '{self.name}' must be {self.type.__name__}, got {value!r}"
            ) from None
        if self.choices is not None and value not in self.choices:
            allowed = ", ".join(map(str, self.choices))
            raise UserInputError(f"{owner}: parameter '{self.name}' must be one of {allowed}, got {value!r}")
        if self.check is not None and (problem := self.check(value)):
            raise UserInputError(f"{owner}: parameter '{self.name}' {problem}, got {value!r}")
        return value

    def click_option(self, *flags: str, **overrides: Any):
        """A click option generated from this declaration (help, type, choices, default)."""
        import click

        click_type: Any = self.type
        if self.choices is not None:
            click_type = click.Choice([str(c) for c in self.choices])
        kwargs: dict[str, Any] = {"type": click_type, "default": self.default, "show_default": True,
                                  "help": self.help}
        if self.type is bool:
            kwargs = {"is_flag": True, "default": bool(self.default), "help": self.help}
        elif self.check is not None:
            kwargs["callback"] = self._click_check
        kwargs.update(overrides)
        return click.option(*flags, **kwargs)


    def _click_check(self, ctx: Any, option: Any, value: Any) -> Any:
        """Click callback: the declaration's check as a usage error naming the option (``--epochs: ...``)."""
        import click

        if value is not None and (problem := self.check(value)):  # type: ignore[misc]
            raise click.BadParameter(f"{problem}, got {value!r}", ctx=ctx, param=option)
        return value


def in_range(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False):
    def check(v: float) -> str | None:
        if (v <= lo if lo_open else v < lo) or (v >= hi if hi_open else v > hi):
            return f"must be in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        return None

    return check


class Configurable:
    """Mixin: ``params`` declares the settings; ``__init__(**kw)`` validates them into ``self.config``."""

    name: ClassVar[str] = ""
    params: ClassVar[tuple[Param, ...]] = ()

    def __init__(self, **settings: Any):
        self.config = self.resolve_params(settings)

    @classmethod
    def resolve_params(cls, settings: Mapping[str, Any]) -> dict[str, Any]:
        known = {p.name: p for p in cls.params}
        for key in settings:
            if key not in known:
                raise UserInputError(f"{cls.name}: unknown parameter '{key}'{closest(key, list(known))}")
        resolved = {}
        for p in cls.params:
            value = settings.get(p.name, p.default)
            resolved[p.name] = p.coerce(value, cls.name) if value is not None else None
        return resolved

    @classmethod
    def param(cls, name: str) -> Param:
        for p in cls.params:
            if p.name == name:
                return p
        raise KeyError(name)
