"""The one exception type layerfold raises for problems the user can fix."""


class LayerfoldError(Exception):
    """Bad input: a model, plan, path or option that cannot work. The CLI prints it as one line."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (libraries' messages run to many lines), or its type's name."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def renamed(function, old: str):
    """``function`` under its old name ``old``, which still works and warns (a ``DeprecationWarning``) on use."""
    import functools
    import warnings

    @functools.wraps(function)
    def call(*args, **kwargs):
        warnings.warn(f"{old} is renamed {function.__qualname__}; the old name will be removed", DeprecationWarning,
                      stacklevel=2)  # fmt: skip
        return function(*args, **kwargs)

    return call
