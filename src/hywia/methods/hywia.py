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

`fusion="evidence"` chooses one alpha per layer and kind from ALPHAS by evidence instead: the alpha whose fused
ranking, cut at the layer's share, removes the groups whose loss the layer's output feels least on a held-out draw
of calibration windows (the expected squared error of the output projection, tr(W_R E[x_R x_R^T] W_R^T), centred
when removal compensates with the means). It costs one forward pass and a few small matrix products per layer.

`hywia-adaptive` is that fusion with the structure and allocation that measured best (docs/method.md):
query heads as the attention unit, removed inputs' means folded into the biases, global scope, `--reconstruct obs`:
the scores decide how many groups each layer loses, OBS on the already-pruned layers' outputs decides which, and the
weights that read them are refit with the biases (hywia.reconstruct), and the split of the budget between attention
and MLP by `evidence-best`: screened on held-out calibration windows both masked and refit, and where the screens
disagree both models built and judged (hywia.split; each chosen on held-out text, docs/reconstruction.md).
"""
from __future__ import annotations

import torch

from ..errors import HywiaError
from ..fusion import NORMALISATIONS, AttentionFusion, normalise_per_kind
from ..grouping import LayerGroups
from ..importance import Criterion, Moments, Scores, Stats, register, taylor_sums

FUSIONS = ("attention", "fixed", "evidence")
ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)  # evidence fusion's candidates: coarse only ... fine only


def granularities(s: LayerGroups, stats: Stats) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(fine per projection [n, m], coarse per projection [n, m], fine [n], coarse [n]) of one layer's groups."""
    fine_parts, signed_parts = 0.5 * taylor_sums(s, stats, 2), taylor_sums(s, stats, 1)
    return fine_parts, signed_parts.abs(), fine_parts.sum(1), signed_parts.sum(1).abs()


def fusion_options(options: dict) -> tuple[str, float, int, str]:
    """(fusion, fixed alpha, d_model, normalize) from the user's options, refusing bad values before any work."""
    fusion = options.get("fusion", "attention")
    if fusion not in FUSIONS:
        raise HywiaError(f"unknown fusion '{fusion}': use {', '.join(FUSIONS)}")
    fixed_alpha = options.get("alpha")
    if fusion != "fixed" and fixed_alpha is not None:
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


def output_error(s: LayerGroups, gone: torch.Tensor, moments: Moments, centred: bool) -> float:
    """Expected squared error of the layer's output projection when the input columns of groups `gone` are dropped
    (or, `centred`, replaced by their calibration means)."""
    module = s.reader.module
    columns = s.reader.indices(gone)
    second = moments.full().cpu()[columns][:, columns] / moments.count  # E[x x^T] of these columns, not of all
    if centred:
        mean = moments.mean.cpu()[columns]
        second = second - torch.outer(mean, mean)
    w = module.weight.detach().double()[:, columns.to(module.weight.device)].cpu()
    return ((w @ second) * w).sum().item()


def lowest_groups(s: LayerGroups, score: torch.Tensor, share: float) -> torch.Tensor:
    """The groups a ranking by `score` removes at `share` of the layer's groups (balanced sets: per block)."""
    per_block = score.reshape(s.blocks, -1)
    n = min(max(1, round(share * per_block.shape[1])), per_block.shape[1] - 1) if per_block.shape[1] > 1 else 0
    order = per_block.argsort(dim=1, stable=True)[:, :n]
    return (order + per_block.shape[1] * torch.arange(s.blocks)[:, None]).flatten()


def evidence_alpha(s: LayerGroups, fine: torch.Tensor, coarse: torch.Tensor, moments: Moments, share: float,
                   centred: bool) -> float:
    """The alpha of ALPHAS whose fused ranking removes what the layer's output misses least (ties: nearest 0.5)."""
    errors = {a: output_error(s, lowest_groups(s, a * fine + (1 - a) * coarse, share), moments, centred) for a in ALPHAS}
    return min(ALPHAS, key=lambda a: (errors[a], abs(a - 0.5)))


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
        elif fusion == "evidence":
            reader = s.reader.name
            share = float(options["ratio"])
            alpha = torch.full_like(fine, evidence_alpha(s, fine, coarse, stats.heldout[reader].loaded(), share,
                                                              bool(options.get("compensate"))))  # one read per layer, not per candidate
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
                            check=fusion_options, heldout=lambda options: options.get("fusion") == "evidence", group_sums=True))


def _adaptive(options: dict) -> dict:
    return {**options, "fusion": "evidence"}


# hywia's best measured configuration (docs/RESULTS.md, "HyWIA's own method" and "Updating the kept weights"): evidence
# fusion over query heads with bias compensation, one ranking per kind across layers (per-layer ratios), OBS selection
# with the refit, and the attention/MLP split by evidence-best (`--reconstruct no` turns the refit off and the split
# falls back to the masked evidence); its gradient statistics are summed per group as backward gives them
# (`--stats-store groups`: the same scores to float rounding, no per-weight store). `--method hywia` stays the paper's.
register("hywia-adaptive", Criterion(lambda sets, stats, options: fuse(sets, stats, _adaptive(options)), needs_grad=True,
                                     needs_fisher=True, options=("normalize",), check=lambda options: fusion_options(_adaptive(options)),
                                     heldout=lambda options: True, scope="global", compensates=True, attention_unit="query",
                                     kind_split="evidence-best", reconstructs="obs", group_sums=True, store="groups"))
