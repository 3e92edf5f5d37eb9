"""Fusions: functions and models that turn several per-group importance estimates into one.

`AttentionFusion` is HyWIA's untrained attention model (a per-group weight alpha between the fine and the coarse
score); `uncertainty_weights` is SAAP's homoscedastic-uncertainty weighting (one weight per estimate, larger for
the estimate that varies less over calibration samples); `normalise` puts estimates of different scales on one
before either is applied. The methods that use them are in hywia/methods/hywia.py and hywia/methods/saap.py;
the readings of both papers behind them are in docs/method.md and docs/companions.md.
"""
from __future__ import annotations

import math

import torch

from .grouping import LayerGroups
from .importance import Moments

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


def normalise_per_kind(sets: list[LayerGroups], values: list[torch.Tensor], mode: str) -> list[torch.Tensor]:
    """`normalise` over the pool of each kind (every set of one kind, attention or MLP), split back per set."""
    out: list[torch.Tensor] = [torch.empty(0)] * len(sets)
    for kind in {s.kind for s in sets}:
        members = [i for i, s in enumerate(sets) if s.kind == kind]
        normalised = normalise(torch.cat([values[i] for i in members]), mode).split([len(values[i]) for i in members])
        for i, t in zip(members, normalised):
            out[i] = t
    return out


def uncertainty_weights(values: dict[str, torch.Tensor], moments: dict[str, Moments]) -> dict[str, float]:
    """SAAP's fusion weights, one per estimate, from the homoscedastic uncertainty of each estimate.

    Kendall et al.'s multi-task likelihood weighs an observation with noise sigma^2 by 1/(2 sigma^2) (plus a
    log sigma term, the same for every group, which no ranking sees). An estimate here is a mean over calibration
    samples, so its noise is measurable: sigma_k^2 = the mean over groups of the variance of that mean
    (per-sample variance / n), relative to the estimate's pool mean squared so that scales cancel. `values[k]` is
    estimate k per group [n_groups] and `moments[k]` its per-sample moments over the same groups (signed values
    for an estimate taken as |mean|). Weights are returned normalised to sum to 1.
    """
    inverse = {}
    for name, value in values.items():
        m = moments[name]
        relative = (m.variance / max(m.count, 1)).mean().item() / max(value.double().mean().item() ** 2, 1e-300)
        inverse[name] = 1 / (2 * max(relative, 1e-12))
    total = sum(inverse.values())
    return {name: w / total for name, w in inverse.items()}
