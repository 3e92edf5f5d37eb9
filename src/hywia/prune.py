"""Rank, allocate and physically remove groups: load -> groups -> statistics -> scores -> allocation -> removal.

`ratio` is the fraction of the *prunable* parameters (the grouped projections of the selected layers) to remove;
`scope` says over what the budget is shared (hywia.allocate), `kind_split` how it splits between attention and
MLP (hywia.split). Removal replaces every member Linear by a smaller one (hywia.removal), so the result is a dense
model; with `reconstruct`, removal happens layer by layer with the weights that read the removed groups refit
(hywia.reconstruct).
"""
from __future__ import annotations

import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .adapters import adapter_for
from .aside import Aside
from .costs import Costs, release_memory
from .allocate import allocate, check_ratio_and_scope, round_kept
from .data import calibration_ids
from .errors import HywiaError
from .finite import check_tensor, check_weights
from .options import check_values
from .grouping import ATTENTION_UNITS, LayerGroups, find_groups
from .importance import Criterion, Memory, Scores, Stats, collect_inputs, collect_stats, get_criterion
from .reconstruct import obs_select, reader_moments, refitted, remove_and_refit
from .removal import kept_groups, layer_widths, remove_groups  # noqa: F401  (layer_widths: part of this module's API)
from .split import REFIT_SPLITS, SPLITS, attention_kind, check_split, choose_attention_share, judged_share, window_losses


@dataclass
class PruneReport:
    method: str
    ratio: float
    achieved_ratio: float
    scope: str
    target: str
    layers: list[int]
    params_before: int
    params_after: int
    prunable_before: int
    prunable_after: int
    per_layer: list[dict]
    kept: dict[str, list[int]]
    calibration: dict
    seed: int
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    extra: dict = field(default_factory=dict)
    # intermediate per-group scores by name ("fine", "alpha", ...) and "LAYER.KIND": kept out of JSON, saved as safetensors
    scores: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "scores"}


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def check_options(method: str, ratio: float, scope: str | None, target: str, method_options: dict | None = None,
                  round_to: int = 1, attention_unit: str | None = None, kind_split: str | float | None = None,
                  reconstruct: bool | str | None = None, reconstruct_samples: int | None = None,
                  judge_samples: int | None = None) -> None:
    """Validate what can be validated before a model is loaded, so a typo costs no time. `reconstruct_samples` and
    `judge_samples` are the values the user gave (None: not given), refused where they would change nothing."""
    if reconstruct not in (None, True, False, "obs"):
        raise HywiaError(f"unknown --reconstruct '{reconstruct}': use yes (refit the kept weights), obs (OBS chooses the groups "
                         "too) or no")
    if attention_unit is not None and attention_unit not in ATTENTION_UNITS:
        raise HywiaError(f"unknown --attention-unit '{attention_unit}': use kv (whole KV groups) or query (query heads, balanced per KV group)")
    if round_to < 1:
        raise HywiaError(f"--round-to {round_to} must be at least 1")
    criterion = get_criterion(method, method_options)
    if criterion.select is not None and reconstruct is False:
        raise HywiaError(f"--method {method} chooses its groups during its reconstruction walk: leave out --reconstruct no")
    check_ratio_and_scope(ratio, scope or criterion.scope)
    refits = criterion.reconstructs if reconstruct is None else reconstruct
    kind_split = own_split(criterion, reconstruct) if kind_split is None else kind_split
    check_split(kind_split, scope or criterion.scope)
    if kind_split in REFIT_SPLITS and not refits:
        raise HywiaError(f"--kind-split {kind_split} weighs candidates as reconstruction builds them: add --reconstruct obs "
                         "(or yes), or use --kind-split evidence")
    if reconstruct_samples is not None and not refits:
        raise HywiaError(f"--reconstruct-samples sets the windows a reconstruction fits on, and --method {method} does not "
                         "reconstruct here: add --reconstruct obs (or yes), or leave --reconstruct-samples out")
    if judge_samples is not None and kind_split != "evidence-best":
        raise HywiaError("--judge-samples sets the windows that judge --kind-split evidence-best's two built models: add "
                         "--kind-split evidence-best, or leave --judge-samples out")
    if target not in ("attention", "mlp", "both"):
        raise HywiaError(f"unknown target '{target}': use attention, mlp or both")


def own_split(criterion: Criterion, reconstruct: bool | str | None) -> str:
    """The criterion's default --kind-split for this run: a split that weighs refit candidates (hywia-adaptive's
    evidence-best) falls back to "evidence" where the run does not reconstruct, so `--reconstruct no` alone gives the
    choose-only method back."""
    refits = criterion.reconstructs if reconstruct is None else reconstruct
    return criterion.kind_split if refits or criterion.kind_split not in REFIT_SPLITS else "evidence"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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
    if (criterion.needs_grad or fisher) and not (names <= set(stats.grad) and (names <= set(stats.fisher) or not fisher)):
        per_sample = (lambda grads, scale: criterion.per_sample(sets, grads, scale)) if criterion.per_sample else None
        layers = sorted({s.layer for s in sets})
        step = memory.layers_per_pass or len(layers)
        if per_sample is not None and step < len(layers):
            raise HywiaError("--layers-per-pass needs a criterion that scores layers from their own gradients; "
                             "SAAP's per-sample uncertainty needs every layer's gradient of a sample at once: leave it out")
        for chunk in (set(layers[i:i + step]) for i in range(0, len(layers), step)):
            chunk_names = {slot.name for s in sets if s.layer in chunk for slot in s.slots}
            collected = collect_stats(model, samples, chunk_names, fisher=fisher, batch_size=batch_size, seed=seed,
                                      per_sample=per_sample, memory=memory)
            for source, target in ((collected.grad, stats.grad), (collected.fisher, stats.fisher)):
                target.device = source.device
                for name in source:
                    dict.__setitem__(target, name, dict.__getitem__(source, name))
            stats.samples = collected.samples
    if (criterion.needs_inputs or compensate) and not stats.inputs:
        readers = {s.reader.name for s in sets}
        stats.inputs = collect_inputs(model, samples, readers, batch_size, sequential=memory.sequential, device=memory.device)
    return stats


HELDOUT_SEED = 1_000_003  # the held-out draw uses seed + this, so it never repeats the calibration draw's seed
JUDGE_SEED = 2_000_003  # evidence-best's judge draw uses seed + this: neither the calibration nor the held-out draw


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


def kept_params_per_layer(sets: list[LayerGroups], removed: list[torch.Tensor]) -> dict[int, int]:
    kept: dict[int, int] = {}
    for s, r in zip(sets, removed):
        kept[s.layer] = kept.get(s.layer, 0) + (s.count - len(r)) * s.params_per_group
    return kept


def compare_allocations(sets: list[LayerGroups], details: dict[str, list[torch.Tensor]], ratio: float,
                        min_keep: int, attention_share: float | None = None) -> dict[str, dict[str, dict[int, int]]]:
    """Kept parameters per layer if each kept score alone drove the pruning, under both scopes and the run's split
    of the budget between attention and MLP (for figures)."""
    compared: dict[str, dict[str, dict[int, int]]] = {}
    for scope in ("layer", "global"):
        compared[scope] = {}
        for name in ("fine", "coarse", "fused"):
            if name in details:
                try:
                    compared[scope][name] = kept_params_per_layer(sets, allocate(sets, details[name], ratio, scope, min_keep,
                                                                                  attention_share=attention_share))
                except HywiaError:  # e.g. a global ranking by one granularity alone that would empty a layer
                    pass
    return compared


def prune(model: nn.Module, tokenizer=None, method: str = "hywia-adaptive", ratio: float = 0.2,
          calib: str | torch.Tensor = "wikitext2", samples: int = 10, seq_len: int = 128, scope: str | None = None,
          target: str = "both", layers: str | None = None, min_keep: int = 1, seed: int = 0,
          data_dir: str | None = None, batch_size: int = 4, round_to: int = 1, attention_unit: str | None = None,
          compensate: bool | None = None, kind_split: str | float | None = None, reconstruct: bool | str | None = None,
          reconstruct_samples: int = 128, judge_samples: int = 100, stats: Stats | None = None, memory: Memory | None = None, **method_options) -> tuple[nn.Module, PruneReport]:
    """Prune `model` in place and return it with a report.

    `calib` is a dataset name or file path (tokenized with `tokenizer`), or token ids [n, seq_len] as a tensor.
    `layers` is 'START:END' over decoder blocks (default all). See the module docstring for `ratio` and `scope`
    (default: the method's own, `joint` for flap and `layer` for the others).
    `round_to` rounds every layer's kept MLP channels to a multiple of it (`round_kept`).
    `attention_unit` prunes attention by whole KV groups ("kv") or by query heads, balanced per KV group ("query");
    default: the method's own ("query" for hywia-adaptive, where the model has grouped-query attention; else "kv").
    `compensate` folds the removed inputs' calibration means into output biases (default: the criterion's own
    choice, True for flap only); any criterion can use it, the means cost one forward pass.
    `kind_split` splits the budget between attention and MLP: "ratio" (the same fraction of each), a number (the
    fraction of attention removed), or "evidence" (the candidate with the lowest held-out calibration loss,
    hywia.split, each candidate's groups removed and nothing refit), "evidence-refit" (with `reconstruct`: each
    candidate refit one-shot on the reconstruction draw, `hywia.reconstruct.refitted`, as the walk will build it),
    "evidence-best" (with `reconstruct`: both screens; where they disagree, both shares are built by the walk, the
    masked screen's beside the model, one layer at a time (`hywia.aside`: never a second model in memory, its pruned
    layers kept on disk until the verdict), and both are judged on a third draw
    of `judge_samples` windows from `calib` (seed `seed` + JUDGE_SEED): the masked share is kept unless the refit one's
    loss is lower by more than `hywia.split.JUDGE_MARGIN` standard errors of the paired per-window difference, since
    two draws ranked built models 1-2% apart both ways, docs/reconstruction.md);
    default: the criterion's own ("evidence-best" for hywia-adaptive, "evidence" when it does not reconstruct, "ratio"
    for the others).
    `reconstruct` refits the weights that read the removed groups (o_proj, down_proj) by least squares on the
    calibration inputs, layer by layer on the already-pruned layers' outputs (hywia.reconstruct), jointly with their
    biases when `compensate` is on too; default: the criterion's own ("obs" for hywia-adaptive, True for slimgpt, off for the others). "obs" keeps how many
    groups the criterion's allocation removes from each set but lets Optimal Brain Surgeon errors on the pruned
    prefix choose which (SlimGPT's selection, `hywia.reconstruct.obs_select`) before the refit. It draws its own
    `reconstruct_samples` windows of `seq_len` from `calib` (seed `seed`): a refit of a layer with more input
    features than calibration tokens would fit noise (SmolLM2's down_proj reads 1,536 features; 10 x 128 tokens
    made the refit model worse than removal alone, 128 x 128 better, docs/reconstruction.md).
    `stats`, an empty `Stats(seed=seed)` or one a previous call filled, is filled in place and reused: a comparison of
    several options of one criterion on one dense model and calibration draw collects gradients once (the caller
    keeps model, calibration and seed the same; a per-sample criterion like SAAP's needs its own).
    `memory` (`hywia.importance.Memory`) trades time for peak memory while statistics are gathered: gradient sweeps
    over a few layers at a time, accumulators kept in bfloat16 or on the CPU, activation checkpointing, and
    forward-only statistics walked one layer at a time; the scores are the same (up to the store's rounding).
    `method_options` go to the criterion (for `hywia`: fusion="attention"|"fixed", alpha, fusion_dim).
    The report's `scores` holds the criterion's intermediate per-group scores (HyWIA: fine, coarse, alpha, fused).
    """
    start, costs = time.perf_counter(), Costs()
    method_options = {k: v for k, v in method_options.items() if v is not None}
    check_values(samples=samples, seq_len=seq_len, min_keep=min_keep, seed=seed, batch_size=batch_size, round_to=round_to,
                 reconstruct_samples=reconstruct_samples, judge_samples=judge_samples)
    check_options(method, ratio, scope, target, method_options, round_to, attention_unit, kind_split, reconstruct)
    memory = memory or Memory()
    memory.check()
    criterion = get_criterion(method, method_options)
    scope = scope or criterion.scope
    kind_split = own_split(criterion, reconstruct) if kind_split is None else kind_split
    if any(p.device.type == "meta" for p in model.parameters()):
        raise HywiaError("some weights are offloaded (on the meta device): hywia prunes weights in place, so give every "
                         "layer a GPU or the CPU (--device auto without disk offload; --layers-per-pass and --stats-device cpu save memory)")
    check_weights(model, "prune a model whose weights are all finite (NaN would spread through compensation and scores)")
    if attention_unit is None:
        attention_unit = criterion.attention_unit if adapter_for(model.config).query is not None else "kv"
    sets = find_groups(model, target, layers, attention_unit)
    params_before = count_params(model)
    prunable_before = sum(s.count * s.params_per_group for s in sets)
    ids, calib_record = None, {"samples": 0}
    if criterion.needs_data:
        ids, calib_record = calibration_ids(model, tokenizer, calib, samples, seq_len, seed, data_dir)
    compensate = criterion.compensates if compensate is None else compensate
    reconstruct = criterion.reconstructs if reconstruct is None else reconstruct
    if compensate and ids is None:
        ids, calib_record = calibration_ids(model, tokenizer, calib, samples, seq_len, seed, data_dir)
    if stats is not None and stats.seed != seed:
        raise HywiaError(f"statistics of seed {stats.seed} cannot be reused for seed {seed}")
    reused = stats is not None
    with costs.stage("calibrate"):
        stats = calibration_stats(model, sets, criterion, ids, seed, batch_size, compensate, stats, memory)
        moments = criterion.heldout is not None and criterion.heldout(method_options)
        split_by_evidence = kind_split in SPLITS[1:] and attention_kind(sets) is not None
        if moments or split_by_evidence:
            heldout_stats(model, tokenizer, sets, stats, moments, calib, samples, seq_len, seed, data_dir, batch_size, stats.spill)
            calib_record["heldout_seed"] = seed + HELDOUT_SEED
    with costs.stage("score"), torch.no_grad():  # a criterion that shares the ratio out over layers (SAAP) reads it from its options
        scores = criterion.score(sets, stats, {**method_options, "ratio": ratio, "compensate": compensate})
    for s, score in zip(sets, scores.per_set):
        check_tensor(score, f"the {method} scores of layer {s.layer} ({s.kind})", "the calibration statistics overflowed; "
                     "calibrate in --dtype float32, or with fewer --samples")
    means = {name: moments.mean for name, moments in stats.inputs.items()} if compensate else None
    allocation = lambda share: allocate(sets, scores.per_set, ratio, scope, min_keep, scores.layer_ratios, share)  # noqa: E731
    stored = [t for store in (stats.grad, stats.fisher) for t in dict.values(store)]
    stats_mb = sum(t.numel() * t.element_size() for t in stored) / 2**20
    if not reused:  # per-weight gradients and Fisher are spent once scored: free them before the walks
        stats.grad.clear()
        stats.fisher.clear()
        del stored
        release_memory()
    extra: dict = {"options": method_options, "round_to": round_to, "attention_unit": attention_unit, "compensate": compensate,
                   "reconstruct": reconstruct, "kind_split": kind_split, "memory": asdict(memory), "stats_mb": stats_mb}
    share = None if kind_split in SPLITS else float(kind_split)
    select = criterion.select or (obs_select if reconstruct == "obs" else None)
    walk_ids = None
    if reconstruct:
        walk_ids, calib_record["reconstruct"] = calibration_ids(model, tokenizer, calib, reconstruct_samples, seq_len, seed, data_dir)

    def build(share: float | None, aside: Aside | None = None) -> tuple[list[torch.Tensor], dict | None]:
        """Remove the allocation of `share` from the model (or build it beside the model, `aside`): the groups
        removed (a selecting walk may have replaced them) and the walk's output errors, if it refit."""
        own = sets if aside is None else aside.sets
        removed = round_kept(own, scores.per_set, allocation(share), round_to)
        if not reconstruct:
            remove_groups(model, own, removed, means)
            return removed, None
        return removed, remove_and_refit(model, own, removed, walk_ids, batch_size, intercept=compensate, select=select,
                                         device=memory.device, aside=aside)

    before_layer = {(s.layer, s.kind): s.count * s.params_per_group for s in sets}
    shares = [share]
    if split_by_evidence:
        with costs.stage("split"):
            screens: dict[str, Callable | None] = {}
            if kind_split in ("evidence", "evidence-best"):
                screens["masked"] = None
            if kind_split in REFIT_SPLITS:  # weigh each candidate as the walk will build it: refit, one-shot
                inputs = reader_moments(model, sets, walk_ids, batch_size, memory.device, stats.spill)
                screens["refit"] = lambda gone: refitted(sets, gone, inputs, compensate, select)
            screened = {}
            for weighed, candidate in screens.items():
                chosen, losses = choose_attention_share(allocation, model, sets, ratio, stats.heldout_ids, means, batch_size, candidate)
                screened[weighed] = {"attention_share": chosen, "heldout_loss": losses}
            shares = list(dict.fromkeys(s["attention_share"] for s in screened.values()))
            extra["kind_split_evidence"] = {**screened[next(iter(screened))], "candidates": "+".join(screened)}
            if len(screened) > 1:
                extra["kind_split_evidence"]["screened"] = screened
            inputs = None
    if len(shares) == 2:  # evidence-best, the screens disagree: build both, judge them on a draw of their own
        judge_ids, calib_record["judge"] = calibration_ids(model, tokenizer, calib, judge_samples, seq_len, seed + JUDGE_SEED, data_dir)
        calib_record["judge"]["seed"] = seed + JUDGE_SEED
        with costs.stage("build aside"):  # shares[0] is the masked screen's: the incumbent, built beside the model
            aside = Aside(model, lambda m: find_groups(m, target, layers, attention_unit), judge_ids)
            results = {shares[0]: build(shares[0], aside)}
            per_window = {shares[0]: aside.losses(batch_size)}
        with costs.stage("build"):
            results[shares[1]] = build(shares[1])
            per_window[shares[1]] = window_losses(model, judge_ids, batch_size)
        share, verdict = judged_share(per_window, incumbent=shares[0])
        aside.restore() if share == shares[0] else aside.close()  # the incumbent wins: its layers come back from disk
        extra["kind_split_evidence"].update(attention_share=share, judge=verdict,
                                            judge_loss={s: losses.double().mean().item() for s, losses in per_window.items()})
    else:
        share = shares[0]
        with costs.stage("build"):
            results = {share: build(share)}
    removed, errors = results[share]
    if errors is not None:
        extra["reconstruction_error"] = errors
    if scores.layer_ratios:
        extra["layer_ratios"] = scores.layer_ratios
    if scores.details:
        extra["kept_params_by_score"] = compare_allocations(sets, scores.details, ratio, min_keep, share)
    kept = {f"{s.layer}.{s.kind}": kept_groups(s.count, r) for s, r in zip(sets, removed)}
    after_sets = find_groups(model, target, layers, attention_unit)
    prunable_after = sum(s.count * s.params_per_group for s in after_sets)
    per_layer = [{"layer": s.layer, "kind": s.kind, "groups": s.count, "params_before": before_layer[(s.layer, s.kind)],
                  "params_after": s.count * s.params_per_group} for s in after_sets]
    report = PruneReport(method, ratio, 1 - prunable_after / prunable_before, scope, target, sorted({s.layer for s in sets}), params_before,
                         count_params(model), prunable_before, prunable_after, per_layer, kept, calib_record, seed,
                         extra=extra, scores={name: {f"{s.layer}.{s.kind}": t for s, t in zip(sets, values)}
                                              for name, values in scores.details.items()})
    report.seconds = time.perf_counter() - start
    report.peak_rss_mb = max(costs.peak_mb, _peak_rss_mb())
    report.extra["stages"] = costs.stages
    return model, report
