"""Sweep recipes: a YAML file validated at load by pydantic into frozen, typed settings.

A recipe is the shared fields every stage may read (`tvtool.sweep.spec`) plus one section per stage that
owns one (`tvtool.sweep.stages`: `low_rank:`, `push:`, `executor:`, `mixchain:`, `train:`, `serve:` …),
assembled here into `Recipe`. A field nests the options its verb already defines, so it means the same
thing in a recipe, on the command line and in Python. Values are checked with JSON's types (pydantic strict
JSON mode: a list for a tuple, no `true` for an integer, no '0.5' for a number). Every error is one
`RecipeError` line naming the field path and the file, e.g.
`field datasets[0].limit must be an integer, got 'many' (r.yaml)`.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path
from typing import Any

import pydantic
import yaml
from pydantic import BaseModel, Field, create_model, model_validator

from tvtool.errors import RecipeError
from tvtool.options import unwrap_optional
from tvtool.sweep.spec import Invalid, RecipeCore, normalize
from tvtool.sweep.stage import Section
from tvtool.sweep.stages import STAGES
from tvtool.sweep.words import short

SECTIONS: tuple[Section, ...] = tuple(s.section for s in STAGES if s.section is not None)


def _check_sections(recipe: RecipeCore) -> RecipeCore:
    for section in SECTIONS:  # in pipeline order, after the shared fields' checks (RecipeCore)
        if section.check is not None:
            section.check(recipe)
    return recipe


_RecipeFields = create_model(
    "_RecipeFields", __base__=RecipeCore, __module__=__name__,
    __validators__={"_sections": model_validator(mode="after")(_check_sections)},
    **{s.name: (s.type, Field(s.default, description=s.help)) for s in SECTIONS})


def _ordered() -> tuple[str, ...]:
    """The recipe's fields in reading order: each section right after the field it follows."""
    out: list[str] = []

    def place(name: str) -> None:
        out.append(name)
        for s in SECTIONS:
            if s.after == name:
                place(s.name)

    for name in RecipeCore.model_fields:
        place(name)
    return (*out, *(s.name for s in SECTIONS if s.name not in out))


FIELDS = _ordered()  # as recipe.yaml, REPORT.md and the error messages list them


class Recipe(_RecipeFields):
    """A validated sweep recipe (frozen). Built in Python, a bad field raises one RecipeError line."""

    def __init__(self, **data: Any) -> None:
        # A custom __init__ makes pydantic route every validation through it, in lax Python mode;
        # files are therefore checked on `_RecipeFields` (strict JSON mode) in `load_recipe`.
        try:
            super().__init__(**normalize(data, "Recipe(...)"))
        except pydantic.ValidationError as e:
            raise _recipe_error(e.errors()[0], "Recipe(...)") from None


def load_recipe(path: str | Path) -> Recipe:
    """Parse and validate a recipe; relative model/dataset paths are resolved from its folder."""
    path = Path(path)
    data = _read_yaml(path)
    if not isinstance(data, dict):
        raise RecipeError(f"the recipe must be a mapping of fields, got {_show(data)}", where=str(path))
    try:
        # YAML data is JSON data; strict JSON mode checks it with JSON's types (see the module docstring).
        checked = _RecipeFields.model_validate_json(json.dumps(normalize(data, str(path)), default=str), strict=True)
    except pydantic.ValidationError as e:
        raise _recipe_error(e.errors()[0], str(path)) from None
    r = Recipe.model_construct(checked.model_fields_set, **dict(checked))  # already validated
    here = path.resolve().parent

    def local(v: str) -> str:
        return str((here / v).resolve()) if not Path(v).is_absolute() and (here / v).exists() else v

    return _map_paths(r, local)


def portable(r: Recipe, start: Path | None) -> Recipe:
    """`r` with its local inputs relative to `start` (the recipe's folder), as a recipe there would name
    them (committed reports carry no machine paths)."""
    return _map_paths(r, lambda p: short(p, start))


def _map_paths(r: Recipe, to) -> Recipe:
    """`r` with every local path it names (models, datasets, the sections' own) mapped by `to`."""
    update = {"base": to(r.base), "reasoner": to(r.reasoner),
              "datasets": tuple(dataclasses.replace(d, name=to(d.name)) for d in r.datasets),
              "vectors": tuple(dataclasses.replace(v, model=to(v.model)) for v in r.vectors)}
    for s in SECTIONS:
        if s.paths is not None:
            update[s.name] = s.paths(getattr(r, s.name), to)
    return r.model_copy(update=update)


def to_dict(r: Recipe) -> dict:
    """The recipe as plain data, fields in reading order (for recipe.yaml, REPORT.md and report.json)."""
    d = r.model_dump(mode="json")
    return {k: d[k] for k in FIELDS}


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise RecipeError(f"duplicate key {key!r} on line {key_node.start_mark.line + 1}",
                                  fix="give each field once")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise RecipeError("recipe not found", where=str(path), fix="check the path") from None
    except IsADirectoryError:
        raise RecipeError("recipe is a folder, not a file", where=str(path), fix="pass the .yaml file") from None
    except UnicodeDecodeError as e:
        raise RecipeError(f"recipe is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})",
                          where=str(path), fix="save it as UTF-8") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except RecipeError as e:
        raise RecipeError(e.what, where=str(path), fix=e.fix) from None
    except yaml.YAMLError as e:
        raise RecipeError(f"recipe is not valid YAML: {str(e).splitlines()[0]}", where=str(path)) from None


_WHAT = {"int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
         "float_type": "a number", "float_parsing": "a number", "bool_type": "true or false",
         "bool_parsing": "true or false", "string_type": "a string", "tuple_type": "a list", "list_type": "a list",
         "dataclass_type": "a mapping", "model_type": "a mapping", "model_attributes_type": "a mapping",
         "dict_type": "a mapping"}


def _recipe_error(err: dict, file: str) -> RecipeError:
    """One pydantic error → one RecipeError line naming the field path."""
    loc, kind, given = err["loc"], err["type"], err.get("input")
    where = _path(loc)
    if kind in ("extra_forbidden", "unexpected_keyword_argument"):
        known = [n for n in _fields(_annotation(loc[:-1]))]
        home = [k for k in known if len(loc) == 1 and loc[0] in _fields(_annotation((k,)))]
        fix = (f"it belongs in a section: {' or '.join(f'{k}.{loc[0]}' for k in home)}" if home
               else f"known fields: {', '.join(known)}")
        return RecipeError(f"unknown field {where}", where=file, fix=fix)
    if kind in ("missing", "missing_argument"):
        return RecipeError(f"missing field {where}", where=file)
    if kind == "literal_error":
        choices = ", ".join(map(str, typing.get_args(unwrap_optional(_annotation(loc))[0])))
        return RecipeError(f"field {where} must be one of {choices}, got {_show(given)}", where=file)
    if kind in _WHAT:
        if given is None:
            return RecipeError(f"field {where} must not be empty", where=file)
        return RecipeError(f"field {where} must be {_WHAT[kind]}, got {_show(given)}", where=file)
    bad = (err.get("ctx") or {}).get("error")
    if isinstance(bad, Invalid):
        where = _path((*loc, bad.field) if bad.field else loc)
        return RecipeError(f"field {where} {bad.what}", where=file, fix=bad.fix)
    return RecipeError(f"field {where}: {err['msg']}", where=file)


def _annotation(loc: tuple) -> Any:
    """The type at a field path of `Recipe` (list indices step into the element type)."""
    tp: Any = _RecipeFields
    for part in loc:
        tp = unwrap_optional(tp)[0]
        if isinstance(part, int):
            tp = typing.get_args(tp)[0]
        elif isinstance(tp, type) and issubclass(tp, BaseModel):
            tp = tp.model_fields[part].annotation
        else:
            tp = typing.get_type_hints(tp)[part]
    return tp


def _fields(tp: Any) -> list[str]:
    tp = unwrap_optional(tp)[0]
    if tp is _RecipeFields:
        return list(FIELDS)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return list(tp.model_fields)
    return [f.name for f in dataclasses.fields(tp)] if dataclasses.is_dataclass(tp) else []


def _path(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _show(v) -> str:
    return repr(v) if not isinstance(v, (dict, list)) else type(v).__name__


__all__ = ["FIELDS", "Recipe", "SECTIONS", "load_recipe", "portable", "to_dict"]
