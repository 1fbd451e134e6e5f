"""The ``prune-channels`` operation: MLP intermediate channels removed per layer (FLAP, MoDeGPT's MLP, textpruner's
FFN neurons, Torch-Pruning's channels)."""

from __future__ import annotations

from dataclasses import dataclass

from ..geometry import Prune, channel_width


@dataclass
class PruneChannels(Prune):
    """Each of ``layers`` keeps only the MLP channels in ``keep`` (indices into its intermediate width): the
    producing projections (gate and up, or the first MLP projection) lose the other rows, the reading one (down)
    the other columns, refitted with ``compensate``. The kept indices are stored, so a checkpoint rebuilds
    without calibration data."""

    kind = "prune-channels"
    unit_name = "channel"
    pruned_what = "MLP channels"

    def validate(self, family, layers, where: str) -> None:
        self.check_widths({i: channel_width(layers[i], family) for i in self.layers}, where)

    @classmethod
    def example(cls, model) -> list:
        from ...core.families import family_of

        family = family_of(model)
        half = list(range(0, channel_width(family.layer_list(model)[0], family), 2))
        return [cls(layers=[1, 3], keep=[half] * 2)]
