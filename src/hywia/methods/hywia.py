"""HyWIA (AAAI 2025): fine- and coarse-grained Taylor importance, fused per group by an untrained attention model.

fine   (per group) = sum over its weights of 1/2 w^2 F   (element-wise, second order, per-sample Fisher: Element^2)
coarse (per group) = |sum over its weights of w g|       (the group as a whole, first order on the batch: Vector)

Before fusion each granularity is put on a common scale over its ranking pool (all groups of one kind, attention
or MLP, in the selected layers): by default its rank in that pool divided by the pool size, so both granularities
move the fused ranking equally whatever their raw scales and tails; `normalize="mean"` divides by the pool mean
instead (the first reading, kept for comparison: on SmolLM2 the heavy tail of Element^2 lets Vector decide most MLP
choices under it). The fused score is alpha * fine + (1 - alpha) * coarse, with a per-group alpha from
`AttentionFusion` (or a fixed one). The reading of the paper's Algorithm 1 behind `AttentionFusion`, the
normalisation, and why, are in docs/method.md.
"""
from __future__ import annotations

import torch

from ..errors import HywiaError
from ..fusion import NORMALISATIONS, AttentionFusion, normalise_per_kind
from ..grouping import LayerGroups
from ..importance import Criterion, Scores, Stats, register


def granularities(s: LayerGroups, stats: Stats) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(fine per projection [n, m], coarse per projection [n, m], fine [n], coarse [n]) of one layer's groups."""
    fine_parts = s.member_sums(lambda slot: 0.5 * slot.param.detach().float().square() * stats.fisher[slot.name])
    signed_parts = s.member_sums(lambda slot: slot.param.detach() * stats.grad[slot.name])
    return fine_parts, signed_parts.abs(), fine_parts.sum(1), signed_parts.sum(1).abs()


def fusion_options(options: dict) -> tuple[str, float, int, str]:
    """(fusion, fixed alpha, d_model, normalize) from the user's options, refusing bad values before any work."""
    fusion = options.get("fusion", "attention")
    if fusion not in ("attention", "fixed"):
        raise HywiaError(f"unknown fusion '{fusion}': use attention or fixed")
    fixed_alpha = options.get("alpha")
    if fusion == "attention" and fixed_alpha is not None:
        raise HywiaError("--alpha sets a fixed fusion weight: pass it with --fusion fixed")
    fixed_alpha = 0.5 if fixed_alpha is None else float(fixed_alpha)
    if not 0 <= fixed_alpha <= 1:
        raise HywiaError(f"--alpha {fixed_alpha} is out of range: 0 <= alpha <= 1")
    d_model = int(options.get("fusion_dim") or 64)
    if d_model < 1:
        raise HywiaError(f"--fusion-dim {d_model} must be a positive integer")
    normalize = options.get("normalize", "rank")
    if normalize not in NORMALISATIONS:
        raise HywiaError(f"unknown --normalize '{normalize}': use {' or '.join(NORMALISATIONS)}")
    return fusion, fixed_alpha, d_model, normalize


def fuse(sets: list[LayerGroups], stats: Stats, options: dict) -> Scores:
    """HyWIA scores of every set, with the fine, coarse (both normalised per kind), alpha and fused scores."""
    fusion, fixed_alpha, d_model, normalize = fusion_options(options)
    raw = [granularities(s, stats) for s in sets]
    fines, coarses = normalise_per_kind(sets, [r[2] for r in raw], normalize), normalise_per_kind(sets, [r[3] for r in raw], normalize)
    scale: dict[tuple[str, int], float] = {}  # (kind, 2: fine | 3: coarse) -> mean group score: scales alpha's features
    for kind in {s.kind for s in sets}:
        for position in (2, 3):
            pooled = torch.cat([r[position] for s, r in zip(sets, raw) if s.kind == kind])
            scale[(kind, position)] = pooled.mean().item() or 1.0
    models: dict[str, AttentionFusion] = {}
    details: dict[str, list[torch.Tensor]] = {"fine": [], "coarse": [], "alpha": [], "fused": []}
    for s, (fine_parts, coarse_parts, _, _), fine, coarse in zip(sets, raw, fines, coarses):
        f_scale, c_scale = scale[(s.kind, 2)], scale[(s.kind, 3)]
        if fusion == "fixed":
            alpha = torch.full_like(fine, fixed_alpha)
        else:
            if s.kind not in models:  # one model per kind: alphas of different layers are comparable
                models[s.kind] = AttentionFusion(fine_parts.shape[1], d_model, stats.seed * 2 + (s.kind == "mlp"))
            alpha = models[s.kind].alpha(fine_parts / f_scale, coarse_parts / c_scale)
        details["fine"].append(fine)
        details["coarse"].append(coarse)
        details["alpha"].append(alpha)
        details["fused"].append(alpha * fine + (1 - alpha) * coarse)
    return Scores(details["fused"], details)


register("hywia", Criterion(fuse, needs_grad=True, needs_fisher=True, options=("fusion", "alpha", "fusion_dim", "normalize"),
                            check=fusion_options))
