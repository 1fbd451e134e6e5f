"""A command's options, generated from its job's settings dataclass (``core.settings.setting``).

Each field with CLI metadata is an option (``core.settings.options_of``; a field whose type is a dataclass is a
group: its fields are options too); its help is the metadata's, with the field's default appended, so that every default is stated once, in the
dataclass. What the command line gives is turned back into the settings (``settings_from``): an option not given
keeps the dataclass's default.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from enum import Enum
from functools import cache
from typing import Any, Optional

import typer

from ..core.settings import Option, build_settings, options_of, present_type


@cache
def _enum(name: str, choices: tuple[str, ...]) -> type[Enum]:
    return Enum(name, {c: c for c in choices}, type=str)


def _choices(meta: dict) -> tuple[str, ...] | None:
    choices = meta["choices"]
    if callable(choices):
        choices = choices()
    return tuple(choices) if choices is not None else None


def parameter(flag: Option) -> inspect.Parameter:
    """The typer parameter of one option."""
    meta, default = flag.meta, flag.default
    kind = present_type(flag.hint)
    choices = _choices(meta)
    required = default is dataclasses.MISSING or meta.get("required", False)
    if choices is not None:
        annotation = Optional[_enum(flag.name.title(), choices)]
    elif meta["parse"] is not None:
        annotation = Optional[str]
    elif typing.get_origin(kind) is list:
        annotation = Optional[list[typing.get_args(kind)[0]]]
    else:
        annotation = Optional[kind] if not (kind is bool and not meta["negatable"]) else bool
    help_text = meta["help"]() if callable(meta["help"]) else meta["help"]
    shown = flag.default_text()
    if shown and not required:
        help_text += f" [default: {shown}]"
    help_text = help_text.replace("%", "%%")
    if meta["argument"]:
        value = typer.Argument(..., help=help_text, show_default=False)
    else:
        names = meta["flag"] or "--" + flag.name.replace("_", "-")
        if meta["negatable"]:
            names = f"{names}/--no-{names[2:]}"
        typer_default = ... if required else (False if annotation is bool else None)
        extra = {"min": meta["minimum"]} if meta["minimum"] is not None else {}
        value = typer.Option(typer_default, names, *meta["aliases"], help=help_text, show_default=False, **extra)
    return inspect.Parameter(flag.name, inspect.Parameter.KEYWORD_ONLY, default=value, annotation=annotation)


def signature(settings: type, changes: dict | None = None, extra: list[inspect.Parameter] = ()) -> inspect.Signature:
    own = [parameter(flag) for flag in options_of(settings, changes)]
    return inspect.Signature(own + list(extra))


def settings_from(settings: type, values: dict, changes: dict | None = None) -> Any:
    """The settings the command line gives: each option's text parsed, an option not given left at its default."""
    given: dict[str, Any] = {}
    for flag in options_of(settings, changes):
        value = values.pop(flag.name)
        if value is None or (isinstance(value, list) and not value and flag.default is None):
            continue
        if isinstance(value, Enum):
            value = value.value
        elif flag.meta["parse"] is not None:
            value = flag.meta["parse"](value)
        elif isinstance(value, (list, tuple)):
            value = list(value)
        given[flag.name] = value
    return build_settings(settings, given, "layerfold")
