"""The heal job behind ``layerfold heal``: its settings are the run's ``HealConfig`` and where it reads and writes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..core.settings import setting
from ..core.texts import single_source
from ..heal import HealConfig, heal, heal_streamed
from .settings import MIX_HELP, ORIGINAL, Output


@dataclass(kw_only=True)
class HealSettings:
    """Heal a folded model by distillation from its original (HF Trainer; runs under accelerate launch)."""

    model: Path = setting(..., argument=True, help="A folded model (layerfold checkpoint).")
    teacher: Path = setting(..., help=ORIGINAL)
    data: Optional[list[Path]] = setting(..., help="Text, .jsonl, STS-B file, or a datasets folder (save_to_disk)."
                                         + MIX_HELP)  # fmt: skip
    config: HealConfig = field(default_factory=HealConfig)
    stream: bool = setting(False, help="Block-wise heal from the checkpoints' shards, one unit in memory (--stage "
                           "blockwise).")  # fmt: skip
    resume: bool = setting(False, help="Continue from the last checkpoint in OUT.checkpoints.")
    keep_checkpoints: bool = setting(False, help="Keep OUT.checkpoints at the end.")
    output: Output = field(default_factory=Output)


def run_heal(settings: HealSettings):
    """``layerfold heal``: ``heal`` or, with ``stream``, ``heal_streamed``."""
    s = settings
    job = heal_streamed if s.stream else heal
    return job(s.model, s.teacher, single_source(s.data), s.output.out, s.config, resume=s.resume,
               overwrite=s.output.overwrite, keep_checkpoints=s.keep_checkpoints)  # fmt: skip
