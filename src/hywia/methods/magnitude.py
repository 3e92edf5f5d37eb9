"""Data-free baselines: random scores and the L1 / L2 norm of each group's weights (structured), and the smallest
|w| of each matrix set to zero (unstructured `magnitude`); no calibration, no backward."""
from __future__ import annotations

import torch

from ..grouping import LayerGroups
from ..importance import Criterion, Stats, per_layer, register
from ..sparsify import Sparsifier, lowest_mask, pattern_mask
from ..sparsify import register as register_sparsifier


def _random(groups: LayerGroups, stats: Stats) -> torch.Tensor:
    """Uniform random scores, seeded per layer and kind so a run is reproducible."""
    generator = torch.Generator().manual_seed(stats.seed * 100_003 + groups.layer * 2 + (groups.kind == "mlp"))
    return torch.rand(groups.count, generator=generator)


def _l1(groups: LayerGroups, stats: Stats) -> torch.Tensor:
    return groups.sum(lambda s: s.param.detach().abs())


def _l2(groups: LayerGroups, stats: Stats) -> torch.Tensor:
    return groups.sum(lambda s: s.param.detach().square()).sqrt()


register("random", Criterion(per_layer(_random)))
register("l1", Criterion(per_layer(_l1)))
register("l2", Criterion(per_layer(_l2)))


def unstructured_magnitude(module, stats, sparsity: float, pattern, options: dict) -> None:
    """The weights of smallest |w| in the whole matrix (or in every N:M block) become zero: no data needed."""
    weight = module.weight.data
    metric = weight.abs().float()
    mask = pattern_mask(metric, pattern) if pattern else lowest_mask(metric, round(sparsity * weight.numel()))
    weight[mask] = 0


register_sparsifier("magnitude", Sparsifier(unstructured_magnitude, needs_data=False))
