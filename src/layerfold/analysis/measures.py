"""Where a model is redundant, measured on calibration data; the planner reads it to choose a fold.

- Block Influence (ShortGPT): 1 − cosine of a block's input and output hidden states (from ``calibrate``).
- Layer outputs: the L×L mean per-token cosine of the blocks' output hidden states, and linear CKA (Kornblith
  et al. 2019) of the same token × feature matrices.
- Weights, per projection: the relative Frobenius distance ‖Wᵢ − Wⱼ‖ / mean(‖Wᵢ‖, ‖Wⱼ‖), and the share of
  the energy the two layers' own rank-r bases capture that one common rank-r basis (the top right singular
  vectors of [Wᵢ; Wⱼ], the subspace Basis Sharing shares) still captures. Both are 0 and 1 for identical
  layers. r is ``rank_fraction`` of the projection's full rank.
- Gradient matching (Few-shot NAS with Gradient Matching): the cosine between two layers' gradients of a
  language-model loss w.r.t. their projection weights, averaged over calibration batches. Encoders without a
  head get a masked-token loss through their input embeddings.
- Gates (FoldGPT): a scalar gate per block scales its residual update (h + g·f(h)); the gates are trained
  briefly with HF Trainer to keep the final hidden states while an L1 penalty pulls them to zero, so a block
  the others can stand in for ends with a small gate (a ranking that sees coupling between blocks).
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..engine.calibrate import Calibration, _first
from ..core.errors import LayerfoldError
from ..evaluation.metrics import is_causal_lm
from ..core.families import family_of, linear_weight
from .gates import GatedStack, train_gates  # noqa: F401 (GatedStack: its import path before gates.py)
from ..core.report import markdown_table

Matrix = list[list[float]]
SIMILARITIES = ("weights", "outputs", "gradients")


@dataclass
class Analysis:
    """Everything ``analyze`` measured, indexed by original layer number."""

    model_type: str
    num_layers: int
    tokens: int
    block_influence: list[float]
    angular_distance: list[float]
    output_cosine: Matrix
    output_cka: Matrix
    weight_distance: dict[str, Matrix]  # projection path -> L×L
    shared_energy: dict[str, Matrix]
    rank_fraction: float
    gradient_match: Matrix | None = None
    gates: list[float] | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Analysis":
        return cls(**data)

    def weight_similarity(self) -> np.ndarray:
        """One L×L weight similarity: the mean over projections of the shared-basis energy share (NaN where
        it was not measured)."""
        return np.mean([np.array(m, dtype=float) for m in self.shared_energy.values()], axis=0)

    def mean_weight_distance(self) -> np.ndarray:
        return np.mean([np.array(m) for m in self.weight_distance.values()], axis=0)

    def similarity(self, source: str) -> np.ndarray:
        """L×L similarity of layers by ``source`` (SIMILARITIES): weights (1 − their mean relative distance),
        outputs (linear CKA) or gradients (gradient cosine)."""
        if source == "weights":
            return 1.0 - self.mean_weight_distance()
        if source == "outputs":
            return np.array(self.output_cka)
        if source == "gradients":
            if not self.gradient_match:
                raise LayerfoldError("similarity gradients: the analysis has no gradient matching (gradient_batches 0)")
            return np.array(self.gradient_match)
        check_similarity(source)

    def measured_similarities(self) -> list[str]:
        return [s for s in SIMILARITIES if s != "gradients" or self.gradient_match]

    def gates_or_influence(self) -> list[float]:
        """FoldGPT's gates when they were trained, else Block Influence: a per-block score, low = removable."""
        return self.gates or self.block_influence

    def most_similar_pairs(self, count: int = 5) -> list[dict[str, Any]]:
        """The layer pairs whose weights are closest (lowest mean distance), with every similarity measured."""
        distance = self.mean_weight_distance()
        pairs = [(distance[i, j], i, j) for i in range(self.num_layers) for j in range(i + 1, self.num_layers)]
        energy = self.weight_similarity()
        rows = []
        for d, i, j in sorted(pairs)[:count]:
            rows.append(
                {
                    "layers": [i, j],
                    "weight_distance": float(d),
                    "shared_energy": float(energy[i, j]),
                    "output_cka": self.output_cka[i][j],
                    "gradient_match": self.gradient_match[i][j] if self.gradient_match else None,
                }
            )
        return rows


# ---- layer outputs -----------------------------------------------------------------------------------------
@torch.no_grad()
def layer_outputs(model: nn.Module, batches: Sequence[dict], max_tokens: int = 2048) -> torch.Tensor:
    """The output hidden state of every block at up to ``max_tokens`` real tokens of the first batches: a
    float32 tensor L × N × d."""
    layers = family_of(model).layer_list(model)
    # Only as many batches as hold max_tokens: a decoder needs one or two windows, not the whole calibration set.
    used, total = [], 0
    for batch in batches:
        if total >= max_tokens:
            break
        used.append(batch)
        total += int(batch["attention_mask"].sum())
    batches, stride = used, max(1, total // max_tokens)
    captured: list[list[torch.Tensor]] = [[] for _ in layers]
    state: dict[str, torch.Tensor] = {}

    def hook(index):
        def record(module, args, output):
            hidden = _first(output)
            captured[index].append(hidden[state["mask"]][::stride].float())

        return record

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    model.eval()
    try:
        for batch in batches:
            state["mask"] = batch["attention_mask"].bool()
            model(**batch, use_cache=False) if is_causal_lm(model) else model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack([torch.cat(chunks)[:max_tokens] for chunks in captured])


def output_similarity(outputs: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean per-token cosine and linear CKA between every pair of layers' outputs (L × N × d)."""
    unit = F.normalize(outputs, dim=-1)
    cosine = torch.einsum("ind,jnd->ij", unit, unit) / outputs.shape[1]
    centred = outputs - outputs.mean(dim=1, keepdim=True)
    # Linear CKA through the token × token Gram matrices: CKA(X, Y) = ⟨XXᵀ, YYᵀ⟩ / (‖XXᵀ‖ ‖YYᵀ‖) for centred X, Y.
    # Stored in float32, summed in float64: N² terms in float32 would put the diagonal visibly below 1.
    grams = [(x @ x.T).reshape(-1) for x in centred]
    count = len(grams)
    inner = torch.zeros(count, count, dtype=torch.float64)
    for i in range(count):
        for j in range(i, count):
            inner[i, j] = inner[j, i] = torch.dot(grams[i].double(), grams[j].double())
    norms = inner.diagonal().clamp(min=1e-300).sqrt()
    cka = (inner / norms[:, None] / norms[None, :]).float()
    return cosine.clamp(-1, 1).numpy(), cka.clamp(0, 1).numpy()


# ---- weights -----------------------------------------------------------------------------------------------
def _top_energy(eigenvalues: torch.Tensor, rank: int) -> float:
    return float(eigenvalues.clamp(min=0).sort(descending=True).values[:rank].sum())


@torch.no_grad()
def weight_similarity(
    model: nn.Module, *, rank_fraction: float = 0.25, energy_window: int | None = None, progress: bool = True
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per projection: the L×L relative Frobenius distance and shared-basis energy share (module docstring).
    The energy takes one eigen-decomposition per pair; ``energy_window`` limits it to pairs at most that many
    layers apart (the others are NaN)."""
    if not 0 < rank_fraction <= 1:
        raise LayerfoldError(f"rank fraction must be in (0, 1], got {rank_fraction}")
    family = family_of(model)
    layers = family.layer_list(model)
    count = len(layers)
    distances, energies = {}, {}
    for path in tqdm(family.projections, desc="weights", unit="projection", disable=not progress):
        weights = torch.stack([linear_weight(layer.get_submodule(path)).detach().double() for layer in layers])
        flat = weights.reshape(count, -1)
        dots = flat @ flat.T
        norms = dots.diagonal().clamp(min=0).sqrt()
        squared = (norms[:, None] ** 2 + norms[None, :] ** 2 - 2 * dots).clamp(min=0)
        distance = squared.sqrt() / ((norms[:, None] + norms[None, :]) / 2).clamp(min=1e-12)
        distance.fill_diagonal_(0.0)
        distances[path] = distance.float().numpy()
        # The shared basis spans rows (the input side): eigenvalues of Σ WᵀW; a smaller Gram on the output side
        # has the same non-zero eigenvalues for one layer, but not for a stack, so stay on the input side.
        out_features, in_features = weights.shape[1:]
        rank = max(1, round(rank_fraction * min(out_features, in_features)))
        grams = (weights.transpose(1, 2) @ weights).float()  # L × in × in
        own = [_top_energy(torch.linalg.eigvalsh(g), rank) for g in grams]
        energy = np.full((count, count), np.nan)
        np.fill_diagonal(energy, 1.0)
        for i in range(count):
            for j in range(i + 1, min(count, i + 1 + energy_window) if energy_window else count):
                common = _top_energy(torch.linalg.eigvalsh(grams[i] + grams[j]), rank)
                energy[i, j] = energy[j, i] = min(1.0, common / max(own[i] + own[j], 1e-30))
        energies[path] = energy
    return distances, energies


# ---- gradients ---------------------------------------------------------------------------------------------
def _loss(model: nn.Module, batch: dict, generator: torch.Generator, tokenizer_mask_id: int | None) -> torch.Tensor:
    """The LM loss (decoders), or for encoders a masked-token loss read out through the input embeddings."""
    if is_causal_lm(model):
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        return model(**batch, labels=labels, use_cache=False).loss
    ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    chosen = (torch.rand(ids.shape, generator=generator) < 0.15) & mask
    if not chosen.any():
        chosen = mask
    masked = ids.masked_fill(chosen, tokenizer_mask_id) if tokenizer_mask_id is not None else ids
    hidden = model(**{**batch, "input_ids": masked}).last_hidden_state
    logits = hidden[chosen] @ model.get_input_embeddings().weight.T
    return F.cross_entropy(logits.float(), ids[chosen])


def gradient_match(
    model: nn.Module, batches: Sequence[dict], *, mask_token_id: int | None = None, progress: bool = True
) -> np.ndarray:
    """Mean over batches of the cosine between every two layers' gradients w.r.t. their projection weights."""
    family = family_of(model)
    layers = family.layer_list(model)
    weights = [[layer.get_submodule(p).weight for p in family.projections] for layer in layers]
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    for group in weights:
        for weight in group:
            weight.requires_grad_(True)
    generator = torch.Generator().manual_seed(0)
    total = torch.zeros(len(layers), len(layers), dtype=torch.float64)
    model.eval()  # no dropout: the gradients of the model as it is
    try:
        for batch in tqdm(batches, desc="gradient matching", unit="batch", disable=not progress):
            with torch.enable_grad():
                grads = torch.autograd.grad(
                    _loss(model, batch, generator, mask_token_id), [w for g in weights for w in g]
                )
            per_layer = len(family.projections)
            vectors = torch.stack(
                [
                    torch.cat([g.reshape(-1) for g in grads[i * per_layer : (i + 1) * per_layer]])
                    for i in range(len(layers))
                ]
            )
            unit = F.normalize(vectors.double(), dim=1)
            total += unit @ unit.T
    finally:
        for param, flag in zip(model.parameters(), flags):
            param.requires_grad_(flag)
    return (total / len(batches)).float().numpy()


def _json_matrix(matrix: np.ndarray) -> Matrix:
    return [[None if math.isnan(x) else float(x) for x in row] for row in matrix]


# ---- the whole analysis ------------------------------------------------------------------------------------
def analyze(
    model: nn.Module,
    calibration: Calibration,
    *,
    max_tokens: int = 2048,
    rank_fraction: float = 0.25,
    energy_window: int | None = None,
    gradient_batches: int = 4,
    gradient_length: int = 512,
    gate_steps: int = 40,
    gate_length: int = 256,
    mask_token_id: int | None = None,
    grams: bool = False,
    progress: bool = True,
) -> Analysis:
    """Measure the original model on the calibration batches (see the module docstring). ``gradient_batches``
    = 0 or ``gate_steps`` = 0 skips that measurement. ``grams``: also gather the Gram matrices that whitened
    factorisations need, in the same pass as Block Influence (the planner does when it may use a basis)."""
    family = family_of(model)
    seconds: dict[str, float] = {}

    def timed(name: str, start: float) -> None:
        seconds[name] = round(time.perf_counter() - start, 2)

    start = time.perf_counter()
    statistics = calibration.statistics(grams=grams, progress=progress)
    timed("block_influence", start)
    start = time.perf_counter()
    cosine, cka = output_similarity(layer_outputs(model, calibration.batches, max_tokens))
    timed("outputs", start)
    start = time.perf_counter()
    distances, energies = weight_similarity(
        model, rank_fraction=rank_fraction, energy_window=energy_window, progress=progress
    )
    timed("weights", start)
    short = [
        {key: value[:, :length] for key, value in batch.items()}
        for length in [gradient_length]
        for batch in calibration.batches[: max(gradient_batches, 0)]
    ]
    start = time.perf_counter()
    matching = gradient_match(model, short, mask_token_id=mask_token_id, progress=progress) if short else None
    timed("gradient_match", start)
    start = time.perf_counter()
    gate_batches = [{key: value[:, :gate_length] for key, value in batch.items()} for batch in calibration.batches]
    gates = train_gates(model, gate_batches, steps=gate_steps, progress=progress) if gate_steps > 0 else None
    timed("gates", start)
    return Analysis(
        model_type=model.config.model_type,
        num_layers=len(family.layer_list(model)),
        tokens=statistics.tokens,
        block_influence=list(statistics.block_influence),
        angular_distance=list(statistics.angular_distance),
        output_cosine=cosine.tolist(),
        output_cka=cka.tolist(),
        weight_distance={k: v.tolist() for k, v in distances.items()},
        shared_energy={k: _json_matrix(v) for k, v in energies.items()},
        rank_fraction=rank_fraction,
        gradient_match=matching.tolist() if matching is not None else None,
        gates=gates,
        settings={
            **calibration.settings,
            "max_tokens": max_tokens,
            "energy_window": energy_window,
            "gradient_batches": gradient_batches,
            "gradient_length": gradient_length,
            "gate_steps": gate_steps,
            "gate_length": gate_length,
        },
        seconds=seconds,
    )


def check_similarity(source: str) -> None:
    if source not in SIMILARITIES:
        raise LayerfoldError(f"--similarity must be one of {', '.join(SIMILARITIES)}, got {source!r}")


def cluster(similarity: np.ndarray, layers: Sequence[int], groups: int) -> list[list[int]]:
    """Average-linkage agglomerative clustering of ``layers`` into ``groups`` clusters (most similar first)."""
    clusters = [[i] for i in layers]
    while len(clusters) > max(groups, 1):
        best, pair = -math.inf, (0, 1)
        for a in range(len(clusters)):
            for b in range(a + 1, len(clusters)):
                value = float(np.nanmean([similarity[i, j] for i in clusters[a] for j in clusters[b]]))
                if value > best:
                    best, pair = value, (a, b)
        a, b = pair
        clusters[a] = sorted(clusters[a] + clusters[b])
        del clusters[b]
    return sorted(clusters)


def analysis_of(calibration: Calibration) -> Analysis:
    """The analysis of a calibration's model on its batches, measured once and kept on the calibration, for the
    methods that plan from it when no planner handed them one. Gate training seeds the random generators (HF
    Trainer); their states are restored, so that measuring here changes nothing that follows. Its bars follow
    ``calibration.progress``."""
    if "analysis" not in calibration.derived:
        python_state, numpy_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng():
            calibration.derived["analysis"] = analyze(
                calibration.model,
                calibration,
                mask_token_id=calibration.mask_token_id,
                progress=calibration.progress,
            )
        random.setstate(python_state)
        np.random.set_state(numpy_state)
    return calibration.derived["analysis"]


# ---- reports -----------------------------------------------------------------------------------------------
def analysis_markdown(analysis: Analysis, images: Sequence[str] = ()) -> str:
    rows = []
    for i in range(analysis.num_layers):
        rows.append(
            [
                str(i),
                f"{analysis.block_influence[i]:.4f}",
                f"{analysis.angular_distance[i]:.4f}",
                f"{analysis.gates[i]:.3f}" if analysis.gates else "–",
                f"{analysis.output_cka[i][i + 1]:.3f}" if i + 1 < analysis.num_layers else "–",
                f"{analysis.weight_similarity()[i][i + 1]:.3f}" if i + 1 < analysis.num_layers else "–",
                f"{analysis.gradient_match[i][i + 1]:.3f}"
                if analysis.gradient_match and i + 1 < analysis.num_layers
                else "–",
            ]
        )
    pairs = analysis.most_similar_pairs()
    pair_rows = [
        [
            f"{p['layers'][0]}–{p['layers'][1]}",
            f"{p['weight_distance']:.3f}",
            f"{p['shared_energy']:.3f}",
            f"{p['output_cka']:.3f}",
            f"{p['gradient_match']:.3f}" if p["gradient_match"] is not None else "–",
        ]
        for p in pairs
    ]
    lowest = sorted(range(analysis.num_layers), key=lambda i: analysis.block_influence[i])[:3]
    lines = [
        f"Analysis of a {analysis.model_type} model, {analysis.num_layers} blocks, {analysis.tokens} calibration "
        "tokens.",
        "",
        "Per block (the last three columns compare block i with block i+1):",
        "",
        markdown_table(
            ["block", "Block Influence", "angular distance", "gate", "output CKA", "weight energy", "gradient cos"],
            rows,
        ),
        "",
        f"Lowest Block Influence (first candidates to remove): {', '.join(map(str, lowest))}.",
        *(
            [
                "Smallest gates: "
                + ", ".join(str(i) for i in sorted(range(analysis.num_layers), key=lambda i: analysis.gates[i])[:3])
                + "."
            ]
            if analysis.gates
            else []
        ),
        "",
        f"Closest weights (mean over projections; energy at rank {analysis.rank_fraction:g} × full):",
        "",
        markdown_table(["layers", "weight distance", "shared energy", "output CKA", "gradient cos"], pair_rows),
        "",
        *[f"![{Path(name).stem}]({name})" for name in images],
        f"Seconds: {', '.join(f'{k} {v:g}' for k, v in analysis.seconds.items())}.",
    ]
    return "\n".join(lines)


def heatmaps(analysis: Analysis, folder: Path) -> list[str]:
    """PNG heat-maps of the L×L matrices; returns the file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        (
            "output_similarity.png",
            [("output cosine", analysis.output_cosine), ("output linear CKA", analysis.output_cka)],
        ),
        (
            "weight_similarity.png",
            [
                ("weight distance (mean over projections)", analysis.mean_weight_distance()),
                ("shared-basis energy (mean over projections)", analysis.weight_similarity()),
            ],
        ),
    ]
    if analysis.gradient_match:
        panels.append(("gradient_match.png", [("gradient cosine", analysis.gradient_match)]))
    names = []
    for name, maps in panels:
        figure, axes = plt.subplots(1, len(maps), figsize=(5.2 * len(maps), 4.4), squeeze=False)
        for axis, (title, matrix) in zip(axes[0], maps):
            image = axis.imshow(np.array(matrix), cmap="viridis")
            axis.set_title(title)
            axis.set_xlabel("layer")
            axis.set_ylabel("layer")
            figure.colorbar(image, ax=axis, fraction=0.046)
        figure.tight_layout()
        figure.savefig(folder / name, dpi=110)
        plt.close(figure)
        names.append(name)
    return names


def write_analysis(analysis: Analysis, out: Path) -> str:
    """analysis.json, analysis.md and the heat-maps, into an existing folder; returns the Markdown."""
    markdown = analysis_markdown(analysis, heatmaps(analysis, out))
    (out / "analysis.json").write_text(json.dumps(analysis.to_dict(), indent=1) + "\n")
    (out / "analysis.md").write_text(markdown + "\n")
    return markdown
