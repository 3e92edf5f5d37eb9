"""Allocation: which groups go, given per-group scores and a budget (the fraction `ratio` of prunable parameters).

Attention groups are coarse (one KV head with its query heads, or one query head: hundreds of thousands of
parameters) and MLP channels fine, so a ratio cannot be met by removing the same number of each: the coarser kind
removes round(share x count) groups (the share is the ratio unless the run splits the budget otherwise,
hywia.split) and the finer kind takes whatever budget is left, which lands the achieved ratio within one MLP
channel of the request. `scope="layer"` does this per layer (LLM-Pruner's block-wise default); `scope="global"`
ranks each kind across all selected layers; `scope="joint"` ranks every group of every kind and layer in one list,
each costing its own parameters (FLAP's adaptive structure). Balanced sets (query heads under GQA) leave in steps,
one group from every KV block at a time.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import HywiaError
from .grouping import LayerGroups

# transformers' attention cannot run a layer with zero heads; an MLP with zero channels simply adds nothing.
MIN_KEEP_FLOOR = {"attention": 1, "query": 1, "mlp": 0}
SCOPES = ("layer", "global", "joint")


def _lowest(candidates: list[tuple[float, int, int]], n: int, left: list[int], floors: list[int]) -> list[tuple[int, int]]:
    """The n lowest-scored (set, group) pairs, skipping those that would take a set below its floor."""
    picked = []
    for _, s, g in sorted(candidates):
        if len(picked) == n:
            break
        if left[s] > floors[s]:
            picked.append((s, g))
            left[s] -= 1
    return picked


def check_ratio_and_scope(ratio: float, scope: str) -> None:
    if not 0 < ratio < 1:
        raise HywiaError(f"--ratio {ratio} is out of range: give the fraction of prunable parameters to remove, 0 < ratio < 1")
    if scope not in SCOPES:
        raise HywiaError(f"unknown scope '{scope}': use {', '.join(SCOPES)}")


@dataclass
class _Steps:
    """A balanced LayerGroups as the allocator sees it: step j removes the j-th lowest-scored group of every block
    and scores their sum, so n steps leave every block (every KV group) the same number of groups."""

    layer: int
    kind: str
    count: int  # steps: groups per block
    params_per_group: int  # parameters of one step: one group from every block
    order: torch.Tensor  # [blocks, count] group ids of each block, lowest score first
    blocks: int = 1


def _balanced(s: LayerGroups, score: torch.Tensor) -> tuple[_Steps, torch.Tensor]:
    per_block = score.reshape(s.blocks, -1)
    values, order = per_block.sort(dim=1, stable=True)
    order = order + per_block.shape[1] * torch.arange(s.blocks)[:, None]
    return _Steps(s.layer, s.kind, per_block.shape[1], s.blocks * s.params_per_group, order), values.sum(0)


def allocate(sets: list[LayerGroups], scores: list[torch.Tensor], ratio: float, scope: str = "layer",
             min_keep: int = 1, layer_ratios: dict[int, float] | None = None,
             attention_share: float | None = None) -> list[torch.Tensor]:
    """Group ids to remove from each LayerGroups (lowest scores first), meeting `ratio` of prunable parameters.
    With `layer_ratios` (scope "layer"), layer L removes layer_ratios[L] of its own parameters instead.
    `attention_share` is the fraction of the attention groups removed (default: the ratio, or the layer's ratio);
    MLP takes the rest of the budget either way (hywia.split).
    Balanced sets (query heads) are allocated in steps, one group from every block at a time (`_Steps`)."""
    if any(s.blocks > 1 for s in sets):
        views = [_balanced(s, score) if s.blocks > 1 else (s, score) for s, score in zip(sets, scores)]
        steps = allocate([v for v, _ in views], [t for _, t in views], ratio, scope, min_keep, layer_ratios, attention_share)
        # steps leave in score order, so n removed steps are the first n of every block's ranking
        return [v.order[:, :len(r)].flatten().sort().values if isinstance(v, _Steps) else r for (v, _), r in zip(views, steps)]
    check_ratio_and_scope(ratio, scope)
    floors = [max(min_keep, MIN_KEEP_FLOOR[s.kind]) for s in sets]
    if scope == "joint":
        return _allocate_joint(sets, scores, ratio, floors)
    left = [s.count for s in sets]
    removed: list[list[int]] = [[] for _ in sets]
    # a scope is a bundle of sets that share one parameter budget: one layer, or all layers at once
    bundles = [[i for i, s in enumerate(sets) if s.layer == layer] for layer in dict.fromkeys(s.layer for s in sets)]
    if scope == "global":
        bundles = [list(range(len(sets)))]
    for bundle in bundles:
        kinds = sorted({sets[i].kind for i in bundle}, key=lambda k: -next(sets[i].params_per_group for i in bundle if sets[i].kind == k))
        share = ratio if scope == "global" or layer_ratios is None else layer_ratios.get(sets[bundle[0]].layer, ratio)
        budget = share * sum(sets[i].count * sets[i].params_per_group for i in bundle)
        for position, kind in enumerate(kinds):
            members = [i for i in bundle if sets[i].kind == kind]
            per_group = sets[members[0]].params_per_group
            total = sum(sets[i].count for i in members)
            last = position == len(kinds) - 1
            n = max(0, round(budget / per_group)) if last else round((share if attention_share is None else attention_share) * total)
            if scope == "layer" and n > total - floors[members[0]]:
                raise HywiaError(
                    f"--ratio {share:.3g} would leave layer {sets[members[0]].layer} with fewer than {floors[members[0]]} {kind} groups "
                    f"(it has {total}); lower --ratio" + (" or pass --min-keep 0" if kind == "mlp" else ""))
            candidates = [(value, i, g) for i in members for g, value in enumerate(scores[i].tolist())]
            picked = _lowest(candidates, n, left, floors)
            if len(picked) < n:
                raise HywiaError(f"--ratio {ratio} is impossible: keeping at least {floors[members[0]]} {kind} groups per layer, "
                                 f"only {len(picked)} of the {n} {kind} groups asked for can go; lower --ratio")
            for i, g in picked:
                removed[i].append(g)
            budget -= len(picked) * per_group
    return _as_tensors(removed, ratio)


def _as_tensors(removed: list[list[int]], ratio: float) -> list[torch.Tensor]:
    if not any(removed):
        raise HywiaError(f"--ratio {ratio} is too small to remove a single group; raise --ratio")
    return [torch.tensor(sorted(r), dtype=torch.long) for r in removed]


def _allocate_joint(sets: list[LayerGroups], scores: list[torch.Tensor], ratio: float, floors: list[int]) -> list[torch.Tensor]:
    """One ranking over every group: take the lowest-scored groups while they fit in the parameter budget (a group
    that would overshoot it by more than half the smallest group is passed over for cheaper ones further up)."""
    budget = ratio * sum(s.count * s.params_per_group for s in sets)
    slack = min(s.params_per_group for s in sets) / 2
    left = [s.count for s in sets]
    removed: list[list[int]] = [[] for _ in sets]
    taken = 0
    for _, i, g in sorted((value, i, g) for i, t in enumerate(scores) for g, value in enumerate(t.tolist())):
        cost = sets[i].params_per_group
        if taken + cost <= budget + slack and left[i] > floors[i]:
            removed[i].append(g)
            left[i] -= 1
            taken += cost
    return _as_tensors(removed, ratio)


def round_kept(sets: list[LayerGroups], scores: list[torch.Tensor], removed: list[torch.Tensor], multiple: int) -> list[torch.Tensor]:
    """Move each MLP's kept channel count to the nearest multiple of `multiple` (hardware-friendly matmul widths):
    the lowest-scored kept channels go, or the highest-scored removed ones come back. Attention is untouched (a
    head is already a multiple of head_dim). The achieved ratio moves by less than `multiple` channels a layer."""
    if multiple <= 1:
        return removed
    rounded = []
    for s, score, gone in zip(sets, scores, removed):
        kept = s.count - len(gone)
        target = min(s.count, max(multiple, multiple * round(kept / multiple))) if s.kind == "mlp" else kept
        gone_set = set(gone.tolist())
        if target < kept:
            extra = sorted((v, g) for g, v in enumerate(score.tolist()) if g not in gone_set)[:kept - target]
            gone_set |= {g for _, g in extra}
        elif target > kept:
            back = sorted(((v, g) for g, v in enumerate(score.tolist()) if g in gone_set), reverse=True)[:target - kept]
            gone_set -= {g for _, g in back}
        rounded.append(torch.tensor(sorted(gone_set), dtype=torch.long))
    return rounded
