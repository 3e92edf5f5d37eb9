"""HyWIA: fine- and coarse-grained Taylor importance, fused per group by an untrained attention model.

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

import math

import torch

from .errors import HywiaError
from .grouping import LayerGroups
from .importance import Criterion, Scores, Stats, register

ROW_CHUNK = 2048  # rows of the [n, n] attention matrix held at once: softmax is per row, so chunking is exact


class AttentionFusion:
    """Algorithm 1 with seeded, never-trained projections W_q, W_k, W_v: R^d_in -> R^d_model.

    Tokens are the groups of one layer; a token's fine features are its per-projection fine scores and its coarse
    features the per-projection coarse scores. Q = X_fine W_q, K = X_coarse W_k, V = X_coarse W_v,
    A = softmax(Q K^T / sqrt(d_model)) row-wise, and alpha_i = sigmoid(mean over d_model of (A V)_i).
    """

    def __init__(self, d_in: int, d_model: int = 64, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        # nn.Linear's default scale (uniform in +-1/sqrt(d_in)) as a Gaussian: logits stay O(1) for unit inputs
        self.w_q, self.w_k, self.w_v = (torch.randn(d_in, d_model, generator=generator) / math.sqrt(d_in) for _ in range(3))
        self.d_model = d_model

    def alpha(self, x_fine: torch.Tensor, x_coarse: torch.Tensor) -> torch.Tensor:
        """[n, d_in] fine and coarse features -> alpha [n] in (0, 1)."""
        q, k, v = x_fine @ self.w_q, x_coarse @ self.w_k, x_coarse @ self.w_v
        out = torch.cat([torch.softmax(q[i:i + ROW_CHUNK] @ k.T / math.sqrt(self.d_model), dim=1) @ v
                         for i in range(0, len(q), ROW_CHUNK)])
        return torch.sigmoid(out.mean(dim=1))


def granularities(s: LayerGroups, stats: Stats) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(fine per projection [n, m], coarse per projection [n, m], fine [n], coarse [n]) of one layer's groups."""
    fine_parts = s.member_sums(lambda slot: 0.5 * slot.param.detach().float().square() * stats.fisher[slot.name])
    signed_parts = s.member_sums(lambda slot: slot.param.detach() * stats.grad[slot.name])
    return fine_parts, signed_parts.abs(), fine_parts.sum(1), signed_parts.sum(1).abs()


NORMALISATIONS = ("rank", "mean")


def normalise(pooled: torch.Tensor, mode: str) -> torch.Tensor:
    """One granularity's scores over a ranking pool on a common scale.

    rank: ascending rank / n, in (0, 1], ties broken by position: the fused ranking then responds to both inputs
          equally, however heavy-tailed either is (Element^2 on SmolLM2 MLP channels: median 0.33 x the mean, max
          3,400 x), and it is invariant to any monotone rescaling of either input.
    mean: divided by the pool mean (mean 1): invariant to a constant rescaling only; a heavy-tailed input has its
          bulk squeezed toward 0, so the other input decides among the low-scoring groups that get pruned.
    """
    if mode == "mean":
        return pooled / (pooled.mean().item() or 1.0)
    ranks = torch.empty_like(pooled)
    ranks[torch.argsort(pooled, stable=True)] = torch.arange(1, len(pooled) + 1, dtype=pooled.dtype) / len(pooled)
    return ranks


def _pooled(sets: list[LayerGroups], values: list[torch.Tensor], mode: str) -> list[torch.Tensor]:
    """`normalise` over the pool of each kind, split back per set."""
    out: list[torch.Tensor] = [torch.empty(0)] * len(sets)
    for kind in {s.kind for s in sets}:
        members = [i for i, s in enumerate(sets) if s.kind == kind]
        normalised = normalise(torch.cat([values[i] for i in members]), mode).split([len(values[i]) for i in members])
        for i, t in zip(members, normalised):
            out[i] = t
    return out


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
    fines, coarses = _pooled(sets, [r[2] for r in raw], normalize), _pooled(sets, [r[3] for r in raw], normalize)
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
