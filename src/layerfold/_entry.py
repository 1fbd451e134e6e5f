"""The ``layerfold`` console command. Kept apart from ``cli`` so that a Ctrl-C while the command starts (typer,
and later torch, are slow to import) ends with one line and exit code 130, like one at any later time."""

from __future__ import annotations

import sys


def main() -> int:
    try:
        from .cli import main as run
    except KeyboardInterrupt:
        print("layerfold: interrupted", file=sys.stderr)
        return 130
    return run()
