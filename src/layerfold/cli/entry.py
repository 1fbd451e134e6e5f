"""The ``layerfold`` console command. Kept apart from ``cli`` so that a Ctrl-C while the command starts ends
with one line and exit code 130, like one at any later time; SIGTERM (``kill``, a job scheduler's stop) is handled
the same way, with exit code 143.

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
TERMINATED = 143
_terminated = False
# What the commands import lazily; loaded up front (except for --help) under the start-up handler. Trainer only
# for the commands that train.
PRELOAD = ("torch", "transformers", "layerfold.jobs.fold")
TRAINING = ("layerfold.jobs.compress", "layerfold.heal", "transformers.trainer")
TRAINING_COMMANDS = ("heal", "analyze", "plan", "compress", "demo")


def _stopped_while_starting(signum, frame) -> None:
    word = b"terminated" if signum == signal.SIGTERM else b"interrupted"
    os.write(2, b"layerfold: " + word + b"\n")
    os._exit(TERMINATED if signum == signal.SIGTERM else INTERRUPTED)


def _terminate(signum, frame) -> None:
    """SIGTERM once started: unwind like Ctrl-C, so that temporary output is removed."""
    global _terminated
    _terminated = True
    raise KeyboardInterrupt


def stop() -> tuple[str, int]:
    """The line and exit code of a run stopped by a signal: Ctrl-C or SIGTERM."""
    return ("layerfold: terminated", TERMINATED) if _terminated else ("layerfold: interrupted", INTERRUPTED)


def _runs_a_command(args: list[str]) -> bool:
    return bool(args) and not any(a in ("--help", "-h", "--version") for a in args)


def main() -> int:
    signal.signal(signal.SIGINT, _stopped_while_starting)
    signal.signal(signal.SIGTERM, _stopped_while_starting)
    try:
        from .commands import main as run

        args = sys.argv[1:]
        if _runs_a_command(args):
            trains = next((a for a in args if not a.startswith("-")), None) in TRAINING_COMMANDS
            for name in PRELOAD + (TRAINING if trains else ()):
                importlib.import_module(name)
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, _terminate)
    try:
        code = run()
    except KeyboardInterrupt:
        line, code = stop()
        print(line, file=sys.stderr)
    if code in (INTERRUPTED, TERMINATED):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # skip the interpreter's shutdown, for the reason above
    return code
