"""SlimGPT (Ling et al., NeurIPS 2024, arXiv 2412.18110): Optimal Brain Surgeon for heads and FFN channels.

A group of an output projection W [out, in] owns a block C of its input columns (one head: head_dim columns; one
channel: one column). With H = X X^T from calibration inputs (dampened) and H^-1 its inverse, removing C costs the
squared output error

    E_C = tr(W_C ([H^-1]_CC)^-1 W_C^T)           (a channel: ||W_:,j||^2 / [H^-1]_jj)

once the other columns absorb it by the OBS update W -= W_C ([H^-1]_CC)^-1 [H^-1]_C,: , after which H^-1 loses C:
H^-1 -= [H^-1]_:,C ([H^-1]_CC)^-1 [H^-1]_C,: . Greedy pruning repeats: score, remove the cheapest, update.
- Heads (batched greedy with grouped Cholesky): E_C of every head from the Cholesky factor of its own diagonal
  block of H^-1 (all heads in one batched call); heads leave one at a time, each after the update of the last (under
  grouped-query attention one query head per KV group at a time, so the KV groups stay balanced).
- Channels (dynamic group size): the cheapest half of the channels still to remove leave at once, then the errors
  are recomputed, so batches shrink from large (errors of a barely pruned layer are reliable) to single channels.
- Layers (incremental pruning ratio): layer i of L removes r_i of its parameters, rising logarithmically from the
  first layer to the last, r_i = r_first + (r_last - r_first) ln(1 + i) / ln(L), with the mean r over layers:
  r_first = 0 (the first layers feed every later one, their error accumulates most), unless r_last would exceed
  (1 + r) / 2, in which case r_last is that cap and r_first rises to keep the mean.
The OBS errors and greedy selection (`obs_select`), the layer walk (each layer on the outputs of the already-pruned
ones) and the final weights (the least-squares refit of the kept columns, which is what the sequence of OBS updates
arrives at) are hywia.reconstruct's, where any criterion can use them (`--reconstruct obs`). Readings chosen
where the paper leaves room are in docs/reconstruction.md.
"""
from __future__ import annotations

import math

import torch

from ..grouping import LayerGroups
from ..importance import Criterion, Scores, Stats, register
from ..reconstruct import obs_select


def incremental_ratios(layers: list[int], ratio: float) -> dict[int, float]:
    """Each layer's pruning ratio, rising logarithmically with depth, averaging `ratio`."""
    if len(layers) == 1:
        return {layers[0]: ratio}
    shape = [math.log(1 + i) / math.log(len(layers)) for i in range(len(layers))]
    mean = sum(shape) / len(shape)
    last = min(ratio / mean, (1 + ratio) / 2)
    first = (ratio - last * mean) / (1 - mean)
    return {layer: first + (last - first) * x for layer, x in zip(layers, shape)}


def _scores(sets: list[LayerGroups], stats: Stats, options: dict) -> Scores:
    """Only the share of each layer: which groups leave is chosen by `select` during the walk."""
    return Scores([torch.zeros(s.count) for s in sets],
                  layer_ratios=incremental_ratios(sorted({s.layer for s in sets}), float(options["ratio"])))


register("slimgpt", Criterion(_scores, reconstructs=True, select=obs_select, attention_unit="query"))
