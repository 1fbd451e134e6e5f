"""Folding methods, one file each; importing this package registers them all (``methods.registry``). A new
method is a file here and one line below. The order is the benchmark sweep's, and within each kind of candidate
(``registry.CANDIDATE_KINDS``) the order the planner tries them in."""

from . import original, drop_first, drop_lowest, drop_even  # noqa: F401, I001 (sweep order)
from . import tie_cycle, tie_sequence, tie_similar, foldgpt, delta  # noqa: F401, I001
from . import basis, svd, shortgpt, laco, prune  # noqa: F401, I001
