"""The calibrate stage of a prune: the calibration draws and the statistics a criterion needs, only those.

Three draws of windows from the calibration text, each seeded apart so none repeats another: the calibration draw
(seed) that scores are computed on, the held-out draw (seed + HELDOUT_SEED) on which choices that weigh evidence are
made (evidence fusion, the evidence kind split), and the judge draw (seed + JUDGE_SEED) on which evidence-best compares
its two built models. Statistics: per-weight gradients and the empirical Fisher (gradient criteria), the inputs of
the output projections (activation criteria, bias compensation, held-out second moments).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .data import calibration_ids
from .errors import HywiaError
from .grouping import LayerGroups
from .importance import Criterion, Memory, Scores, Stats, collect_inputs, collect_stats


HELDOUT_SEED = 1_000_003  # the held-out draw uses seed + this, so it never repeats the calibration draw's seed
JUDGE_SEED = 2_000_003  # evidence-best's judge draw uses seed + this: neither the calibration nor the held-out draw


def calibration_stats(model: nn.Module, sets: list[LayerGroups], criterion: Criterion, samples: torch.Tensor | None,
                      seed: int, batch_size: int, compensate: bool = False, have: Stats | None = None,
                      memory: Memory = Memory()) -> Stats:
    """The statistics `criterion` needs (and input means to `compensate` with), only those: no backward pass for a
    criterion that needs none. Parts already in `have` (filled in place) are not collected again. With
    `memory.layers_per_pass`, gradients are gathered in sweeps over that many layers' weights at a time (each sweep
    a full forward and a backward that stops at its layers), so only their gradient buffers exist at once."""
    stats = have if have is not None else Stats(seed=seed)
    fisher = criterion.needs_fisher or criterion.per_sample is not None
    names = {slot.name for s in sets for slot in s.slots}
    have_sums = {key[0] for key in stats.group_sums if key[-1] == (2 if fisher else 1)} if memory.store == "groups" else set()
    have_weights = names <= set(stats.grad) and (names <= set(stats.fisher) or not fisher)
    if (criterion.needs_grad or fisher) and not (have_weights or names <= have_sums):
        per_sample = (lambda grads, scale: criterion.per_sample(sets, grads, scale)) if criterion.per_sample else None
        layers = sorted({s.layer for s in sets})
        step = memory.layers_per_pass or len(layers)
        if per_sample is not None and step < len(layers):
            raise HywiaError("--layers-per-pass needs a criterion that scores layers from their own gradients; "
                             "SAAP's per-sample uncertainty needs every layer's gradient of a sample at once: leave it out")
        for chunk in (set(layers[i:i + step]) for i in range(0, len(layers), step)):
            chunk_names = {slot.name for s in sets if s.layer in chunk for slot in s.slots}
            collected = collect_stats(model, samples, chunk_names, fisher=fisher, batch_size=batch_size, seed=seed,
                                      per_sample=per_sample, memory=memory, sets=sets)
            stats.group_sums.update(collected.group_sums)
            for source, target in ((collected.grad, stats.grad), (collected.fisher, stats.fisher)):
                target.device = source.device
                for name in source:
                    dict.__setitem__(target, name, dict.__getitem__(source, name))
            stats.samples = collected.samples
    if (criterion.needs_inputs or compensate) and not stats.inputs:
        readers = {s.reader.name for s in sets}
        stats.inputs = collect_inputs(model, samples, readers, batch_size, sequential=memory.sequential, device=memory.device)
    return stats


def heldout_stats(model: nn.Module, tokenizer, sets: list[LayerGroups], stats: Stats, moments: bool, calib: str | torch.Tensor,
                  samples: int, seq_len: int, seed: int, data_dir: str | None, batch_size: int, spill: Path | None = None) -> None:
    """A second draw of calibration windows (the same tensor when calibration came as ids) into `stats.heldout_ids`,
    and with `moments` the full input second moments of every output projection (o_proj, down_proj) on it, for
    choices that weigh evidence on held-out data (evidence fusion, the evidence kind split). Kept parts are kept."""
    if stats.heldout_ids is None:
        stats.heldout_ids, _ = calibration_ids(model, tokenizer, calib, samples, seq_len, seed + HELDOUT_SEED, data_dir)
    if moments and not stats.heldout:
        stats.heldout = collect_inputs(model, stats.heldout_ids, {s.reader.name for s in sets}, batch_size, outer=True, spill=spill)


def score_groups(model: nn.Module, sets: list[LayerGroups], criterion: Criterion, samples: torch.Tensor | None,
                 seed: int, batch_size: int, options: dict | None = None) -> Scores:
    """Per-group scores of every LayerGroups under `criterion` (statistics collected only if it needs them)."""
    stats = calibration_stats(model, sets, criterion, samples, seed, batch_size, criterion.compensates)
    with torch.no_grad():
        return criterion.score(sets, stats, options or {})
