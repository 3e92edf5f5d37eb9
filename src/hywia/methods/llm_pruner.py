"""LLM-Pruner's Taylor criteria (Ma et al., NeurIPS 2023): Element^1, Element^2 and Vector, from the gradient of the
causal-LM loss on calibration samples (and, for Element^2, the per-sample empirical Fisher)."""
from __future__ import annotations

import torch

from ..grouping import LayerGroups
from ..importance import Criterion, Stats, per_layer, register, taylor_sums


def element1(groups: LayerGroups, stats: Stats) -> torch.Tensor:
    """Element^1 (`param_first`): sum over the group's weights of |w * dL/dw|."""
    return groups.sum(lambda s: (s.param.detach() * stats.grad[s.name]).abs())


def element2(groups: LayerGroups, stats: Stats) -> torch.Tensor:
    """Element^2 (`param_second`): sum of |1/2 w^2 F_ww| with F the diagonal empirical Fisher."""
    return 0.5 * taylor_sums(groups, stats, 2).sum(1)


def vector(groups: LayerGroups, stats: Stats) -> torch.Tensor:
    """First-order Taylor of removing the group as a whole: |sum over the group of w * dL/dw| on the batch."""
    return taylor_sums(groups, stats, 1).sum(1).abs()


register("element1", Criterion(per_layer(element1), needs_grad=True))
register("element2", Criterion(per_layer(element2), needs_grad=True, needs_fisher=True, group_sums=True))
register("vector", Criterion(per_layer(vector), needs_grad=True, group_sums=True))
