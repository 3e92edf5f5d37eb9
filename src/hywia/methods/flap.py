"""The FLAP paper's two criteria (An et al., AAAI 2024), both from forward activations alone: Wanda-sp (its structured
Wanda baseline) and FLAP (fluctuation of each structure's output, with bias compensation)."""
from __future__ import annotations

import torch

from ..grouping import LayerGroups
from ..importance import Criterion, Scores, Stats, per_layer, register


def _wanda_sp(groups: LayerGroups, stats: Stats) -> torch.Tensor:
    """Wanda-sp (the structured Wanda of An et al., FLAP, AAAI 2024): sum over the group's input columns of the
    output projection (o_proj / down_proj) of |W_ij| * ||X_j||_2, X_j the column's input over calibration tokens.
    Rows of q/k/v/gate/up contribute nothing: Wanda-sp scores a structure by the weights that read its output."""
    def per_weight(slot):
        if slot.dim != 1:
            return torch.zeros_like(slot.param, dtype=torch.float32)
        norm = stats.inputs[slot.name.rsplit(".", 1)[0]].squares.sqrt().float()
        return slot.param.detach().float().abs() * norm
    return groups.sum(per_weight)


def _column_fluctuation(groups: LayerGroups, stats: Stats) -> torch.Tensor:
    """FLAP's weighted input feature variance of every input column of the group's output projection,
    Var(X_j) * ||W_:,j||^2, as [count, columns per group]."""
    reader = groups.reader
    column_norms = reader.module.weight.detach().double().square().sum(0)
    return (stats.inputs[reader.name].variance.to(column_norms.device) * column_norms).float().cpu().reshape(groups.count, reader.size)


def _flap(sets: list[LayerGroups], stats: Stats, options: dict) -> Scores:
    """FLAP (An et al., AAAI 2024): a structure matters as much as its output fluctuates over calibration tokens,
    since a steady output is replaced by its mean through the bias. Column fluctuations are standardised over all
    layers per kind (attention, MLP), so that the two kinds can share one ranking, and a group scores the mean of
    its standardised columns (an attention group: the n_rep * head_dim columns of one KV head's query heads)."""
    columns = [_column_fluctuation(s, stats) for s in sets]
    scores: list[torch.Tensor] = [torch.empty(0)] * len(sets)
    for kind in dict.fromkeys(s.kind for s in sets):
        members = [i for i, s in enumerate(sets) if s.kind == kind]
        pooled = torch.cat([columns[i].flatten() for i in members])
        mean, std = pooled.mean(), pooled.std() if len(pooled) > 1 else torch.tensor(0.0)
        for i in members:
            scores[i] = ((columns[i] - mean) / (std if std > 0 else 1)).mean(1)
    return Scores(scores)


register("wanda_sp", Criterion(per_layer(_wanda_sp), needs_inputs=True))
register("flap", Criterion(_flap, needs_inputs=True, scope="joint", compensates=True))
