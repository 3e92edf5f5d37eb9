"""SAAP, structurally-aware adaptive pruning (Zheng et al., arXiv 2412.15127): the fine and coarse Taylor scores
HyWIA uses, fused with weights set by their homoscedastic uncertainty, and a ranking of layers that decides how
much each layer loses. Its third part, group fine-tuning, is `hywia finetune --groups N` (hywia/finetune.py).

fusion:  score = w_fine * fine + w_coarse * coarse per group, both normalised over their pool (as HyWIA's), with
         w_k proportional to 1 / (2 sigma_k^2) and sigma_k^2 the relative variance of estimate k over calibration
         samples (`hywia.fusion.uncertainty_weights`), one pair of weights per kind (attention, MLP).
layers:  a layer's importance is the mean fused score of its groups; layers are ranked by it and the pruning
         ratio is spread linearly over the ranking, the least important layer losing ratio * (1 + spread) and
         the most important ratio * (1 - spread), so the mean over layers (all of one size) stays `ratio`.
What the paper leaves unstated and how it was chosen is in docs/companions.md.
"""
from __future__ import annotations

import torch

from ..errors import HywiaError
from ..fusion import NORMALISATIONS, normalise_per_kind, uncertainty_weights
from ..grouping import LayerGroups
from ..importance import Criterion, Moments, Scores, Stats, register
from .hywia import granularities

DEFAULT_SPREAD = 1.0


def saap_options(options: dict) -> tuple[str, float]:
    normalize = options.get("normalize", "rank")
    if normalize not in NORMALISATIONS:
        raise HywiaError(f"unknown --normalize '{normalize}': use {' or '.join(NORMALISATIONS)}")
    spread = float(options.get("spread", DEFAULT_SPREAD))
    if not 0 <= spread <= 1:
        raise HywiaError(f"--spread {spread} is out of range: 0 (same ratio in every layer) <= spread <= 1")
    return normalize, spread


def per_sample_scores(sets: list[LayerGroups], grads: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """One sample's fine score and signed coarse sum of every group, all sets concatenated: {"fine", "signed"}."""
    fine = [s.sum(lambda slot: 0.5 * slot.param.detach().float().square() * (grads[slot.name].float() * scale).square())
            for s in sets]
    signed = [s.sum(lambda slot: slot.param.detach().float() * grads[slot.name].float() * scale) for s in sets]
    return {"fine": torch.cat(fine), "signed": torch.cat(signed)}


def _part(moments: Moments, index: torch.Tensor) -> Moments:
    return Moments(moments.count, moments.total[index], moments.squares[index])


def layer_ratios(sets: list[LayerGroups], fused: list[torch.Tensor], ratio: float, spread: float) -> dict[int, float]:
    """Each layer's pruning ratio from the ranking of layers by mean fused score (least important: pruned most).
    The spread is capped so that no layer is asked for more than (1 + ratio) / 2 of its parameters."""
    layers = sorted({s.layer for s in sets})
    importance = {layer: torch.cat([f for s, f in zip(sets, fused) if s.layer == layer]).mean().item() for layer in layers}
    spread = min(spread, 0.5 * (1 - ratio) / ratio)
    order = sorted(layers, key=lambda layer: importance[layer])
    if len(order) == 1:
        return {order[0]: ratio}
    return {layer: ratio * (1 + spread * (1 - 2 * position / (len(order) - 1))) for position, layer in enumerate(order)}


def saap(sets: list[LayerGroups], stats: Stats, options: dict) -> Scores:
    """SAAP scores of every set, the per-kind weights of each estimate, and each layer's ratio (`options['ratio']`)."""
    normalize, spread = saap_options(options)
    raw = [granularities(s, stats) for s in sets]
    fine_raw, coarse_raw = [r[2] for r in raw], [r[3] for r in raw]
    fines, coarses = normalise_per_kind(sets, fine_raw, normalize), normalise_per_kind(sets, coarse_raw, normalize)
    offsets = torch.tensor([0] + [s.count for s in sets]).cumsum(0).tolist()
    details: dict[str, list[torch.Tensor]] = {"fine": fines, "coarse": coarses, "weight_fine": [], "fused": []}
    weights: dict[str, dict[str, float]] = {}
    for kind in dict.fromkeys(s.kind for s in sets):
        members = [i for i, s in enumerate(sets) if s.kind == kind]
        index = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in members])
        weights[kind] = uncertainty_weights(
            {"fine": torch.cat([fine_raw[i] for i in members]), "coarse": torch.cat([coarse_raw[i] for i in members])},
            {"fine": _part(stats.samples["fine"], index), "coarse": _part(stats.samples["signed"], index)})
    for s, fine, coarse in zip(sets, fines, coarses):
        w = weights[s.kind]
        details["weight_fine"].append(torch.full_like(fine, w["fine"]))
        details["fused"].append(w["fine"] * fine + w["coarse"] * coarse)
    ratios = layer_ratios(sets, details["fused"], float(options["ratio"]), spread)
    return Scores(details["fused"], details, layer_ratios=ratios)


register("saap", Criterion(saap, needs_grad=True, needs_fisher=True, options=("normalize", "spread"),
                           check=saap_options, per_sample=per_sample_scores))
