"""The one exception type layerfold raises for problems the user can fix."""


class LayerfoldError(Exception):
    """Bad input: a model, plan, path or option that cannot work. The CLI prints it as one line."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (libraries' messages run to many lines), or its type's name."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def renamed(function, old: str, new: str | None = None):
    """``function`` under its old name ``old``, which still works and warns (a ``DeprecationWarning``) on use;
    ``new``: the name to use instead (default: the function's own)."""
    import functools
    import warnings

    @functools.wraps(function)
    def call(*args, **kwargs):
        message = f"{old} is renamed {new or function.__qualname__}; the old name will be removed"
        warnings.warn(message, DeprecationWarning, stacklevel=2)
        return function(*args, **kwargs)

    return call


class Registry(dict):
    """The registered things of one kind (methods, eval tasks, losses, ...) by name, in registration order.
    ``add`` registers one (its ``name``); ``require`` returns one or refuses an unknown name in one line that
    lists the known ones."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def add(self, item, name: str | None = None):
        self[name or item.name] = item
        return item

    def require(self, name: str):
        if name not in self:
            raise LayerfoldError(f"unknown {self.kind} '{name}' (choose from {', '.join(self)})")
        return self[name]
