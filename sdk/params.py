"""Declared parameters (type, default, one-line help): the one declaration system of edgeopt.

Passes, targets and runtimes (``Configurable.params``), the agent's config keys
(``edgeopt.agent.config.key``), the rollout options (``edgeopt.fleet.rollout_spec.ROLLOUT_PARAMS``) and
the recipe's keys are all ``Param``s. A component lists its parameters next to the code that uses
them; the CLI options (``click_option``), their ``--help`` text, the checks of a config or recipe file
(``validate``) and the docs' tables (``reference_table``) are generated from the same declarations.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
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

    @property
    def flag(self) -> str:
        """The command-line spelling of the name: ``max_error_rate`` → ``--max-error-rate``."""
        return "--" + self.name.replace("_", "-")

    def validate(self, value: Any, where: str) -> Any:
        """``value`` as read from a TOML (or JSON) file, checked strictly: no text is taken for a number or
        a boolean, an int is taken for a float. One line naming ``where`` and the key when it is wrong."""
        if not type_ok(value, self.type):
            raise UserInputError(f"{where}: '{self.name}' must be {_TYPE_WORDS.get(self.type, self.type.__name__)}, "
                                 f"got {value!r}")
        if self.type is float:
            value = float(value)
        if self.choices is not None and value not in self.choices:
            raise UserInputError(f"{where}: '{self.name}' must be one of {', '.join(map(str, self.choices))}, got "
                                 f"{value!r}{closest(str(value), [str(c) for c in self.choices])}")
        if self.check is not None and (problem := self.check(value)):
            raise UserInputError(f"{where}: '{self.name}' {problem}, got {value!r}")
        return value

    def type_name(self) -> str:
        """How the docs name the type: TOML's names; a converter function by what it takes."""
        if self.type is list:
            return "list of strings"
        if self.type in (str, int, float, bool):
            return self.type.__name__
        return "table" if "mapping" in self.type.__name__ else "str"

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
        text = kwargs["help"]  # a sentence in --help, as the hand-written options are
        kwargs["help"] = text[:1].upper() + text[1:] + ("" if text.endswith(".") else ".")
        return click.option(*flags, **kwargs)


    def _click_check(self, ctx: Any, option: Any, value: Any) -> Any:
        """Click callback: the declaration's check as a usage error naming the option (``--epochs: ...``)."""
        import click

        if value is not None and (problem := self.check(value)):  # type: ignore[misc]
            raise click.BadParameter(f"{problem}, got {value!r}", ctx=ctx, param=option)
        return value


_TYPE_WORDS = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list of strings"}


def type_ok(value: Any, kind: Any) -> bool:
    """Whether ``value``, as a TOML or JSON file gives it, is of ``kind`` (no text for a number or a
    boolean; an int for a float)."""
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind is list:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    return isinstance(value, kind)


def toml_value(value: Any) -> str:
    """``value`` (a string, bool, number or list of them) as TOML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        # a JSON string is a TOML basic string, but for DEL, which TOML wants escaped
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {type(value).__name__}")


MIB = 1 << 20


def default_text(value: Any) -> str:
    """A default as the docs' tables show it: TOML, with MiB spelled out; nothing for None."""
    if value is None:
        return ""
    if isinstance(value, int) and not isinstance(value, bool) and value >= MIB and value % MIB == 0:
        return f"`{value}` ({value // MIB} MiB)"
    try:
        return f"`{toml_value(value)}`"
    except TypeError:
        return f"`{value!r}`"


def reference_table(params: Iterable[Param], *, name: Callable[[Param], str] = lambda p: f"`{p.name}`",
                    header: str = "key") -> list[str]:
    """The markdown table of ``params`` the docs embed: name, type, default, meaning (with the choices)."""
    rows = [f"| {header} | type | default | meaning |", "|---|---|---|---|"]
    for p in params:
        meaning = p.help.replace("|", "\\|")
        if p.choices:
            meaning += " (" + " \\| ".join(f"`{c}`" for c in p.choices) + ")"
        rows.append(f"| {name(p)} | {p.type_name()} | {default_text(p.default)} | {meaning} |")
    return rows


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
