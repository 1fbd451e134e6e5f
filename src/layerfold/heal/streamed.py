"""Block-wise healing from sharded checkpoints, one unit in memory (``layerfold heal --stage blockwise --stream``).

The folded model and its original are built on the meta device (``io.skeleton``, ``stream``'s skeletons); the
embeddings of both are loaded for the calibration walks, then ``StreamedBlocks`` loads each original block
before the walk passes it and each unit (its folded layers and the shared tensors it reads) before it trains,
writes the unit's tensors into the output shards as it finishes, and unloads it. Tensors no unit trained (the
embeddings, the head, shared tensors frozen in this stage) are copied from the folded checkpoint at the end. The
computation is ``blockwise.heal_blocks``'s, which is why a streamed heal equals the in-memory one.
"""

from __future__ import annotations

import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..core.tensor_files import TORCH_DTYPES, ShardWriter, SourceCheckpoint, read_metadata
from ..core.texts import DataSource, describe_source
from ..engine.execute import Originals, layer_prefixes
from ..core.errors import LayerfoldError
from ..core.families import family_of
from ..checkpoints.folded import load_tokenizer, skeleton
from ..checkpoints.output_guard import atomic_output_dir
from ..operations.plan import FoldPlan
from ..core.report import Report, markdown_table
from ..checkpoints.originals import source_config
from ..core.store import fold_state
from ..folding.streamed import _build, _materialize_embeddings, _Resolver
from .blockwise import Blocks, BlockwiseSettings, Unit, block_batches, heal_blocks, plan_units, summary
from .checkpoints import prepare_checkpoints
from .data import prepare_data
from .job import _checked_arguments
from .settings import REPORT_JSON, REPORT_MD, HealConfig
from .trainable import select_trainable


class StreamedBlocks(Blocks):
    """Loads original blocks and folded units from their checkpoints as the walk reaches them (float32, for
    training), writes each finished unit to ``writer`` in the folded checkpoint's dtypes, and unloads it."""

    def __init__(self, student, student_checkpoint, aliases, teacher, teacher_originals, writer, train, norms):
        self.student, self.teacher = student, teacher
        self.student_checkpoint, self.aliases = student_checkpoint, aliases
        self.teacher_originals = teacher_originals
        self.writer, self.train, self.norms = writer, train, norms
        family = family_of(student)
        self.student_layers = family.layer_list(student)
        self.teacher_layers = family_of(teacher).layer_list(teacher)
        self.student_prefix = layer_prefixes(student, family)
        self.module_name = {id(m): n for n, m in student.named_modules()}
        self.written: set[str] = set()

    def open_teacher(self, i: int) -> None:
        block = self.teacher_layers[i]
        values = self.teacher_originals.read([(i, name) for name in block.state_dict()], merged=False)
        block.load_state_dict({n: v.float() for (_, n), v in values.items()}, assign=True)

    def close_teacher(self, i: int) -> None:
        self.teacher_layers[i].to("meta")

    def _modules(self, unit: Unit) -> dict[str, nn.Module]:
        modules = {self.student_prefix[p].rstrip(".") + ".": self.student_layers[p] for p in unit.positions}
        modules.update({self.module_name[id(m)] + ".": m for m in unit.shared})
        return modules

    def open_unit(self, unit: Unit) -> None:
        for prefix, module in self._modules(unit).items():
            names = {prefix + n: n for n in module.state_dict()}
            values = self.student_checkpoint.read(self.aliases.get(full, full) for full in names)
            state = {n: values[self.aliases.get(full, full)].float() for full, n in names.items()}
            module.load_state_dict(state, assign=True)
        # What trains, as --train says: set on the loaded parameters (the meta ones are gone).
        select_trainable(self.student, self.train, self.norms)

    def close_unit(self, unit: Unit) -> None:
        modules = self._modules(unit)
        for prefix, module in modules.items():
            frozen_shared = module in unit.shared and not unit.shared_trains
            for n, value in module.state_dict().items():
                full = prefix + n
                if full in self.aliases or full in self.written or frozen_shared:
                    continue  # an alias is written under its tensor's name; a frozen shared tensor at the end
                self.writer.add(full, value.to(self.writer.place[full][3]))
                self.written.add(full)
        for prefix, module in modules.items():
            module.to("meta")

    def finish(self) -> None:
        """Copy what no unit wrote (embeddings, head, frozen shared tensors), a tensor at a time."""
        for name in self.writer.place:
            if name not in self.written:
                self.writer.add(name, self.student_checkpoint.read([name])[name])
                self.written.add(name)


def heal_streamed(
    student_dir: str | Path,
    teacher_path: str | Path,
    data: DataSource,
    out: str | Path,
    config: HealConfig | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    keep_checkpoints: bool = False,
    progress: bool = True,
) -> "StreamedHealReport":
    """Block-wise heal of the folded checkpoint ``student_dir`` against the original checkpoint folder
    ``teacher_path`` without loading either whole (see the module docstring); written to ``out`` atomically.

    Over 80 lines: the job's steps in order (checks, data, the streamed blocks, the units, the report), each a
    call into the modules below."""
    started = time.perf_counter()
    student_dir, teacher_path, out = Path(student_dir), Path(teacher_path), Path(out)
    config = config or HealConfig(stage="blockwise")
    if config.stage != "blockwise":
        raise LayerfoldError(
            f"--stream heals block-wise only (--stage blockwise); --stage {config.stage} distils through the whole "
            "model, which needs it in memory"
        )
    if teacher_path.exists() and not teacher_path.is_dir():
        raise LayerfoldError(f"--stream reads the teacher's checkpoint folder; {teacher_path} is a file")
    config, checkpoints, _ = _checked_arguments(student_dir, teacher_path, data, out, config, overwrite)
    student, checked = skeleton(student_dir)
    if checked.renamed:
        raise LayerfoldError(f"{student_dir} is a format-1 checkpoint: load and save it once (layerfold.save) to stream it")
    teacher_config, teacher_class = source_config(teacher_path)
    teacher = _build(teacher_class, teacher_config, torch.float32)
    if type(teacher).__name__ != checked.config["base_architecture"]:
        raise LayerfoldError(
            f"the teacher is a {type(teacher).__name__}, the folded model a {checked.config['base_architecture']}: "
            "heal from the original model"
        )
    family = family_of(teacher)
    teacher_checkpoint = SourceCheckpoint(teacher_path)
    teacher_originals = Originals(
        teacher_checkpoint.read,
        layer_prefixes(teacher, family),
        FoldPlan(len(family.layer_list(teacher)), []),
        _Resolver(teacher_checkpoint, teacher),
    )
    _materialize_embeddings(teacher, teacher_originals, family)
    teacher.float()
    student_checkpoint = SourceCheckpoint(student_dir)
    _materialize_outside_blocks(student, student_checkpoint, checked.aliases)

    tokenizer = load_tokenizer(student_dir)
    causal = checked.model_class.__name__.endswith("ForCausalLM")
    heal_data = prepare_data(tokenizer, data, causal=causal, seq_len=config.seq_len, held_out=config.eval_examples,
                             limit=config.max_examples)  # fmt: skip
    units = _units_from_meta(student, config)  # a unit too large for --unit-memory is refused before any output
    settings = {"student": str(student_dir.resolve()), "teacher": str(teacher_path.resolve()),
                "data": describe_source(data, resolve=True), "stream": True, **config.to_dict()}  # fmt: skip
    prepare_checkpoints(checkpoints, settings, resume=resume, overwrite=overwrite, is_main=True)
    train = heal_data.first_train(config.block_tokens)

    inputs = {"folded model": student_dir, "teacher": teacher_path, "data": data}
    metadata = read_metadata(student_dir)
    with atomic_output_dir(out, overwrite=overwrite, inputs=inputs) as tmp:
        specs = [(name, shape, TORCH_DTYPES[student_checkpoint.dtypes[name]]) for name, shape in checked.shapes.items()]
        writer = ShardWriter(tmp, specs, metadata={k: v for k, v in metadata.items() if k != "format"})
        try:
            blocks = StreamedBlocks(student, student_checkpoint, checked.aliases, teacher, teacher_originals, writer,
                                    config.train, config.norms)  # fmt: skip
            results = heal_blocks(
                student,
                teacher,
                block_batches(train, config.block_batch),
                block_batches(heal_data.held_out, config.block_batch),
                BlockwiseSettings(config.block_steps, config.block_lr, config.warmup, config.seed, config.unit_memory,
                                  config.block_kl),
                units=units,
                blocks=blocks,
                checkpoints=checkpoints,
                progress=progress,
            )
            blocks.finish()
            writer.finish()
        finally:
            writer.close()
        for item in student_dir.iterdir():  # config, tokenizer, model card and side files, as they were
            if item.is_file() and not item.name.startswith("model") and item.name not in (REPORT_JSON, REPORT_MD):
                shutil.copy2(item, tmp / item.name)
            elif item.is_dir():
                shutil.copytree(item, tmp / item.name)
        report = StreamedHealReport(
            student=str(student_dir),
            teacher=str(teacher_path),
            data={"path": describe_source(data), **heal_data.summary()},
            settings=config.to_dict(),
            blockwise=summary(results),
            peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            seconds=round(time.perf_counter() - started, 2),
            out=str(out),
        )
        (tmp / REPORT_JSON).write_text(report.to_json() + "\n")
        (tmp / REPORT_MD).write_text(report.markdown() + "\n")
    if not keep_checkpoints:
        shutil.rmtree(checkpoints, ignore_errors=True)
    return report


def _materialize_outside_blocks(student: nn.Module, checkpoint: SourceCheckpoint, aliases: dict[str, str]) -> None:
    """Load the folded model's tensors outside its blocks and its store (embeddings, norms, head), in float32."""
    family = family_of(student)
    inside = {id(p) for p in family.layer_list(student).parameters()}
    inside |= {id(p) for p in fold_state(student).parameters()}
    names = [n for n, p in student.named_parameters(remove_duplicate=False) if id(p) not in inside]
    values = checkpoint.read(dict.fromkeys(aliases.get(n, n) for n in names))
    student.load_state_dict({n: values[aliases.get(n, n)].float() for n in names}, assign=True, strict=False)
    if getattr(student.config, "tie_word_embeddings", False):
        student.tie_weights()


def _units_from_meta(student: nn.Module, config: HealConfig) -> list[Unit]:
    """The units, planned on the skeleton (parameter counts and what trains need no tensors)."""
    select_trainable(student, config.train, config.norms)
    return plan_units(student, config.unit_memory)


@dataclass(eq=False)
class StreamedHealReport(Report):
    """``layerfold heal --stage blockwise --stream``: the data, settings, each unit's held-out error, peak memory."""

    student: str
    teacher: str
    data: dict
    settings: dict
    blockwise: dict
    peak_rss_bytes: int
    seconds: float
    out: str

    def markdown(self) -> str:
        b = self.blockwise
        rows = [
            ["folded model", self.student],
            ["teacher", self.teacher],
            ["data", f"{self.data['path']} ({self.data['kind']}, {self.data['train_tokens']:,} tokens)"],
            ["stage", "blockwise, streamed"],
            ["units", f"{b['units']} ({b['units_improved']} improved on held-out data)"],
            ["held-out relative error (mean over units)", f"{b['held_out_before']:.4g} → {b['held_out_after']:.4g}"],
            ["tokens through the units", f"{b['tokens']:,}"],
            ["peak memory (RSS)", f"{self.peak_rss_bytes / 2**30:.2f} GB"],
            ["time", f"{self.seconds:.0f} s"],
        ]
        return markdown_table(["", "value"], rows)
