"""One-shot sensitivity-aware mixed sparsity (Shao, Liu, Qian et al., arXiv 2310.09499): SparseGPT with a sparsity
per layer (or per matrix) set from its Hessian-based sensitivity, such that the parameter-weighted mean sparsity is
the target exactly.

Sensitivity of a unit (a decoder layer, or one matrix) = the mean over its weights of F_ii * w_i^2, the
second-order (OBD) estimate of the loss increase per weight removed, with F the diagonal empirical Fisher of the
causal-LM loss (a Gauss-Newton approximation of the Hessian: the paper estimates the Hessian trace with
Hutchinson's method, which needs a double backward through attention; see docs/companions.md). Units are ranked
by it and their sparsities spread linearly over the ranking, target + spread for the least sensitive down to
target - spread for the most, then shifted by one constant so the weighted mean meets the target, and rounded
to whole weights so that it does so exactly (to the weight, not to a rounding of each matrix).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import HywiaError
from ..importance import collect_stats
from ..sparsify import Sparsifier, register
from .sparsegpt import check as check_wbits
from .sparsegpt import sparsegpt

DEFAULT_SPREAD = 0.1
SENSITIVITY_SAMPLES = 8
MAX_SPARSITY = 0.99


def check(options: dict) -> None:
    check_wbits(options)
    spread = float(options.get("spread", DEFAULT_SPREAD))
    if not 0 <= spread < 0.5:
        raise HywiaError(f"--spread {spread} is out of range: 0 (uniform sparsity) <= spread < 0.5")
    if options.get("granularity", "layer") not in ("layer", "matrix"):
        raise HywiaError(f"--granularity {options['granularity']!r}: use layer or matrix")
    if int(options.get("sensitivity_samples", SENSITIVITY_SAMPLES)) < 1:
        raise HywiaError("--sensitivity-samples must be at least 1")


def sensitivities(model: nn.Module, matrices: dict[str, nn.Linear], ids: torch.Tensor, samples: int) -> dict[str, float]:
    """Mean F_ii w_i^2 of every matrix, from per-sample gradients on the first `samples` calibration windows."""
    stats = collect_stats(model, ids[:samples], {f"{name}.weight" for name in matrices}, fisher=True, batch_size=1)
    return {name: (stats.fisher[f"{name}.weight"] * m.weight.detach().float().square()).mean().item() for name, m in matrices.items()}


def unit_of(name: str, granularity: str) -> str:
    """'model.layers.3.mlp.up_proj' -> 'model.layers.3' (layer) or itself (matrix)."""
    if granularity == "matrix":
        return name
    parts = name.split(".")
    return ".".join(parts[:next(i for i, p in enumerate(parts) if p.isdigit()) + 1])


def allocate_sparsity(sizes: dict[str, int], sensitivity: dict[str, float], target: float, spread: float,
                      granularity: str = "layer") -> dict[str, float]:
    """Per-matrix sparsity: the least sensitive unit gets target + spread, the most sensitive target - spread
    (linear in rank), all shifted so that sum(size * sparsity) = round(target * sum(size)) zeros exactly."""
    units: dict[str, list[str]] = {}
    for name in sizes:
        units.setdefault(unit_of(name, granularity), []).append(name)
    unit_size = {u: sum(sizes[n] for n in names) for u, names in units.items()}
    unit_sens = {u: sum(sensitivity[n] * sizes[n] for n in names) / unit_size[u] for u, names in units.items()}
    order = sorted(units, key=lambda u: unit_sens[u])
    last = max(len(order) - 1, 1)
    base = {u: target + spread * (1 - 2 * position / last) for position, u in enumerate(order)} if len(order) > 1 else {order[0]: target}
    total = sum(unit_size.values())

    def mean_at(shift: float) -> float:
        return sum(unit_size[u] * min(max(base[u] + shift, 0.0), MAX_SPARSITY) for u in units) / total

    low, high = -1.0, 1.0
    for _ in range(100):  # the mean is monotone in the shift: bisect it onto the target
        mid = (low + high) / 2
        low, high = (mid, high) if mean_at(mid) < target else (low, mid)
    shift = (low + high) / 2
    wanted = {n: sizes[n] * min(max(base[unit_of(n, granularity)] + shift, 0.0), MAX_SPARSITY) for n in sizes}
    counts = {n: math.floor(w) for n, w in wanted.items()}
    missing = round(target * total) - sum(counts.values())
    for n in sorted(sizes, key=lambda n: wanted[n] - counts[n], reverse=True)[:max(missing, 0)]:
        counts[n] += 1
    return {n: counts[n] / sizes[n] for n in sizes}


def allocate(model: nn.Module, matrices: dict[str, nn.Linear], ids: torch.Tensor, target: float, options: dict) -> dict[str, float]:
    sensitivity = sensitivities(model, matrices, ids, int(options.get("sensitivity_samples", SENSITIVITY_SAMPLES)))
    return allocate_sparsity({n: m.weight.numel() for n, m in matrices.items()}, sensitivity, target,
                             float(options.get("spread", DEFAULT_SPREAD)), options.get("granularity", "layer"))


register("mixed", Sparsifier(sparsegpt, needs_hessian=True, allocate=allocate, takes_pattern=False, check=check,
                             options=("wbits", "spread", "granularity", "sensitivity_samples")))
