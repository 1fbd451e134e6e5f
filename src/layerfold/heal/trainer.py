"""The Trainer subclass: distillation loss from a frozen teacher, fidelity evaluation, layerfold checkpoints."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

from ..evaluation.metrics import embedding_fidelity, is_causal_lm, next_token_fidelity, sentence_embeddings
from ..checkpoints.folded import read_weights, write_folded
from ..core.store import fold_state
from .losses import distillation_losses, logits_from_hidden, needs_teacher_pass
from .settings import HealConfig


def training_arguments(config, output_dir: Path):
    """Trainer's arguments for a heal run: cosine schedule, fidelity evaluation and a checkpoint every N steps."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=config.steps,
        per_device_train_batch_size=config.batch,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.lr,
        weight_decay=config.weight_decay,
        lr_scheduler_type="cosine",
        warmup_steps=int(config.warmup * config.steps),
        logging_steps=config.log_every,
        eval_strategy="steps",
        eval_steps=config.eval_every,
        save_strategy="steps",
        save_steps=config.save_every,
        save_total_limit=1,
        seed=config.seed,
        data_seed=config.seed,
        report_to="none",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(),  # also makes a multi-process launch on CPUs use gloo
        disable_tqdm=False,
        ddp_find_unused_parameters=False,
    )


def make_trainer_class():
    """The DistillationTrainer class, defined on first use so that transformers' Trainer (seconds to import)
    loads only when healing; over 80 lines because the class's methods are its body."""
    from transformers import Trainer

    class DistillationTrainer(Trainer):
        """Trainer whose loss is distillation from a frozen teacher, whose evaluation is fidelity to the teacher
        on a held-out slice, and whose checkpoints are layerfold checkpoints."""

        def __init__(
            self,
            *args,
            teacher,
            heal: HealConfig,
            hidden_pairs,
            held_out,
            held_out_texts,
            tokenizer,
            source,
            cache=None,
            **kwargs,
        ):
            super().__init__(*args, **kwargs)
            self.teacher = teacher.to(self.args.device).eval()
            self.teacher.requires_grad_(False)
            self.heal = heal
            self.hidden_pairs = hidden_pairs
            self.held_out = held_out
            self.held_out_texts = held_out_texts
            self.tokenizer = tokenizer
            self.source = source
            self.cache = cache
            self.causal = is_causal_lm(self.model)
            self.tokens_seen = 0
            self._parts: dict[str, list[float]] = {}
            self._reference_embeddings = None

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            index = inputs.pop("index")
            # Decoders: HF computes logits for the last position only; the losses compute the rest in chunks.
            kwargs = {"output_hidden_states": True, **({"logits_to_keep": 1} if self.causal else {})}
            student_out = model(**inputs, **kwargs)
            teacher_out, cached = None, None
            if self.cache is not None:
                cached = tuple(t[index.cpu()].to(inputs["input_ids"].device) for t in self.cache)
            if needs_teacher_pass(self.heal.loss, cached=self.cache is not None):
                with torch.no_grad():
                    teacher_out = self.teacher(**inputs, **kwargs)
            student = self.accelerator.unwrap_model(model)
            parts = distillation_losses(
                student_out,
                teacher_out,
                inputs,
                self.heal.loss,
                student_head=functools.partial(logits_from_hidden, student) if self.causal else None,
                teacher_head=functools.partial(logits_from_hidden, self.teacher) if self.causal else None,
                temperature=self.heal.temperature,
                hidden_pairs=self.hidden_pairs,
                cached=cached,
            )
            loss = sum(getattr(self.heal.loss, name) * value for name, value in parts.items())
            if model.training:
                self.tokens_seen += int(inputs["attention_mask"].sum())
                for name, value in parts.items():
                    self._parts.setdefault(name, []).append(float(value.detach()))
            return (loss, student_out) if return_outputs else loss

        def create_optimizer(self, *args, **kwargs):
            """With ``shared_lr``, the shared tensors (the store) train at their own rate: one update of a
            shared weight moves every layer that reads it."""
            if self.optimizer is not None or self.heal.shared_lr is None:
                return super().create_optimizer(*args, **kwargs)
            model = self.accelerator.unwrap_model(self.model)
            shared = {id(p) for p in fold_state(model).parameters()}
            trained = [p for p in model.parameters() if p.requires_grad]
            groups = [
                {"params": [p for p in trained if id(p) not in shared], "lr": self.args.learning_rate},
                {"params": [p for p in trained if id(p) in shared], "lr": self.heal.shared_lr},
            ]
            optimizer_class, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, model)
            optimizer_kwargs.pop("lr", None)
            groups = [dict(g, weight_decay=self.args.weight_decay) for g in groups if g["params"]]
            self.optimizer = optimizer_class(groups, **optimizer_kwargs)
            return self.optimizer

        def log(self, logs: dict[str, float], *args, **kwargs) -> None:
            if "loss" in logs:  # a training log: add the mean of each loss since the last one
                for name, values in self._parts.items():
                    logs[f"loss_{name}"] = round(sum(values) / len(values), 6)
                self._parts = {}
            super().log(logs, *args, **kwargs)

        @torch.no_grad()
        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
            """Fidelity to the teacher on the held-out slice, as ``layerfold eval --task fidelity`` measures it."""
            model = self.accelerator.unwrap_model(self.model)
            was_training = model.training
            model.eval()
            if self.causal:
                ids = torch.cat(self.held_out).to(self.args.device)
                result = next_token_fidelity(self.teacher, model, ids, max_length=self.heal.seq_len)
                metrics = {
                    f"{metric_key_prefix}_kl": result["value"],
                    f"{metric_key_prefix}_top1_agreement": result["top1_agreement"],
                }
            else:
                if self._reference_embeddings is None:
                    self._reference_embeddings = sentence_embeddings(
                        self.teacher, self.tokenizer, self.held_out_texts, max_length=self.heal.seq_len
                    )
                candidate = sentence_embeddings(
                    model, self.tokenizer, self.held_out_texts, max_length=self.heal.seq_len
                )
                metrics = {
                    f"{metric_key_prefix}_cosine": embedding_fidelity(self._reference_embeddings, candidate)["mean"]
                }
            model.train(was_training)
            self.log(metrics)
            return metrics

        def _save(self, output_dir=None, state_dict=None) -> None:

            if not self.args.should_save:
                return
            os.makedirs(output_dir, exist_ok=True)
            write_folded(self.accelerator.unwrap_model(self.model), output_dir, source=self.source)

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None) -> None:

            model = self.accelerator.unwrap_model(model if model is not None else self.model)
            model.load_state_dict(read_weights(resume_from_checkpoint), strict=True)

    return DistillationTrainer
