"""layerfold: make pretrained transformers smaller by sharing parameters across layers.

``import layerfold`` registers folded checkpoints with transformers' Auto classes (``layerfold.checkpoints.auto_classes``), so that
``AutoModelForCausalLM.from_pretrained(folded_dir)`` works with no ``trust_remote_code``. The ``layerfold``
command skips that (it loads folds itself) and the public names load on first use, so that the command's start-up
does not import torch and transformers before it can catch a Ctrl-C.
"""

from __future__ import annotations

import importlib
import os
import sys

_EXPORTS = {
    "FoldPlan": ".operations.plan",
    "LayerfoldError": ".core.errors",
    "export": ".checkpoints.folded",
    "register": ".checkpoints.auto_classes",  # deprecated: register_auto_classes
    "register_auto_classes": ".checkpoints.auto_classes",
    "fold": ".folding.in_memory",
    "load": ".checkpoints.folded",
    "load_source": ".checkpoints.folded",
    "load_tokenizer": ".checkpoints.folded",
    "materialize": ".checkpoints.folded",
    "parameter_breakdown": ".core.report",
    "save": ".checkpoints.folded",
    "unique_parameters": ".core.report",
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


def _started_as_the_command() -> bool:
    """True while the ``layerfold`` console script or ``python -m layerfold`` imports the package (``-m`` is
    ``sys.argv[0]`` while Python looks for the module to run)."""
    started = os.path.basename(sys.argv[0]) if sys.argv else ""
    return started in ("layerfold", "layerfold.exe", "-m")


if not _started_as_the_command():
    from .checkpoints import auto_classes as _hub  # noqa: F401 (registers with transformers)
