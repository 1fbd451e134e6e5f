"""The ``layerfold`` console command. Kept apart from ``cli`` so that a Ctrl-C while the command starts ends
with one line and exit code 130, like one at any later time.

Start-up imports torch, transformers, numpy and scipy, which take seconds here. A KeyboardInterrupt raised in the
middle of one of those imports leaves half-built modules that the libraries then trip over (a RecursionError in
numpy's ``__getattr__``, death by SIGINT at shutdown). So while the libraries load, Ctrl-C ends the process at
once (nothing has been written yet); once they are loaded it raises KeyboardInterrupt as usual, so that a
command unwinds and removes its temporary output before it exits.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys

INTERRUPTED = 130
# What the commands import lazily; loaded up front (except for --help) under the start-up handler. Trainer only
# for the commands that train.
PRELOAD = ("torch", "transformers", "layerfold.api")
TRAINING = ("layerfold.compress", "layerfold.heal", "transformers.trainer")
TRAINING_COMMANDS = ("heal", "analyze", "plan", "compress", "demo")


def _interrupted_while_starting(signum, frame) -> None:
    os.write(2, b"layerfold: interrupted\n")
    os._exit(INTERRUPTED)


def _runs_a_command(args: list[str]) -> bool:
    return bool(args) and not any(a in ("--help", "-h", "--version") for a in args)


def main() -> int:
    signal.signal(signal.SIGINT, _interrupted_while_starting)
    try:
        from .cli import main as run

        args = sys.argv[1:]
        if _runs_a_command(args):
            trains = next((a for a in args if not a.startswith("-")), None) in TRAINING_COMMANDS
            for name in PRELOAD + (TRAINING if trains else ()):
                importlib.import_module(name)
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        code = run()
    except KeyboardInterrupt:
        print("layerfold: interrupted", file=sys.stderr)
        code = INTERRUPTED
    if code == INTERRUPTED:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(INTERRUPTED)  # skip the interpreter's shutdown, for the reason above
    return code
