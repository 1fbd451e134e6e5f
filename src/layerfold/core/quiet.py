"""A quiet run (``layerfold --quiet``): no progress bars, notes or library warnings on stderr; errors still show
(the caller prints them after the run)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator


class _Discard:
    """stderr while quiet: nothing is written."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


@contextlib.contextmanager
def quietly(quiet: bool = True) -> Iterator[None]:
    """Within: sys.stderr discarded, and the libraries' progress bars and warnings off (those write to the real
    stderr, not sys.stderr)."""
    if not quiet:
        yield
        return
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    if "transformers" in sys.modules:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    with contextlib.redirect_stderr(_Discard()):
        yield
