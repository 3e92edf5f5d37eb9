"""Wanda (Sun et al., ICLR 2024): a weight matters as |W_ij| * ||X_j||_2, its magnitude times the norm of the input
feature it reads over the calibration tokens; the lowest go, compared within each output row (the paper's
"per output" comparison group), with no update of the weights that stay."""
from __future__ import annotations

from torch import nn

from ..sparsify import InputStats, Pattern, Sparsifier, lowest_mask, pattern_mask, register


def wanda(module: nn.Linear, stats: InputStats, sparsity: float, pattern: Pattern | None, options: dict) -> None:
    weight = module.weight.data
    metric = weight.abs().float() * stats.diagonal.sqrt().to(weight.device)[None, :]
    mask = pattern_mask(metric, pattern) if pattern else lowest_mask(metric, round(sparsity * weight.shape[1]), per_row=True)
    weight[mask] = 0


register("wanda", Sparsifier(wanda))
