"""The heal job: check the inputs, load student and teacher, train, save, report (JSON and Markdown)."""

from __future__ import annotations

import os
import pickle
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import set_seed

from ..core.texts import DataSource, describe_source, source_paths
from ..core.errors import LayerfoldError, first_line
from ..evaluation.metrics import is_causal_lm, is_causal_lm_class
from ..checkpoints.folded import check_checkpoint, is_folded_checkpoint, load, load_source, load_tokenizer, save
from ..checkpoints.output_guard import check_inputs, check_output
from ..core.progress import is_timing, loss_table, show_progress
from ..core.report import Report, markdown_table
from ..core.store import fold_state
from .blockwise import BlockwiseSettings, block_batches, blockwise_results, heal_blocks, plan_units, summary
from .checkpoints import check_checkpoint_folder, check_resumable, checkpoint_dir_for, prepare_checkpoints
from .data import Collator, Examples, prepare_data
from .losses import hidden_layer_pairs, teacher_layer_map
from .settings import REPORT_JSON, REPORT_MD, HealConfig
from .teacher_cache import teacher_fingerprint, teacher_top_k
from .trainable import select_trainable
from .trainer import make_trainer_class, training_arguments


def check_teacher(student: nn.Module, teacher: nn.Module, student_tokenizer, teacher_tokenizer) -> None:
    """The teacher must be the student's original architecture and speak the same vocabulary."""
    state = fold_state(student)
    expected = state.base_architecture
    if type(teacher).__name__ != expected:
        raise LayerfoldError(
            f"the teacher is a {type(teacher).__name__}, the folded model a {expected}: heal from the original model"
        )
    if teacher.config.vocab_size != student.config.vocab_size:
        raise LayerfoldError(
            f"the teacher's vocabulary has {teacher.config.vocab_size} tokens, the folded model's "
            f"{student.config.vocab_size}: heal from the original model"
        )
    if teacher_tokenizer is not None and teacher_tokenizer.get_vocab() != student_tokenizer.get_vocab():
        raise LayerfoldError("the teacher's tokenizer differs from the folded model's: heal from the original model")
    if teacher.config.hidden_size != student.config.hidden_size:
        raise LayerfoldError("the teacher's hidden size differs from the folded model's: heal from the original model")


def _optional_tokenizer(path: Path):
    """The teacher's tokenizer when its folder has one (a teacher may come as weights only)."""

    try:
        return load_tokenizer(path)
    except LayerfoldError:
        return None


def heal(
    student_dir: str | Path,
    teacher_path: str | Path,
    data: DataSource,
    out: str | Path,
    config: HealConfig | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    keep_checkpoints: bool = False,
    callbacks: list | None = None,
) -> HealReport:
    """Heal the folded model in ``student_dir`` by distillation from ``teacher_path`` (its original) on ``data``,
    and save it to ``out`` (atomically, with ``heal.json``/``heal.md``). Checkpoints go to ``OUT.checkpoints``
    and are removed at the end unless ``keep_checkpoints``. Returns the report.

    This is the recipe, step by step (check, load, data, checkpoints, train, report, save); each step's work is
    in the modules of this package, which is why it reads as one function of about 100 lines (over 80 lines:
    the job's steps in order)."""
    student_dir, teacher_path, out = Path(student_dir), Path(teacher_path), Path(out)
    config, checkpoints, mapping = _checked_arguments(student_dir, teacher_path, data, out, config, overwrite)

    student = load(student_dir)
    causal = is_causal_lm(student)
    tokenizer = load_tokenizer(student_dir)
    teacher = load_source(teacher_path, dtype=torch.float32)
    check_teacher(student, teacher, tokenizer, _optional_tokenizer(teacher_path))
    saved_dtype = next(student.parameters()).dtype
    student.to(torch.float32)  # train in fp32; the healed model is saved in the folded model's dtype
    counts = select_trainable(student, config.train, config.norms)
    units = plan_units(student, config.unit_memory) if config.stage != "e2e" else []  # a unit too large: refused now

    heal_data = prepare_data(
        tokenizer,
        data,
        causal=causal,
        seq_len=config.seq_len,
        held_out=config.eval_examples,
        limit=config.max_examples,
    )
    settings = {
        "student": str(student_dir.resolve()),
        "teacher": str(teacher_path.resolve()),
        "data": describe_source(data, resolve=True),
        **config.to_dict(),
    }
    is_main = int(os.environ.get("RANK", "0")) == 0
    start = prepare_checkpoints(checkpoints, settings, resume=resume, overwrite=overwrite, is_main=is_main)
    if start is not None:
        check_resumable(start)
    cache, cache_info = _teacher_cache(config, teacher, teacher_path, heal_data)

    set_seed(config.seed)
    trainer = make_trainer_class()(
        model=student,
        args=training_arguments(config, checkpoints),
        train_dataset=Examples(heal_data.train),
        eval_dataset=Examples(heal_data.held_out),
        data_collator=Collator(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0),
        callbacks=callbacks,
        teacher=teacher,
        heal=config,
        hidden_pairs=hidden_layer_pairs(config, mapping),
        held_out=heal_data.held_out,
        held_out_texts=heal_data.held_out_texts,
        tokenizer=tokenizer,
        source=student_dir,
        cache=cache,
    )
    show_progress(trainer, "heal")
    before = trainer.evaluate(metric_key_prefix="before")
    blockwise = None
    if config.stage != "e2e":
        # A run resumed inside the end-to-end stage takes its weights from that checkpoint: the units are done.
        results = blockwise_results(checkpoints) if start else _blockwise_stage(student, teacher, heal_data, config, units, checkpoints)
        blockwise = {**summary(results), "fidelity_after": trainer.evaluate(metric_key_prefix="blockwise")}
    started = time.perf_counter()
    result = None
    if config.stage != "blockwise":
        try:
            result = trainer.train(resume_from_checkpoint=str(start) if start else None)
        except pickle.UnpicklingError as err:  # torch's weights-only loader refused a state file; nothing ran
            raise LayerfoldError(
                f"--resume: {start} holds an optimizer, scheduler or random state that is not plain tensors "
                f"({first_line(err).split('. ')[0]}); not unpickled, since that could run code: pass --overwrite "
                "to start over"
            ) from None
    seconds = time.perf_counter() - started
    after = trainer.evaluate(metric_key_prefix="after")

    tokens = trainer.tokens_seen * trainer.accelerator.num_processes
    report = HealReport(
        student=str(student_dir),
        teacher=str(teacher_path),
        data={"path": describe_source(data), **heal_data.summary()},
        settings=config.to_dict(),
        parameters=counts,
        resumed_from=str(start) if start else None,
        steps=trainer.state.global_step,
        final_train_loss=_last_train_loss(trainer.state.log_history),
        train_loss_mean=result.training_loss if result is not None else None,
        tokens_this_run=tokens,
        seconds_this_run=seconds,
        tokens_per_second=tokens / seconds if seconds > 0 else None,
        processes=trainer.accelerator.num_processes,
        fidelity_before=before,
        fidelity_after=after,
        teacher_cache=cache_info,
        stage=config.stage,
        blockwise=blockwise,
        log_history=trainer.state.log_history,
        out=str(out),
    )
    if trainer.is_world_process_zero():
        student.to(saved_dtype)
        save(
            student,
            out,
            source=student_dir,
            overwrite=overwrite,
            extra_files={
                REPORT_JSON: report.to_json() + "\n",
                REPORT_MD: report.markdown() + "\n",
            },
            figures={
                "healed by": f"distillation from {teacher_path}, {report.tokens_this_run:,} tokens (heal.md)",
                **{k.replace("_", " "): v for k, v in {**before, **after}.items()
                   if isinstance(v, float) and not is_timing(k)},
            },  # fmt: skip
        )
        if not keep_checkpoints:
            shutil.rmtree(checkpoints, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    return report


def _blockwise_stage(student, teacher, heal_data, config: HealConfig, units: list, checkpoints: Path) -> list:
    """The block-wise stage on the first ``block_tokens`` of the training examples, checked on the held-out ones."""
    settings = BlockwiseSettings(
        config.block_steps, config.block_lr, config.warmup, config.seed, config.unit_memory, config.block_kl
    )
    train = heal_data.first_train(config.block_tokens)
    return heal_blocks(
        student,
        teacher,
        block_batches(train, config.block_batch),
        block_batches(heal_data.held_out, config.block_batch),
        settings,
        units=units,
        checkpoints=checkpoints,
    )


def _teacher_cache(config: HealConfig, teacher: nn.Module, teacher_path: Path, heal_data) -> tuple:
    """The teacher's top-k logits on the training examples, from ``--teacher-cache`` (computed on a miss), and
    what the report says about them; (None, None) without a cache."""
    if not config.teacher_cache:
        return None, None
    values, indices, file, hit = teacher_top_k(
        teacher,
        heal_data.train,
        top_k=config.top_k,
        cache_dir=config.teacher_cache,
        fingerprint=teacher_fingerprint(teacher_path),
    )
    return (values, indices), {"file": str(file), "hit": hit, "top_k": config.top_k}


def _checked_arguments(
    student_dir: Path, teacher_path: Path, data, out: Path, config: HealConfig | None, overwrite: bool
) -> tuple[HealConfig, Path, list[int]]:
    """Every argument checked before a model loads: the resolved settings, the checkpoint folder and, for each
    folded layer, the original layer it stands in for."""
    checked = check_checkpoint(student_dir)  # a clear line when it is not a (sound) folded checkpoint
    if not teacher_path.exists():
        raise LayerfoldError(f"teacher not found: {teacher_path}")
    if is_folded_checkpoint(teacher_path):
        raise LayerfoldError(f"the teacher {teacher_path} is a folded model; heal from the original model")
    for path in source_paths(data):
        if not path.exists():
            raise LayerfoldError(f"data file not found: {path}")
    config = config or HealConfig()
    inputs = {"folded model": student_dir, "teacher": teacher_path, "data": data, "teacher cache": config.teacher_cache}
    check_output(out, inputs, overwrite=overwrite)
    checkpoints = checkpoint_dir_for(out)
    check_inputs(checkpoints, inputs, flag="the checkpoint folder")
    check_checkpoint_folder(checkpoints)
    config = config.resolved(is_causal_lm_class(checked.model_class))
    mapping = teacher_layer_map(checked.plan)
    layers = len(mapping)
    if any(not -layers <= p < layers for p in config.hidden_layers):
        raise LayerfoldError(f"--hidden-layers: the folded model has {layers} layers, got {config.hidden_layers}")
    return config, checkpoints, mapping


def _last_train_loss(history: list[dict]) -> float | None:
    losses = [entry["loss"] for entry in history if "loss" in entry]
    return losses[-1] if losses else None


@dataclass(eq=False)
class HealReport(Report):
    """``layerfold heal``: the data, settings, what trained, the run's tokens and time, and the held-out fidelity
    before and after (``log_history``: the Trainer's log, kept in heal.json, left out of ``--json``)."""

    student: str
    teacher: str
    data: dict
    settings: dict
    parameters: dict
    resumed_from: str | None
    steps: int
    final_train_loss: float | None
    train_loss_mean: float | None
    tokens_this_run: int
    seconds_this_run: float
    tokens_per_second: float | None
    processes: int
    fidelity_before: dict
    fidelity_after: dict
    teacher_cache: dict | None
    stage: str
    blockwise: dict | None
    log_history: list
    out: str

    def markdown(self) -> str:
        report = self

        def fmt(value):
            return f"{value:.4g}" if isinstance(value, float) else str(value)

        settings = report["settings"]
        rows = [
            ["folded model", report["student"]],
            ["teacher", report["teacher"]],
            [
                "data",
                f"{report['data']['path']} ({report['data']['kind']}, {report['data']['train_examples']} examples, "
                f"{report['data']['train_tokens']:,} tokens; {report['data']['held_out_examples']} held out)",
            ],
            ["steps", f"{report['steps']} × batch {settings['batch']} × {settings['grad_accum']} accumulation"],
            ["losses", ", ".join(f"{k}={v:g}" for k, v in settings["loss"].items() if v)],
            [
                "trains",
                f"{settings['train']} ({report['parameters']['trainable']:,} of "
                f"{report['parameters']['total']:,} parameters)",
            ],
            ["stage", report["stage"]],
            ["final training loss", fmt(report["final_train_loss"])],
            ["throughput", f"{fmt(report['tokens_per_second'])} tokens/s over {report['seconds_this_run']:.0f} s"],
        ]
        for key in report["fidelity_before"]:
            if key.startswith("before_") and not is_timing(key):
                name = key[len("before_") :]
                rows.append(
                    [
                        f"held-out {name}",
                        f"{fmt(report['fidelity_before'][key])} → {fmt(report['fidelity_after'].get('after_' + name))}",
                    ]
                )
        if report["stage"] == "blockwise":  # no end-to-end steps: their rows would say nothing
            rows = [row for row in rows if row[0] not in ("steps", "final training loss", "throughput")]
        if report["resumed_from"]:
            rows.append(["resumed from", report["resumed_from"]])
        text = markdown_table(["", "value"], rows)
        blockwise = report["blockwise"]
        if blockwise:
            text += (
                f"\n\nBlock-wise stage: {blockwise['units']} units, {blockwise['tokens']:,} tokens, "
                f"{blockwise['seconds']:.0f} s; held-out relative error of each unit's output before → after "
                "(a unit whose held-out error did not drop keeps its weights):\n\n"
            )
            unit_rows = [
                [
                    "–".join(str(p) for p in sorted({r["positions"][0], r["positions"][-1]})),
                    f"{r['trainable']:,}",
                    r["shared"],
                    f"{r['held_out_before']:.4g} → {r['held_out_after']:.4g}",
                    r["kept"] + (" (resumed)" if r["resumed"] else ""),
                ]
                for r in blockwise["per_unit"]
            ]
            text += markdown_table(["layers", "trained parameters", "shared tensors", "held-out error", "kept"], unit_rows)
        losses = loss_table(report["log_history"])
        if len(losses) > 1 and report["stage"] != "blockwise":
            text += "\n\nLosses over time (every logged step, at most 20 rows; held-out fidelity where evaluated):\n\n"
            text += markdown_table(losses[0], losses[1:])
        return text
