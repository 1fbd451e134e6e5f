"""Measuring what folding keeps."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def sentence_embeddings(
    model: nn.Module, tokenizer, texts: list[str], *, batch_size: int = 32, max_length: int = 256
) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings (the sentence-transformers convention)."""
    model.eval()
    chunks = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(
            texts[start : start + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        chunks.append(F.normalize(pooled.float(), dim=-1))
    return torch.cat(chunks)


def embedding_fidelity(reference: torch.Tensor, candidate: torch.Tensor) -> dict[str, float]:
    """Cosine similarity between matching rows of two embedding matrices."""
    cosine = F.cosine_similarity(reference, candidate, dim=-1)
    return {"mean": cosine.mean().item(), "min": cosine.min().item(), "count": int(cosine.numel())}
