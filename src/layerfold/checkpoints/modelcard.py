"""The model card (``README.md``) of every folded and exported folder: what was done, from what, by which plan,
with which measured figures, and how to load it. The Hub reads its front matter (``base_model``, ``license``,
``tags``); the license is carried over from the original's card (or the folded folder's, for an export).
"""

from __future__ import annotations

import datetime
import re
from pathlib import Path

from .. import __version__
from ..operations.plan import FoldPlan

CARD_NAME = "README.md"
FOLD_TAG, EXPORT_TAG = "layerfold", "layerfold-export"  # every card of ours has FOLD_TAG; an export's also EXPORT_TAG
_FRONT_MATTER = re.compile(r"\A---\s*\n(.*?)\n---\s*\n", re.S)


def _front_matter_lines(folder: str | Path | None) -> list[str]:
    if folder is None:
        return []
    folder = Path(folder)
    card = (folder if folder.is_dir() else folder.parent) / CARD_NAME
    try:
        match = _FRONT_MATTER.match(card.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError):
        return []
    return match.group(1).splitlines() if match else []


def front_matter(folder: str | Path | None) -> dict[str, str]:
    """The ``key: value`` lines of a model card's YAML front matter (the simple scalars only)."""
    fields = {}
    for line in _front_matter_lines(folder):
        key, sep, value = line.partition(":")
        if sep and key.strip() and not key.startswith((" ", "-")) and value.strip():
            fields[key.strip()] = value.strip().strip("'\"")
    return fields


def card_tags(folder: str | Path | None) -> list[str]:
    """The ``tags:`` list of a model card's front matter (``- tag`` lines)."""
    tags, inside = [], False
    for line in _front_matter_lines(folder):
        if not line.startswith((" ", "-")):
            inside = line.partition(":")[0].strip() == "tags"
        elif inside and line.strip().startswith("- "):
            tags.append(line.strip()[2:].strip().strip("'\""))
    return tags


def _hub_id(name: str | None) -> str | None:
    """A name that looks like a Hub id (``owner/name``), for ``base_model``; local paths are not."""
    if name and re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not Path(name).exists():
        return name
    return None


def _header(base_model: str | None, license_: str | None, tags: list[str]) -> str:
    lines = ["---", "library_name: transformers"]
    if base_model:
        lines.append(f"base_model: {base_model}")
    lines.append(f"license: {license_ or 'other'}")
    lines.append("tags:")
    lines += [f"- {tag}" for tag in tags]
    return "\n".join(lines + ["---", ""])


def _figure_rows(figures: dict) -> list[str]:
    rows = ["| | |", "| --- | --- |"]
    for name, value in figures.items():
        shown = f"{value:,}" if isinstance(value, int) else f"{value:.4g}" if isinstance(value, float) else str(value)
        rows.append(f"| {name} | {shown} |")
    return rows


def fold_card(
    *,
    name: str,
    plan: FoldPlan,
    base_architecture: str,
    base_config: dict,
    source=None,
    refolded: bool = False,
    figures: dict,
) -> str:
    """The card of a folded checkpoint; ``refolded``: ``source`` is itself a fold (a heal's student)."""
    origin = str(source) if source is not None else base_config.get("_name_or_path") or "an unrecorded model"
    carried = front_matter(source)
    model_type = base_config.get("model_type", "?")
    kinds = sorted({op.kind for op in plan.operations})
    auto = "AutoModelForCausalLM" if base_architecture.endswith(("ForCausalLM", "LMHeadModel")) else "AutoModel"
    lines = [
        _header(_hub_id(carried.get("base_model")) or _hub_id(origin), carried.get("license"),
                [FOLD_TAG, "parameter-sharing", *kinds]),  # fmt: skip
        f"# {name}",
        "",
        (f"The fold `{origin}` trained further" if refolded else f"`{origin}` folded")
        + f" ({base_architecture}, model type `{model_type}`) by layerfold {__version__} on "
        f"{datetime.date.today().isoformat()}: layers share parameters (see `plan.yaml` for the exact plan).",
        "",
        f"**Plan.** {plan.describe()}.",
        "",
        *_figure_rows(figures),
        "",
        "**Loading.** This folder needs layerfold (`pip install layerfold`): its model type is `layerfold`, and "
        "tied or factorised projections are rebuilt by it. Nothing in the folder is executed.",
        "",
        "```python",
        "import layerfold  # registers folded checkpoints with transformers",
        f"from transformers import {auto}",
        f'model = {auto}.from_pretrained("{name}")',
        "```",
        "",
        "`layerfold export` writes a plain checkpoint that loads with transformers alone"
        + (" (this plan only drops, merges or prunes, so the export is the base architecture with fewer layers or "
           "smaller widths)." if plan.keeps_base_architecture() else " (with every kept layer stored in full)."),  # fmt: skip
        "",
        f"License: {carried['license']} (the original's)." if carried.get("license") else
        "License: see the original model's card; the fold is a derivative of its weights.",  # fmt: skip
        "",
    ]
    return "\n".join(lines)


def export_card(*, name: str, folded: Path, plan: FoldPlan, architecture: str, dtype: str, figures: dict) -> str:
    """The card of an export (a plain checkpoint of a fold)."""
    carried = front_matter(folded)
    kind = (
        f"the base architecture with {len(plan.kept_layers())} of its {plan.num_layers} layers (the plan only drops, "
        "merges or prunes; pruned widths as the config states), loadable by any tool that reads the original's "
        "architecture"
        if plan.keeps_base_architecture()
        else "every kept layer stored in full (tied and factorised layers merged back into per-layer weights); "
        "the folded checkpoint is the smaller one"
    )
    lines = [
        _header(carried.get("base_model"), carried.get("license"), [FOLD_TAG, EXPORT_TAG]),
        f"# {name}",
        "",
        f"A plain {architecture} checkpoint in {dtype}, exported by layerfold {__version__} on "
        f"{datetime.date.today().isoformat()} from the folded model `{folded}`: {kind}. It loads with "
        "transformers alone (no layerfold, no remote code).",
        "",
        f"**Plan of the fold.** {plan.describe()}.",
        "",
        *_figure_rows(figures),
        "",
        f"License: {carried['license']} (carried from the fold's card)." if carried.get("license") else
        "License: see the original model's card.",  # fmt: skip
        "",
    ]
    return "\n".join(lines)
