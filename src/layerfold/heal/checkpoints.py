"""Heal checkpoint folders: finding the last complete one, resuming, and never deleting a user's files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..core.errors import LayerfoldError
from ..checkpoints.folded import check_checkpoint
from .settings import CHECKPOINT_PREFIX, SETTINGS_NAME


def checkpoint_dir_for(out: Path) -> Path:
    return out.parent / f"{out.name}.checkpoints"


def last_complete_checkpoint(folder: Path, *, clean: bool = True) -> Path | None:
    """The newest checkpoint whose trainer state was written (the last file Trainer writes); ``clean`` removes
    the partial ones a killed run left."""
    if not folder.is_dir():
        return None
    found = [
        p
        for p in folder.iterdir()
        if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and p.name[len(CHECKPOINT_PREFIX) :].isdigit()
    ]
    complete = [p for p in found if (p / "trainer_state.json").is_file()]
    for partial in set(found) - set(complete) if clean else ():  # a run killed while writing one
        shutil.rmtree(partial, ignore_errors=True)
    return max(complete, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]), default=None)


def check_checkpoint_folder(folder: Path) -> None:
    """OUT.checkpoints is removed by --overwrite: it may only hold an earlier heal run's checkpoints."""
    if folder.exists() and not (folder.is_dir() and ((folder / SETTINGS_NAME).is_file() or not any(folder.iterdir()))):
        raise LayerfoldError(f"{folder} is where this run keeps its checkpoints, but it holds something else; move it away")


def prepare_checkpoints(folder: Path, settings: dict, *, resume: bool, overwrite: bool, is_main: bool) -> Path | None:
    settings_file = folder / SETTINGS_NAME
    if not is_main:
        # The main process checks, clears and creates the folder (the others would see it appear and refuse).
        return last_complete_checkpoint(folder, clean=False) if resume else None
    check_checkpoint_folder(folder)
    if folder.exists() and not resume:
        if not overwrite:
            raise LayerfoldError(
                f"checkpoints of an earlier heal run are in {folder}: pass --resume to continue it "
                "or --overwrite to start over"
            )
        shutil.rmtree(folder)
    start = None
    if resume and folder.exists():
        if settings_file.is_file():
            before = json.loads(settings_file.read_text())
            changed = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
            if changed:
                raise LayerfoldError(
                    f"--resume: the checkpoints in {folder} were made with other settings ({', '.join(changed)}); "
                    "use the same command, or --overwrite to start over"
                )
        start = last_complete_checkpoint(folder)
    if start is None and resume:
        print(f"layerfold: no complete checkpoint in {folder}; starting from the beginning")
    folder.mkdir(parents=True, exist_ok=True)
    settings_file.write_text(json.dumps(settings, indent=2, default=str) + "\n")
    return start


def check_resumable(checkpoint: Path) -> None:
    """A checkpoint to resume from must be whole: a sound folded checkpoint (its headers checked against the files;
    Trainer reads the weights themselves right after) and a readable trainer state."""

    try:
        check_checkpoint(checkpoint)
        state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
        if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
            raise ValueError("trainer_state.json has no global_step")
    except (LayerfoldError, OSError, ValueError) as err:
        raise LayerfoldError(
            f"--resume: the checkpoint {checkpoint} is damaged ({err}); pass --overwrite to start over"
        ) from None
