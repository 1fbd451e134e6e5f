"""layerfold: make pretrained transformers smaller by sharing parameters across layers.

``import layerfold`` registers folded checkpoints with transformers' Auto classes (``layerfold.checkpoints.auto_classes``), so that
``AutoModelForCausalLM.from_pretrained(folded_dir)`` works with no ``trust_remote_code``. The ``layerfold``
command skips that (it loads folds itself) and the public names load on first use, so that the command's start-up
does not import torch and transformers before it can catch a Ctrl-C.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import os
import sys
import warnings

# The public names: the jobs (one per command; ``layerfold.heal`` is the heal package, which is callable), and
# the in-memory API the README shows.
_EXPORTS = {
    "FoldPlan": (".operations.plan", "FoldPlan"),
    "LayerfoldError": (".core.errors", "LayerfoldError"),
    "analyze": (".jobs.compress", "analyze_model_dir"),
    "compress": (".jobs.compress", "compress_model_dir"),
    "evaluate": (".jobs.evaluate", "evaluate_path"),
    "export": (".checkpoints.folded", "export"),
    "fold": (".jobs.fold", "fold"),
    "heal": (".heal", None),
    "info": (".jobs.info", "checkpoint_info"),
    "load": (".checkpoints.folded", "load"),
    "load_source": (".checkpoints.folded", "load_source"),
    "load_tokenizer": (".checkpoints.folded", "load_tokenizer"),
    "materialize": (".checkpoints.folded", "materialize"),
    "parameter_breakdown": (".core.report", "parameter_breakdown"),
    "plan": (".jobs.compress", "plan_model_dir"),
    "register": (".checkpoints.auto_classes", "register"),  # deprecated: register_auto_classes
    "register_auto_classes": (".checkpoints.auto_classes", "register_auto_classes"),
    "save": (".checkpoints.folded", "save"),
    "unique_parameters": (".core.report", "unique_parameters"),
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
        module, attribute = _EXPORTS[name]
        value = importlib.import_module(module, __name__)
        value = getattr(value, attribute) if attribute else value
    else:
        raise AttributeError(f"module 'layerfold' has no attribute {name!r}")
    globals()[name] = value
    return value


# Modules that moved when the package became a folder per layer (layerfold 0.3): the old import paths still work,
# with a DeprecationWarning, except where the old name is now a job (``plan``, ``evaluate``, ``compress``).
MOVED = {
    "adapters": "checkpoints.adapters", "api": "jobs.fold", "budget": "core.budget", "calibrate": "engine.calibrate",
    "checkpoint": "core.tensor_files", "data": "core.texts", "demo": "jobs.demo", "errors": "core.errors",
    "eval_tasks": "evaluation.tasks", "families": "core.families", "gates": "analysis.gates",
    "hub": "checkpoints.auto_classes", "io": "checkpoints.folded", "lm_eval_tasks": "evaluation.lm_eval_tasks",
    "modelcard": "checkpoints.modelcard", "outputs": "checkpoints.output_guard", "planner": "methods.planner",
    "progress": "core.progress", "report": "core.report", "sequential": "engine.sequential",
    "sources": "checkpoints.originals", "store": "core.store", "stream": "folding.streamed",
}  # fmt: skip


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``import layerfold.io`` gives ``layerfold.checkpoints.folded`` itself (one module object, so that patching
    either name patches both), with a DeprecationWarning naming the new path."""

    def find_spec(self, fullname, path=None, target=None):
        old = fullname.partition("layerfold.")[2]
        if fullname.startswith("layerfold.") and old in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        new = f"layerfold.{MOVED[spec.name.partition('layerfold.')[2]]}"
        warnings.warn(f"{spec.name} is now {new}", DeprecationWarning, stacklevel=3)
        return importlib.import_module(new)

    def exec_module(self, module) -> None:
        pass


sys.meta_path.append(_MovedModules())


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def _started_as_the_command() -> bool:
    """True while the ``layerfold`` console script or ``python -m layerfold`` imports the package (``-m`` is
    ``sys.argv[0]`` while Python looks for the module to run)."""
    started = os.path.basename(sys.argv[0]) if sys.argv else ""
    return started in ("layerfold", "layerfold.exe", "-m")


if not _started_as_the_command():
    from .checkpoints import auto_classes as _hub  # noqa: F401 (registers with transformers)
