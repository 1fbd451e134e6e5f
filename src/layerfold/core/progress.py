"""A training run's progress (heal's, the block gates'): one tqdm bar on stderr with the latest figures in its
postfix, in place of Trainer's ProgressCallback (which prints every log dictionary as a line and the run's
summary twice)."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

# What the postfix shows, by log key (Trainer's names; fidelity keys as DistillationTrainer logs them).
_SHOWN = {"loss": "loss", "learning_rate": "lr", "eval_kl": "held-out KL", "eval_top1_agreement": "top-1",
          "eval_cosine": "held-out cos"}  # fmt: skip


class TrainingProgress(TrainerCallback):
    """A bar over the training steps (main process only); evaluation and the final summary print nothing."""

    def __init__(self, desc: str) -> None:
        self.desc = desc
        self.bar = None
        self.figures: dict[str, str] = {}
        self.evaluated, self.evaluated_at = False, None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc=self.desc, unit="step", file=sys.stderr)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is None or not logs:
            return
        for key, label in _SHOWN.items():
            if isinstance(logs.get(key), (int, float)):
                self.figures[label] = f"{logs[key]:.3g}"
        self.bar.set_postfix(self.figures, refresh=True)
        shown = {label: logs[key] for key, label in _SHOWN.items() if key.startswith("eval_") and key in logs}
        if shown and state.global_step != self.evaluated_at:  # a row of a short table per evaluation, above the bar
            if not self.evaluated:
                self.bar.write(" | ".join(["step".rjust(6), *(label.rjust(12) for label in shown)]))
            self.bar.write(" | ".join([str(state.global_step).rjust(6), *(f"{v:12.4g}" for v in shown.values())]))
            self.evaluated, self.evaluated_at = True, state.global_step

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def show_progress(trainer, desc: str, *, progress: bool = True) -> None:
    """Give a Trainer one bar named ``desc`` (or none), in place of its own bar or printer: both print the log
    dictionaries and the run's summary (the printer is what Trainer installs when its bar is off)."""
    for printing in (ProgressCallback, PrinterCallback):
        trainer.remove_callback(printing)
    if progress:
        trainer.add_callback(TrainingProgress(desc))


def is_timing(key: str) -> bool:
    """Trainer's timing entries of an evaluation (``eval_runtime``, ``…_samples_per_second``), not figures."""
    return key.endswith(("runtime", "per_second"))


def loss_table(history: list[dict], rows: int = 20) -> list[list[str]]:
    """The losses over time from Trainer's log history: a row per logged step (at most ``rows``, evenly
    spaced, the last always), with the training loss and the held-out fidelity logged at that step."""
    by_step: dict[int, dict] = {}
    for entry in history:
        step = entry.get("step")
        if step is None or "train_runtime" in entry:
            continue
        by_step.setdefault(step, {}).update(entry)
    steps = sorted(by_step)
    if len(steps) > rows:
        stride = (len(steps) - 1) / (rows - 1)
        steps = sorted({steps[round(i * stride)] for i in range(rows)})
    fidelity = sorted({k for s in steps for k in by_step[s]
                       if k.startswith("eval_") and not is_timing(k) and not k.endswith("loss")})  # fmt: skip
    table = []
    for step in steps:
        entry = by_step[step]
        row = [str(step), _fmt(entry.get("loss")), _fmt(entry.get("learning_rate"))]
        table.append(row + [_fmt(entry.get(k)) for k in fidelity])
    header = ["step", "training loss", "learning rate", *(k.removeprefix("eval_").replace("_", " ") for k in fidelity)]
    return [header, *table]


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) else ""
