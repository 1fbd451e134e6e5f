"""layerfold: make pretrained transformers smaller by sharing parameters across layers.

The public names load on first use, so that ``import layerfold.cli`` (the command's start-up) does not import
torch and transformers before the command can catch a Ctrl-C.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "FoldPlan": ".plan",
    "LayerfoldError": ".errors",
    "export": ".io",
    "fold": ".folding",
    "load": ".io",
    "load_source": ".io",
    "load_tokenizer": ".io",
    "materialize": ".io",
    "parameter_breakdown": ".report",
    "save": ".io",
    "unique_parameters": ".report",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str):
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            value = version("layerfold")
        except PackageNotFoundError:  # running from a source tree
            value = "0.0.0"
    elif name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    else:
        raise AttributeError(f"module 'layerfold' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
