"""HyWIA: fine- and coarse-grained Taylor importance, fused per group by an untrained attention model.

fine   (per group) = sum over its weights of 1/2 w^2 F   (element-wise, second order, per-sample Fisher: Element^2)
coarse (per group) = |sum over its weights of w g|       (the group as a whole, first order on the batch: Vector)

Each granularity is divided by its mean group score over all groups of the same kind (attention or MLP) in the
selected layers, so both have mean 1 and neither dominates the sum whatever its raw scale. The fused score is
alpha * fine + (1 - alpha) * coarse, with a per-group alpha from `AttentionFusion` (or a fixed one). The reading
of the paper's Algorithm 1 behind `AttentionFusion`, and why, is in docs/method.md.
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


def fuse(sets: list[LayerGroups], stats: Stats, options: dict) -> Scores:
    """HyWIA scores of every set, with the fine, coarse (both mean-normalised per kind), alpha and fused scores."""
    mode = options.get("fusion", "attention")
    if mode not in ("attention", "fixed"):
        raise HywiaError(f"unknown fusion '{mode}': use attention or fixed")
    fixed_alpha = options.get("alpha")
    if mode == "attention" and fixed_alpha is not None:
        raise HywiaError("--alpha sets a fixed fusion weight: pass it with --fusion fixed")
    fixed_alpha = 0.5 if fixed_alpha is None else float(fixed_alpha)
    if not 0 <= fixed_alpha <= 1:
        raise HywiaError(f"--alpha {fixed_alpha} is out of range: 0 <= alpha <= 1")
    d_model = int(options.get("fusion_dim") or 64)

    raw = [granularities(s, stats) for s in sets]
    scale: dict[tuple[str, int], float] = {}  # (kind, 2: fine | 3: coarse) -> mean group score over the pool
    for kind in {s.kind for s in sets}:
        for position in (2, 3):
            pooled = torch.cat([r[position] for s, r in zip(sets, raw) if s.kind == kind])
            scale[(kind, position)] = pooled.mean().item() or 1.0
    models: dict[str, AttentionFusion] = {}
    details: dict[str, list[torch.Tensor]] = {"fine": [], "coarse": [], "alpha": [], "fused": []}
    for s, (fine_parts, coarse_parts, fine, coarse) in zip(sets, raw):
        f_scale, c_scale = scale[(s.kind, 2)], scale[(s.kind, 3)]
        fine, coarse = fine / f_scale, coarse / c_scale
        if mode == "fixed":
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


register("hywia", Criterion(fuse, needs_grad=True, needs_fisher=True, options=("fusion", "alpha", "fusion_dim")))
