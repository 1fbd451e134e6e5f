"""Block-wise healing: train each folded unit to reproduce the original's outputs on cached calibration inputs.

A unit is one folded layer, or the smallest window of consecutive layers that reads one shared tensor (a tie
group's projection, a shared basis) when that tensor trains: its members train together, since each of them
moves the shared tensor. Each unit's inputs are the folded model's own hidden states (the units before it
already healed), its targets the original's hidden states at the layers it stands in for (after a drop, the
output of the last layer dropped before the next kept one). The loss is the relative squared error
‖y − y*‖² / ‖y*‖² at each member's output, over the tokens (padding excluded), averaged over members; for a
decoder, ``--block-kl W`` adds W × the KL divergence of the next-token distributions read through the final norm
and head at the last layer's output (the head itself does not train here).

Only one unit and one original block need to be in memory, with the calibration hidden states: so the stage
streams from sharded checkpoints (``stream.py``: the ``Blocks`` hooks load a block before it runs and unload
it after), and a window whose shared tensor does not fit ``unit_memory`` is trained one layer at a time with
the shared tensor frozen (the report says so).

After a unit trains, its loss on held-out windows is measured again; a unit whose held-out loss did not drop
keeps its weights from before (a block fitted to a few thousand tokens can learn them instead of its job).
Each finished unit is written to the checkpoint folder, so a killed run resumes at the next unit.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..engine.calibrate import BlockWalk, _first
from ..core.errors import LayerfoldError
from ..core.families import family_of
from ..operations.base import FoldedProjection
from ..core.store import fold_state
from .losses import head_kl

BLOCKWISE_FOLDER = "blockwise"
UNITS_FILE = "units.json"
# Weights, gradients and AdamW's two moments of a trained float32 parameter; a frozen one is its weights only.
TRAINED_BYTES, FROZEN_BYTES = 16, 4


@dataclass
class Unit:
    """Folded layer positions trained together, the store modules they read, and whether those train here."""

    positions: list[int]
    shared: list[nn.Module] = field(default_factory=list, repr=False)
    shared_trains: bool = False
    note: str = ""  # why a shared tensor is frozen here, if it is


@dataclass
class UnitResult:
    positions: list[int]
    trainable: int
    shared: str  # "trained", "frozen (…)" or "none"
    held_out_before: float
    held_out_after: float
    kept: str  # "trained" or "before" (the held-out loss did not drop)
    seconds: float
    tokens: int = 0  # training tokens through the unit (steps × tokens per step)
    resumed: bool = False


class Blocks:
    """Where block weights come from. In memory they are always there; a streamed heal overrides these to load
    a block from its checkpoint before it runs and to write and unload it afterwards."""

    def open_teacher(self, i: int) -> None: ...

    def close_teacher(self, i: int) -> None: ...

    def open_unit(self, unit: Unit) -> None: ...

    def close_unit(self, unit: Unit) -> None: ...


def _store_modules(block: nn.Module) -> list[nn.Module]:
    found: dict[int, nn.Module] = {}
    for module in block.modules():
        if isinstance(module, FoldedProjection):
            for shared in module.shared_modules():
                found.setdefault(id(shared), shared)
    return list(found.values())


def _bytes(modules: Sequence[nn.Module], trains: bool | None = None) -> int:
    """Training memory of the modules' parameters: as they are set (``trains`` None) or all trained/frozen."""
    total = 0
    for module in modules:
        for p in module.parameters():
            trained = p.requires_grad if trains is None else trains
            total += p.numel() * (TRAINED_BYTES if trained else FROZEN_BYTES)
    return total


def plan_units(student: nn.Module, unit_memory: int) -> list[Unit]:
    """The units of a folded model in order (see the module docstring); ``unit_memory`` bytes bound a unit's
    weights, gradients and optimizer state."""
    layers = family_of(student).layer_list(student)
    reads = [_store_modules(block) for block in layers]
    trains = {id(m): any(p.requires_grad for p in m.parameters()) for r in reads for m in r}
    # Each trained shared module spans the positions that read it; overlapping spans make one window.
    spans: dict[int, list[int]] = {}
    for position, modules in enumerate(reads):
        for m in modules:
            if trains[id(m)]:
                spans.setdefault(id(m), []).append(position)
    end = list(range(len(layers)))  # end[p]: the last position of the window that starts at or covers p
    for positions in spans.values():
        for p in range(min(positions), max(positions) + 1):
            end[p] = max(end[p], max(positions))
    units, start = [], 0
    while start < len(layers):
        stop, p = end[start], start
        while p <= stop:  # a window grows while a member's own span reaches further
            stop, p = max(stop, end[p]), p + 1
        positions = list(range(start, stop + 1))
        shared = list({id(m): m for p in positions for m in reads[p]}.values())
        trained_shared = [m for m in shared if trains[id(m)]]
        need = _bytes([layers[p] for p in positions]) + _bytes(shared)
        if len(positions) > 1 and need > unit_memory:
            note = (f"shared tensors of layers {positions[0]}–{positions[-1]} frozen in this stage: training them "
                    f"together needs {_size(need)}, more than --unit-memory {_size(unit_memory)}")  # fmt: skip
            units += [Unit([p], reads[p], False, note) for p in positions]
        else:
            units.append(Unit(positions, shared, bool(trained_shared)))
        start = stop + 1
    for unit in units:
        frozen_shared = [] if unit.shared_trains else unit.shared
        need = _bytes([layers[p] for p in unit.positions]) + _bytes(frozen_shared, trains=False)
        need += _bytes(unit.shared) if unit.shared_trains else 0
        if need > unit_memory:
            raise LayerfoldError(
                f"block-wise heal: folded layer {unit.positions[0]} needs {_size(need)} to train (weights, "
                f"gradients, optimizer state), more than --unit-memory {_size(unit_memory)}"
            )
    return units


def _size(n: int) -> str:
    for unit, scale in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} bytes"


def _unit_parameters(layers: Sequence[nn.Module], unit: Unit) -> list[nn.Parameter]:
    params = {id(p): p for i in unit.positions for p in layers[i].parameters() if p.requires_grad}
    if unit.shared_trains:
        params.update({id(p): p for m in unit.shared for p in m.parameters() if p.requires_grad})
    return list(params.values())


def target_layers(plan) -> list[int]:
    """For each folded position, the original layer whose output it is trained to reproduce: the one just
    before the next kept layer (so a dropped or merged layer's work falls to the layer before it), the last
    layer for the last position."""
    kept = plan.kept_layers()
    return [kept[p + 1] - 1 if p + 1 < len(kept) else plan.num_layers - 1 for p in range(len(kept))]


def relative_error(output: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """‖y − y*‖² / ‖y*‖² over the unpadded tokens."""
    keep = mask.bool()
    diff = (output.float() - target.float())[keep]
    return diff.square().sum() / target.float()[keep].square().sum().clamp(min=1e-12)


@dataclass
class BlockwiseSettings:
    steps: int
    lr: float
    warmup: float
    seed: int
    unit_memory: int
    head_kl: float = 0.0  # weight of KL through the head (``losses.head_kl``) at the last layer's output


def heal_blocks(
    student: nn.Module,
    teacher: nn.Module,
    train_batches: list[dict],
    held_batches: list[dict],
    settings: BlockwiseSettings,
    *,
    units: list[Unit] | None = None,
    blocks: Blocks | None = None,
    checkpoints: Path | None = None,
    progress: bool = True,
) -> list[UnitResult]:
    """Heal ``student`` (a folded model, its parameters' ``requires_grad`` set by what trains) unit by unit
    against ``teacher`` (its original) on the batches; results per unit. With ``checkpoints``, each finished
    unit is saved there and a later call with the same folder skips the units already done.

    Over 80 lines: the per-unit loop (walk the teacher, open the unit, train it, close it, checkpoint it) shares
    its state between steps, and reads in one place."""
    from transformers import get_cosine_schedule_with_warmup

    blocks = blocks or Blocks()
    plan = fold_state(student).plan
    units = units if units is not None else plan_units(student, settings.unit_memory)
    layers = family_of(student).layer_list(student)
    teacher.eval(), student.eval()  # no dropout: the walk's and the training's outputs must be the same function
    batches = list(train_batches) + list(held_batches)
    train_ids = list(range(len(train_batches)))
    held_ids = list(range(len(train_batches), len(batches)))
    student_walk, teacher_walk = BlockWalk(student, batches), BlockWalk(teacher, batches)
    targets_of = target_layers(plan)
    last = len(layers) - 1
    done = _done_units(checkpoints)
    results: list[UnitResult] = []
    walked = -1
    total = sum(settings.steps for u in units if _key(u) not in done)
    bar = tqdm(total=total, desc="block-wise heal", unit="step", disable=not progress)
    try:
        for unit in units:
            started = time.perf_counter()
            targets = []
            for p in unit.positions:
                while walked < targets_of[p]:
                    walked += 1
                    blocks.open_teacher(walked)
                    teacher_walk.measure(walked)
                    blocks.close_teacher(walked)
                targets.append(list(teacher_walk.hidden))
            blocks.open_unit(unit)
            calls = [student_walk.calls(p) for p in unit.positions]

            def loss_of(b: int) -> torch.Tensor:
                args, kwargs = calls[0][b]
                hidden = args[0] if args else kwargs["hidden_states"]
                mask = batches[b]["attention_mask"]
                total_loss = 0.0
                for k, p in enumerate(unit.positions):
                    args, kwargs = calls[k][b]
                    args, kwargs = ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})
                    hidden = _first(layers[p](*args, **kwargs))
                    total_loss = total_loss + relative_error(hidden, targets[k][b], mask)
                    if p == last and settings.head_kl:
                        total_loss = total_loss + settings.head_kl * head_kl(student, hidden, targets[k][b], mask)
                return total_loss / len(unit.positions)

            @torch.no_grad()
            def held_out_loss() -> float:
                ids = held_ids or train_ids
                return float(sum(loss_of(b) for b in ids) / len(ids))

            params = _unit_parameters(layers, unit)
            if unit.note:
                tqdm.write(f"layerfold: {unit.note}")
            key = _key(unit)
            if key in done:
                _load_unit(student, checkpoints, done[key])
                result = UnitResult(**{**done[key]["result"], "resumed": True})
            else:
                before = held_out_loss()
                saved = [p.detach().clone() for p in params]
                with _frozen(unit):
                    if params:
                        optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
                        schedule = get_cosine_schedule_with_warmup(
                            optimizer, int(settings.warmup * settings.steps), settings.steps
                        )
                        generator = torch.Generator().manual_seed(settings.seed + unit.positions[0])
                        order: list[int] = []
                        seen = 0
                        for _ in range(settings.steps):
                            if not order:
                                order = torch.randperm(len(train_ids), generator=generator).tolist()
                            b = train_ids[order.pop()]
                            seen += int(batches[b]["attention_mask"].sum())
                            with torch.enable_grad():
                                loss = loss_of(b)
                                loss.backward()
                            optimizer.step()
                            schedule.step()
                            optimizer.zero_grad(set_to_none=True)
                            bar.update(1)
                            bar.set_postfix(unit=_label(unit), loss=f"{loss.item():.3g}", refresh=False)
                        del optimizer
                    else:
                        seen = 0
                        bar.update(settings.steps)
                after = held_out_loss()
                kept = "trained"
                if not after < before:
                    kept = "before"
                    with torch.no_grad():
                        for p, value in zip(params, saved):
                            p.copy_(value)
                    after = before
                del saved
                result = UnitResult(
                    positions=unit.positions,
                    trainable=sum(p.numel() for p in params),
                    shared="trained" if unit.shared_trains else ("frozen" if unit.shared else "none"),
                    held_out_before=before,
                    held_out_after=after,
                    kept=kept,
                    seconds=round(time.perf_counter() - started, 2),
                    tokens=seen,
                )
                if checkpoints is not None:
                    ids = {id(p) for p in params}
                    trained = {n: p for n, p in student.named_parameters() if id(p) in ids}
                    _save_unit(checkpoints, key, trained, result)
            results.append(result)
            with torch.no_grad():
                for p in unit.positions:  # carry the folded hidden states through the healed unit
                    student_walk.measure(p)
            del calls, targets
            blocks.close_unit(unit)
    finally:
        bar.close()
    return results


class _frozen:
    """Shared tensors a unit reads but does not train (a window too large for memory) stay frozen during it."""

    def __init__(self, unit: Unit) -> None:
        self.params = [] if unit.shared_trains else [p for m in unit.shared for p in m.parameters() if p.requires_grad]

    def __enter__(self):
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc):
        for p in self.params:
            p.requires_grad_(True)


def _key(unit: Unit) -> str:
    return f"unit-{unit.positions[0]:04d}-{unit.positions[-1]:04d}"


def _label(unit: Unit) -> str:
    first, last = unit.positions[0], unit.positions[-1]
    return str(first) if first == last else f"{first}–{last}"


def _done_units(checkpoints: Path | None) -> dict[str, dict]:
    """The units a killed run finished (their record and tensors on disk)."""
    if checkpoints is None:
        return {}
    index = checkpoints / BLOCKWISE_FOLDER / UNITS_FILE
    if not index.is_file():
        return {}
    try:
        records = json.loads(index.read_text())
    except json.JSONDecodeError:
        return {}
    return {k: v for k, v in records.items() if (checkpoints / BLOCKWISE_FOLDER / v["file"]).is_file()}


def _save_unit(checkpoints: Path, key: str, tensors: dict[str, torch.Tensor], result: UnitResult) -> None:
    """The unit's trained tensors, then its record: each written to a temporary name and renamed, so a killed run
    leaves either a whole unit or none."""
    folder = checkpoints / BLOCKWISE_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    file = f"{key}.safetensors"
    save_file({n: t.detach().contiguous().clone() for n, t in tensors.items()}, str(folder / f"{file}.tmp"))
    os.replace(folder / f"{file}.tmp", folder / file)
    index = folder / UNITS_FILE
    records = json.loads(index.read_text()) if index.is_file() else {}
    records[key] = {"file": file, "result": asdict(result)}
    (folder / f"{UNITS_FILE}.tmp").write_text(json.dumps(records, indent=1))
    os.replace(folder / f"{UNITS_FILE}.tmp", index)


def _load_unit(student: nn.Module, checkpoints: Path, record: dict) -> None:
    tensors = load_file(str(checkpoints / BLOCKWISE_FOLDER / record["file"]))
    parameters = dict(student.named_parameters())
    with torch.no_grad():
        for name, value in tensors.items():
            parameters[name].copy_(value)


def block_batches(examples: list[torch.Tensor], size: int) -> list[dict]:
    """Token examples (windows or sentences) padded into batches of ``size``."""
    batches = []
    for start in range(0, len(examples), size):
        group = examples[start : start + size]
        width = max(e.numel() for e in group)
        ids = torch.zeros(len(group), width, dtype=torch.long)
        mask = torch.zeros(len(group), width, dtype=torch.long)
        for row, e in enumerate(group):
            ids[row, : e.numel()], mask[row, : e.numel()] = e, 1
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def blockwise_results(checkpoints: Path) -> list[UnitResult]:
    """The results of a finished block-wise stage, from its checkpoint folder (for a run resumed after it)."""
    return [UnitResult(**r["result"]) for _, r in sorted(_done_units(checkpoints).items())]


def summary(results: list[UnitResult]) -> dict:
    """What the report says about the stage."""
    trained = [r for r in results if r.kept == "trained"]
    return {
        "units": len(results),
        "units_improved": len(trained),
        "held_out_before": sum(r.held_out_before for r in results) / max(1, len(results)),
        "held_out_after": sum(r.held_out_after for r in results) / max(1, len(results)),
        "seconds": round(sum(r.seconds for r in results), 2),
        "tokens": sum(r.tokens for r in results),
        "frozen_shared_at": [r.positions[0] for r in results if r.shared == "frozen"],
        "per_unit": [asdict(r) for r in results],
    }

