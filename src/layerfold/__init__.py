"""layerfold: make pretrained transformers smaller by sharing parameters across layers."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("layerfold")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"

from .errors import LayerfoldError  # noqa: E402
from .fold import fold  # noqa: E402
from .io import export, load, load_source, materialize, save  # noqa: E402
from .plan import FoldPlan  # noqa: E402
from .report import parameter_breakdown, unique_parameters  # noqa: E402

__all__ = [
    "FoldPlan",
    "LayerfoldError",
    "__version__",
    "export",
    "fold",
    "load",
    "load_source",
    "materialize",
    "parameter_breakdown",
    "save",
    "unique_parameters",
]
