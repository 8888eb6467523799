"""Options are defined once, as frozen dataclasses with help text beside each field.

The Python API takes the dataclass; the CLI derives its click options from the
same fields with `click_options`, so a default or a help string lives in one place.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any, Literal, Mapping

import click

from tvtool.errors import OptionsError


def opt(default: Any, help: str, *, flag: str | None = None, short: str | None = None,
        off: str | None = None) -> Any:
    """A dataclass field with CLI help. `flag` overrides the option name, `short` adds e.g. '-a';
    `off` names the switch that turns a default-True bool off (default: '--no-<flag>')."""
    kw = {"default_factory": lambda: default} if isinstance(default, (list, dict)) else {"default": default}
    return dataclasses.field(metadata={"help": help, "flag": flag, "short": short, "off": off}, **kw)


class CliOptions:
    """Mixin for the option dataclasses: `to_cli_args()` is the inverse of `from_cli`."""

    def to_cli_args(self, *, exclude: tuple[str, ...] = ()) -> list[str]:
        """The flags (click syntax) that rebuild these options; defaults are left out."""
        return to_cli_args(self, exclude=exclude)


class _FloatList(click.ParamType):
    """A float, or comma-separated floats ('0.2,0.4'); repeated options are flattened by `from_cli`."""

    name = "FLOAT[,FLOAT...]"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            return tuple(float(v) for v in str(value).split(",") if v.strip())
        except ValueError:
            self.fail(f"{value!r} is not a number (or comma-separated numbers)", param, ctx)


FLOAT_LIST = _FloatList()


class _IntList(click.ParamType):
    """An integer, or comma-separated integers ('20,50,100')."""

    name = "INT[,INT...]"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            return tuple(int(v) for v in str(value).split(",") if v.strip())
        except ValueError:
            self.fail(f"{value!r} is not an integer (or comma-separated integers)", param, ctx)


INT_LIST = _IntList()


def unwrap_optional(tp: Any) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


def _click_type(tp: Any) -> tuple[Any, bool]:
    """(click type, multiple) for a field's annotation."""
    tp, _ = unwrap_optional(tp)
    origin = typing.get_origin(tp)
    if origin is tuple:
        inner = typing.get_args(tp)[0]
        return ({float: FLOAT_LIST, int: INT_LIST}.get(inner) or _click_type(inner)[0]), True
    if origin is Literal:
        return click.Choice([str(a) for a in typing.get_args(tp)]), False
    return {int: int, float: float, str: str, bool: bool}.get(tp, str), False


def _cli_fields(cls: type, exclude: tuple[str, ...], rename: Mapping[str, str] = {}):
    """(field, flag name, default) for every field of `cls` that has a CLI option."""
    for f in dataclasses.fields(cls):
        if f.name in exclude or not f.metadata.get("help"):
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        yield f, rename.get(f.name) or f.metadata.get("flag") or "--" + f.name.replace("_", "-"), default


def _dest(f: dataclasses.Field, rename: Mapping[str, str]) -> str:
    """The click parameter name of a field: its own, or the renamed flag's (e.g. --merge-method → merge_method)."""
    return rename[f.name][2:].replace("-", "_") if f.name in rename else f.name


def _off_flag(f: dataclasses.Field, name: str) -> str:
    return f.metadata.get("off") or "--no-" + name[2:]


def click_options(cls: type, *, exclude: tuple[str, ...] = (), rename: Mapping[str, str] = {}):
    """Decorator: add one click option per field of dataclass `cls` (names use dashes).

    `rename` (field → flag) gives a field another flag where a second option class on the same
    command already uses its name (svd-rank: `--merge-method` beside LowRankOptions' `--method`);
    pass the same `rename` to `from_cli` and `to_cli_args`."""
    hints = typing.get_type_hints(cls)

    def decorate(fn):
        for f, name, default in reversed(list(_cli_fields(cls, exclude, rename))):
            ctype, multiple = _click_type(hints[f.name])
            decls = [name] + ([f.metadata["short"]] if f.metadata.get("short") else [])
            if ctype is bool:
                if default:
                    fn = click.option(f"{name}/{_off_flag(f, name)}", _dest(f, rename), default=True,
                                      help=f.metadata["help"])(fn)
                else:
                    fn = click.option(*decls, _dest(f, rename), is_flag=True, default=False,
                                      help=f.metadata["help"])(fn)
                continue
            fn = click.option(
                *decls,
                _dest(f, rename),
                type=ctype,
                multiple=multiple,
                default=tuple(default) if multiple else default,
                show_default=not multiple and default is not None,
                help=f.metadata["help"],
            )(fn)
        return fn

    return decorate


def from_cli(cls: type, kwargs: dict[str, Any], *, rename: Mapping[str, str] = {}) -> Any:
    """Build `cls` from the click kwargs that belong to it, popping them from `kwargs` (`rename`: as
    given to `click_options`)."""
    names = {_dest(f, rename): f.name for f in dataclasses.fields(cls)}
    out = {}
    for k in [k for k in kwargs if k in names]:
        v = kwargs.pop(k)
        k = names[k]
        if isinstance(v, tuple) and v and isinstance(v[0], tuple):  # FLOAT_LIST, repeated
            v = tuple(x for part in v for x in part)
        out[k] = v
    return cls(**out)


def to_cli_args(options: Any, *, exclude: tuple[str, ...] = (), rename: Mapping[str, str] = {}) -> list[str]:
    """The click arguments that `from_cli` turns back into `options` (non-default fields only).

    Floats are written as short as they round-trip ('0.6', not '0.6000000000000001');
    float tuples as one comma-separated value. Join with `shlex.join` for a shell line.
    """
    cls = type(options)
    hints = typing.get_type_hints(cls)
    out: list[str] = []
    for f, name, default in _cli_fields(cls, exclude, rename):
        v = getattr(options, f.name)
        if v == default:
            continue
        ctype, multiple = _click_type(hints[f.name])
        if v is None:
            raise ValueError(f"{cls.__name__}.{f.name}=None has no flag (its default is {default!r})")
        if ctype is bool:
            out.append(name if v else _off_flag(f, name))
        elif ctype is FLOAT_LIST:
            out += [name, ",".join(cli_number(x) for x in v)] if v else []
        elif ctype is INT_LIST:
            out += [name, ",".join(str(x) for x in v)] if v else []
        elif multiple:
            for x in v:
                out += [name, str(x)]
        else:
            out += [name, cli_number(v) if isinstance(v, float) else str(v)]
    return out


def cli_number(x: float) -> str:
    """The shortest text that parses back to `x`: 0.6 → '0.6', 1.0 → '1'."""
    short = f"{x:g}"
    return short if float(short) == x else repr(float(x))


def check_regex(flag: str, pattern: str | None) -> None:
    """Raise a one-line OptionsError naming `flag` when `pattern` is not a valid regular expression."""
    if pattern:
        try:
            re.compile(pattern)
        except re.error as e:
            raise OptionsError(f"bad regular expression {pattern!r}: {e}", where=flag) from None
