"""A settings field that is also a command-line option: ``setting(default, help=..., ...)``. The ``layerfold``
command is generated from the jobs' settings dataclasses (``cli.generate``); their fields say here how."""

from __future__ import annotations

import types
import typing
from dataclasses import MISSING, Field, dataclass, field, fields, is_dataclass
from typing import Any, Callable

from .errors import LayerfoldError


def option(
    help: str,
    *,
    argument: bool = False,
    flag: str | None = None,
    aliases: tuple[str, ...] = (),
    negatable: bool = False,
    choices: tuple[str, ...] | Callable[[], Any] | None = None,
    parse: Callable[[str], Any] | None = None,
    default_text: str | None = None,
    minimum: int | None = None,
) -> dict:
    """A field's CLI metadata: its help; ``argument`` (positional); ``flag`` (default ``--field-name``) and
    ``aliases``; ``negatable`` (``--x/--no-x``); ``choices`` (names, or a function returning the registry that names
    them); ``parse`` (the command line's text → the value); ``default_text`` (the help's default where the value's
    default is ``None`` and depends on the model); ``minimum``."""
    return {"cli": dict(help=help, argument=argument, flag=flag, aliases=aliases, negatable=negatable,
                        choices=choices, parse=parse, default_text=default_text, minimum=minimum)}  # fmt: skip


def setting(default: Any = None, *, factory: Callable[[], Any] | None = None, **cli: Any) -> Any:
    """A settings field with its CLI metadata (see ``option``); a required one has ``default=...``."""
    if default is ...:
        return field(metadata=option(**cli))
    if factory is not None:
        return field(default_factory=factory, metadata=option(**cli))
    return field(default=default, metadata=option(**cli))


def parse_list(kind: type, flag: str) -> Callable[[str], list]:
    """A comma-separated list of ``kind`` (``-1,-2``), one line naming ``flag`` otherwise."""

    def parse(text: str) -> list:
        try:
            return [kind(item.strip()) for item in text.split(",") if item.strip()]
        except ValueError:
            raise LayerfoldError(f"{flag}: expected a comma-separated list, got '{text}'") from None

    return parse


def present_type(hint: Any) -> Any:
    """``X`` of ``Optional[X]`` (``X | None``); any other annotation as it is."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1 else hint


def build_settings(kind: type, given: dict[str, Any], where: str) -> Any:
    """A settings dataclass from values by field name (a group's fields too, its groups built likewise): each
    value taken out of ``given`` (what is left was not a field), a field not given left at its default."""
    hints, values = typing.get_type_hints(kind), {}
    for item in fields(kind):
        if is_dataclass(hints[item.name]):
            values[item.name] = build_settings(hints[item.name], given, where)
        elif item.name in given:
            values[item.name] = given.pop(item.name)
    missing = [f.name for f in fields(kind) if f.name not in values and f.default is MISSING and f.default_factory is MISSING]
    if missing:
        raise LayerfoldError(f"{where}: give {', '.join(missing)}")
    return kind(**values)


@dataclass
class Option:
    """One option a settings dataclass declares: where its value goes (``path``: its groups' names, then its
    own), its field, type hint and CLI metadata."""

    path: tuple[str, ...]
    field: Field
    hint: Any
    meta: dict

    @property
    def name(self) -> str:
        return self.path[-1]

    @property
    def default(self) -> Any:
        if self.field.default is not MISSING:
            return self.field.default
        if self.field.default_factory is not MISSING:
            return self.field.default_factory()
        return MISSING

    def default_text(self) -> str:
        """The default as the help states it ('' for none, off or empty)."""
        default = self.default
        if self.meta["default_text"] is not None:
            return self.meta["default_text"]
        if default is None or default is MISSING or default is False or default == []:
            return ""
        if isinstance(default, (list, tuple)):
            return ",".join(str(v) for v in default)
        if default is True:
            return "on"
        return f"{default:,}" if isinstance(default, int) and default >= 10**4 else str(default)


def options_of(kind: type, changes: dict | None = None, path: tuple[str, ...] = ()) -> list[Option]:
    """The options of a settings dataclass, its groups' flattened in; ``changes`` overrides metadata by field
    name (a command's own help for a shared option)."""
    found = []
    hints = typing.get_type_hints(kind)
    for item in fields(kind):
        hint = hints[item.name]
        if isinstance(hint, type) and is_dataclass(hint):
            found += options_of(hint, changes, path + (item.name,))
        elif "cli" in item.metadata:
            meta = {**item.metadata["cli"], **(changes or {}).get(item.name, {})}
            found.append(Option(path + (item.name,), item, hint, meta))
    return found
