"""Folding methods, one file each; importing this package registers them all (``methods.registry``). A new
method is a file here and one line below."""

from . import original, drop_first, drop_even, tie, basis, svd, shortgpt, laco  # noqa: F401, I001 (sweep order)
