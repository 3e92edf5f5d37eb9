"""The remove-or-refit stage of a prune: the allocation of the chosen attention share comes out of the model.

Without reconstruction, the allocated groups are removed at once (hywia.removal); with it, layer by layer with the
readers refit (hywia.reconstruct). Where evidence-best's two screens left two shares, both are built (the incumbent,
the masked screen's, beside the model one layer at a time: hywia.aside, never a second model in memory) and judged on
draws of their own, one of the calibration text and one of a second text (hywia.split.judged_share); the loser's
layers are dropped.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .allocate import round_kept
from .aside import Aside
from .grouping import find_groups
from .importance import Scores
from .reconstruct import remove_and_refit
from .removal import remove_groups
from .split import settle, window_losses

if TYPE_CHECKING:
    from collections.abc import Callable

    from .prune import Pruning

Built = tuple[list[torch.Tensor], dict | None]  # the groups removed per set, the walk's output errors if it refit


def build(run: Pruning, scores: Scores, allocation: Callable[[float | None], list[torch.Tensor]],
          shares: list[float | None]) -> tuple[float | None, list[torch.Tensor], dict | None]:
    """Remove the allocation of the one share, or build both of two and keep the judged one; returns the share kept,
    the groups removed per set and the reconstruction's errors (None without reconstruction)."""
    if len(shares) == 1:
        with run.costs.stage("build"):
            return (shares[0], *build_share(run, scores, allocation, shares[0]))
    r, judge_ids = run.recipe, run.judge_ids
    with run.costs.stage("build aside"):  # shares[0] is the masked screen's: the incumbent, built beside the model
        aside = Aside(run.model, lambda m: find_groups(m, r.target, r.layers, r.attention_unit), judge_ids)
        results = {shares[0]: build_share(run, scores, allocation, shares[0], aside)}
        per_window = {shares[0]: aside.losses(r.batch_size)}
    with run.costs.stage("build"):
        results[shares[1]] = build_share(run, scores, allocation, shares[1])
        per_window[shares[1]] = window_losses(run.model, judge_ids, r.batch_size)
    share = settle(run, per_window, shares[0])
    aside.restore() if share == shares[0] else aside.close()  # the incumbent wins: its layers come back from disk
    return (share, *results[share])


def build_share(run: Pruning, scores: Scores, allocation: Callable[[float | None], list[torch.Tensor]], share: float | None,
                aside: Aside | None = None) -> Built:
    """Remove the allocation of `share` from the model (or build it beside the model, `aside`): the groups removed
    (a selecting walk may have replaced them) and the walk's output errors, if it refit."""
    r = run.recipe
    own = run.sets if aside is None else aside.sets
    removed = round_kept(own, scores.per_set, allocation(share), r.round_to)
    if not r.reconstruct:
        remove_groups(run.model, own, removed, run.means)
        return removed, None
    return removed, remove_and_refit(run.model, own, removed, run.walk_ids, r.batch_size, intercept=r.compensate,
                                     select=run.select, device=run.memory.device, aside=aside)
