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
The layer walk (each layer on the outputs of the already-pruned ones) and the final weights are hywia.reconstruct's:
the least-squares refit of the kept columns, which is what the sequence of OBS updates arrives at. Readings chosen
where the paper leaves room are in docs/reconstruction.md.
"""
from __future__ import annotations

import math

import torch

from ..errors import HywiaError
from ..grouping import LayerGroups
from ..importance import Criterion, Scores, Stats, register
from ..reconstruct import PERCDAMP, dampened


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


def group_errors(weight: torch.Tensor, inverse: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """E_C of every group: `columns` [groups, size] holds each group's input columns of `weight` [out, in]."""
    blocks = inverse[columns[:, :, None], columns[:, None, :]]  # [groups, size, size]
    factor, info = torch.linalg.cholesky_ex(blocks)
    if info.any():
        raise HywiaError("a head's block of the inverse calibration Hessian is not positive definite; calibrate on more "
                         "samples (--samples) or longer windows (--seq-len)")
    w = weight[:, columns].permute(1, 2, 0)  # [groups, size, out]
    return torch.linalg.solve_triangular(factor, w, upper=False).square().sum((1, 2))


def obs_remove(weight: torch.Tensor, inverse: torch.Tensor, columns: torch.Tensor) -> None:
    """The OBS update that removes `columns` (1-d), in place on `weight` and `inverse` (float64)."""
    step = torch.linalg.solve(inverse[columns][:, columns], inverse[columns])  # ([H^-1]_CC)^-1 [H^-1]_C,:
    weight -= weight[:, columns] @ step
    inverse -= inverse[:, columns] @ step


def select(s: LayerGroups, weight: torch.Tensor, hessian: torch.Tensor, count: int, damp: float = PERCDAMP) -> torch.Tensor:
    """The `count` groups of `s` that batched greedy OBS removes, from its reader's weights and calibration Hessian."""
    if count == 0:
        return torch.zeros(0, dtype=torch.long)
    reader = s.reader
    columns = reader.indices(torch.arange(s.count)).view(s.count, reader.size).to(weight.device)
    w = weight.double().clone()
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(dampened(hessian, damp)))
    alive = torch.ones(s.count, dtype=torch.bool, device=weight.device)
    gone: list[int] = []
    per_block = s.count // s.blocks
    while len(gone) < count:
        errors = torch.full((s.count,), math.inf, dtype=torch.float64, device=weight.device)
        errors[alive] = group_errors(w, inverse, columns[alive])
        if s.blocks > 1:  # one group from every block per step
            picked = errors.view(s.blocks, per_block).argmin(1) + per_block * torch.arange(s.blocks, device=weight.device)
        else:  # heads one at a time; channels half of those still to go at once
            batch = (count - len(gone) + 1) // 2 if s.kind == "mlp" else 1
            picked = errors.topk(batch, largest=False).indices
        obs_remove(w, inverse, columns[picked].flatten())
        alive[picked] = False
        gone += picked.tolist()
    return torch.tensor(sorted(gone), dtype=torch.long)


register("slimgpt", Criterion(_scores, reconstructs=True, select=select, attention_unit="query"))
