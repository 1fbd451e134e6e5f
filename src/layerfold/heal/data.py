"""The heal's data: documents split into training windows and a held-out slice, packed for Trainer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..core import texts as datafiles
from ..core.texts import DataSource, interleave, read_documents, source_paths
from ..core.errors import LayerfoldError


def _sentences(texts: list[str], kind: str) -> list[str]:
    """Encoders train on sentence-sized units: STS-B sentences as they are, other texts split into lines."""
    if kind == "sts":
        return texts
    return [line for text in texts for line in datafiles.text_lines(text)]


@dataclass
class HealData:
    train: list[torch.Tensor]  # token ids per example
    held_out: list[torch.Tensor]
    held_out_texts: list[str]  # encoders: the held-out sentences (for the fidelity measure)
    kind: str
    tokens: int  # training tokens available

    def summary(self) -> dict:
        """What the report says about the data."""
        return {
            "kind": self.kind,
            "train_examples": len(self.train),
            "train_tokens": self.tokens,
            "held_out_examples": len(self.held_out),
        }

    def first_train(self, tokens: int) -> list[torch.Tensor]:
        """The training examples from the start until ``tokens`` are reached (the block-wise stage's share)."""
        taken, total = [], 0
        for example in self.train:
            if total >= tokens:
                break
            taken.append(example)
            total += example.numel()
        return taken


def prepare_data(
    tokenizer, source: DataSource, *, causal: bool, seq_len: int, held_out: int, limit: int | None
) -> HealData:
    """Decoders: every document tokenised, an end-of-text token between documents, packed into windows of
    ``seq_len`` (the tail shorter than a window is dropped). Encoders: one example per sentence, cut at
    ``seq_len``. The last ``held_out`` examples are kept out of training for the fidelity check.

    A mix of data files: each file is prepared so, with an equal share of the held-out examples; the training
    examples are interleaved (every step, and the block-wise stage's first tokens, see every domain)."""
    paths = source_paths(source)
    if len(paths) == 1:
        return _prepare_one(tokenizer, paths[0], causal=causal, seq_len=seq_len, held_out=held_out, limit=limit)
    if held_out < len(paths):
        raise LayerfoldError(f"--eval-examples {held_out} is fewer than the {len(paths)} data files of the mix")
    shares = [held_out // len(paths) + (k < held_out % len(paths)) for k in range(len(paths))]
    parts = [_prepare_one(tokenizer, path, causal=causal, seq_len=seq_len, held_out=share, limit=None)
             for path, share in zip(paths, shares)]  # fmt: skip
    train = interleave([part.train for part in parts])[:limit]
    kinds = dict.fromkeys(part.kind for part in parts)
    return HealData(
        train,
        [t for part in parts for t in part.held_out],
        [t for part in parts for t in part.held_out_texts],
        next(iter(kinds)) if len(kinds) == 1 else "mix of " + ", ".join(kinds),
        int(sum(t.numel() for t in train)),
    )


def _prepare_one(
    tokenizer, path: str | Path, *, causal: bool, seq_len: int, held_out: int, limit: int | None
) -> HealData:
    texts, kind = read_documents(path)
    if causal:
        eos = tokenizer.eos_token_id
        stream: list[int] = []
        for text in texts:
            stream.extend(tokenizer(text, add_special_tokens=False, verbose=False).input_ids)
            if eos is not None and len(texts) > 1:
                stream.append(eos)
        ids = torch.tensor(stream, dtype=torch.long)
        count = ids.numel() // seq_len
        examples = list(ids[: count * seq_len].view(count, seq_len)) if count else []
        units: list[str] = [""] * len(examples)
        need = f"at least {held_out + 1} windows of {seq_len} tokens"
    else:
        units = list(dict.fromkeys(_sentences(texts, kind)))  # unique, in order
        encoded = tokenizer(units, truncation=True, max_length=seq_len).input_ids
        examples = [torch.tensor(e, dtype=torch.long) for e in encoded]
        need = f"at least {held_out + 1} sentences"
    if len(examples) <= held_out:
        raise LayerfoldError(
            f"{path}: too little data to heal: {len(examples)} examples, need {need} "
            "(a training set and a held-out slice)"
        )
    train, held = examples[:-held_out], examples[-held_out:]
    if limit is not None:
        train = train[:limit]
    return HealData(train, held, units[-held_out:], kind, int(sum(t.numel() for t in train)))


class Examples(torch.utils.data.Dataset):
    def __init__(self, examples: list[torch.Tensor]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"input_ids": self.examples[index], "index": index}


@dataclass
class Collator:
    pad_token_id: int

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [item["input_ids"] for item in items]
        width = max(t.numel() for t in ids)
        input_ids = torch.full((len(ids), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, t in enumerate(ids):
            input_ids[row, : t.numel()] = t
            attention_mask[row, : t.numel()] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "index": torch.tensor([item["index"] for item in items], dtype=torch.long),
        }
