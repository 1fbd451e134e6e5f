"""Folding a model: in memory (``in_memory.fold``, a loaded model folded in place) or streamed from a checkpoint
larger than memory, a few tensors at a time (``streamed.stream_fold``); both run the engine."""

from .in_memory import fold

__all__ = ["fold"]
