"""A prune, as its stages: calibrate -> score -> allocate -> split -> remove or refit -> report.

`ratio` is the fraction of the *prunable* parameters (the grouped projections of the selected layers) to remove;
`scope` says over what the budget is shared (hywia.allocate), `kind_split` how it splits between attention and
MLP (hywia.split). Removal replaces every member Linear by a smaller one (hywia.removal), so the result is a dense
model; with `reconstruct`, removal happens layer by layer with the weights that read the removed groups refit
(hywia.reconstruct). Every option is a field of `hywia.Recipe`; each stage is a function in the module that owns
its idea, reading and adding to one `Pruning`, the prune in progress.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from .adapters import adapter_for
from .allocate import allocate
from .build import build
from .checkpoints import check_resume, interrupted, kept_split, load_split, save_split
from .calibrate import HELDOUT_SEED, JUDGE_SEED, calibration_stats, heldout_stats
from .costs import Costs, own_weights, release_memory
from .data import calibration_ids
from .errors import HywiaError
from .finite import check_tensor, check_weights
from .grouping import LayerGroups, find_groups
from .importance import Criterion, Memory, Moments, Scores, Stats
from .recipe import JUDGE_CALIB_FIX, Recipe, recipe_with
from .reconstruct import Select, obs_select
from .removal import kept_groups
from .report import PruneReport, compare_allocations, count_params, fingerprint, peak_rss_mb
from .scratch import check_room
from .split import JUDGED_SPLITS, REFIT_SPLITS, SPLITS, attention_kind, screen_shares
from .walk import decoder_layers


@dataclass
class Pruning:
    """One prune in progress: the model, its resolved recipe and groups, and what each stage adds for the next."""

    model: nn.Module
    tokenizer: object
    recipe: Recipe  # every default resolved
    criterion: Criterion
    sets: list[LayerGroups]
    memory: Memory
    data_dir: str | None = None
    stats: Stats | None = None  # given by the caller: reused, and not freed after scoring
    reused: bool = False
    ids: torch.Tensor | None = None  # the calibration draw
    walk_ids: torch.Tensor | None = None  # the reconstruction draw
    judge_ids: torch.Tensor | None = None  # evidence-best's (and evidence-both's) judge draw: each judge text's windows in turn
    judge_texts: dict[str, slice] = field(default_factory=dict)  # which of judge_ids each text's windows are
    judge_given: bool = False  # --judge-calib named by the user: a missing text is an error, not a fallback
    calib_record: dict = field(default_factory=lambda: {"samples": 0})
    extra: dict = field(default_factory=dict)
    costs: Costs = field(default_factory=Costs)
    started: float = field(default_factory=time.perf_counter)
    params_before: int = 0
    prunable_before: int = 0

    def draw(self, samples: int, seed: int, text: str | None = None) -> tuple[torch.Tensor, dict]:
        """`samples` windows of the recipe's length from its calibration text (or `text`), seeded by `seed`."""
        r = self.recipe
        return calibration_ids(self.model, self.tokenizer, r.calib if text is None else text, samples, r.seq_len, seed, self.data_dir)

    @property
    def select(self) -> Select | None:
        """How a reconstructing walk chooses each layer's groups: the method's own, or OBS under `reconstruct="obs"`."""
        return self.criterion.select or (obs_select if self.recipe.reconstruct == "obs" else None)

    @property
    def means(self) -> dict[str, torch.Tensor] | None:
        """The output projections' calibration input means, where removal compensates with them."""
        return {name: m.mean for name, m in self.stats.inputs.items()} if self.recipe.compensate else None

    @property
    def splits_by_evidence(self) -> bool:
        return self.recipe.kind_split in SPLITS[1:] and attention_kind(self.sets) is not None


def prune(model: nn.Module, tokenizer=None, recipe: Recipe | None = None, *, data_dir: str | None = None,
          device: str | None = None, stats: Stats | None = None, checkpoint_dir: str | Path | None = None,
          resume: bool = False, **options) -> tuple[nn.Module, PruneReport]:
    """Prune `model` in place by `recipe` (or the Recipe that keyword `options` build, e.g. method="element2",
    ratio=0.2) and return it with a report. `data_dir` holds local copies of the calibration data; `device` is where
    a sequential walk moves each layer; `stats`, an empty `Stats(seed=...)` or one a previous call filled, is filled
    in place and reused (several options of one criterion on one dense model and draw collect gradients once).
    With `checkpoint_dir`, a reconstructing prune keeps its stages before the build there; `resume` starts from them."""
    run = begin(model, tokenizer, recipe_with(recipe, options, {"ratio": 0.2}), data_dir, device, stats)
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
    check_resume(folder, resume)
    key = split_key(run) if folder is not None else None
    scores, shares = resume_split(run, folder, key) if resume else (None, None)
    if scores is None:
        with run.costs.stage("calibrate"):
            calibrate(run)
        with run.costs.stage("score"), torch.no_grad():
            scores = score(run)
    r = run.recipe
    allocation = lambda share: allocate(run.sets, scores.per_set, r.ratio, r.scope, r.min_keep,  # noqa: E731
                                        scores.layer_ratios, share)
    if shares is None:
        with run.costs.stage("split"):
            shares = screen_shares(run, allocation) if run.splits_by_evidence else [None if r.kind_split in SPLITS else float(r.kind_split)]
        keep_split(run, scores, shares, folder, key)
    try:
        share, removed, errors = build(run, scores, allocation, shares)
    except KeyboardInterrupt as e:  # Ctrl-C, or a signal the CLI turned into one
        raise interrupted(e, folder) from None
    except HywiaError as e:  # e.g. the disk filled during the walk aside: say what a rerun can start from
        if kept_split(folder) is None:
            raise
        raise HywiaError(f"{e}; {kept_split(folder)}") from None
    return model, report(run, scores, share, removed, errors)


def begin(model: nn.Module, tokenizer, recipe: Recipe, data_dir: str | None, device: str | None,
          stats: Stats | None) -> Pruning:
    """Check the recipe and the model, resolve the method's defaults for this model and find its groups."""
    recipe.check()
    if any(p.device.type == "meta" for p in model.parameters()):
        raise HywiaError("some weights are offloaded (on the meta device): hywia prunes weights in place, so give every "
                         "layer a GPU or the CPU (--device auto without disk offload; --layers-per-pass and --stats-device cpu save memory)")
    own_weights(model)  # removal frees each dense Linear it replaces only if its memory is the process's own
    check_weights(model, "prune a model whose weights are all finite (NaN would spread through compensation and scores)")
    if stats is not None and stats.seed != recipe.seed:
        raise HywiaError(f"statistics of seed {stats.seed} cannot be reused for seed {recipe.seed}")
    criterion, judge_given = recipe.criterion, recipe.judge_calib is not None
    recipe = recipe.resolved(grouped_query=adapter_for(model.config).query is not None)
    memory = recipe.memory(device)
    memory.check()
    sets = find_groups(model, recipe.target, recipe.layers, recipe.attention_unit)
    run = Pruning(model, tokenizer, recipe, criterion, sets, memory, data_dir, stats, stats is not None, judge_given=judge_given,
                  params_before=count_params(model), prunable_before=sum(s.count * s.params_per_group for s in sets))
    check_room(*scratch_needed(run))
    return run


def scratch_needed(run: Pruning) -> tuple[int, str]:
    """The most disk the prune's scratch files hold at once, and what they are: one set of the output projections'
    float64 input second moments (the evidence fusion's held-out draw, then the refit screen's readers, inverted; each
    set is freed once spent), or the layers of evidence-best's incumbent built aside."""
    r = run.recipe
    fusion_moments = run.criterion.heldout is not None and run.criterion.heldout(r.method_options) and not (run.stats and run.stats.heldout)
    screen_moments = r.kind_split in REFIT_SPLITS and run.splits_by_evidence
    moments = sum(s.reader.module.weight.shape[1] ** 2 * 8 for s in run.sets) if fusion_moments or screen_moments else 0
    aside = 0
    if r.kind_split == "evidence-best" and run.splits_by_evidence and r.reconstruct:
        _, layers = decoder_layers(run.model)
        aside = sum(p.numel() * p.element_size() for i in {s.layer for s in run.sets} for p in layers[i].parameters())
    return max(moments, aside), ("input second moments, layers x width^2" if moments >= aside else "the incumbent's layers")


def calibrate(run: Pruning) -> None:
    """Draw the calibration windows and gather the statistics the criterion needs (hywia.calibrate)."""
    r = run.recipe
    if run.criterion.needs_data or r.compensate:
        run.ids, run.calib_record = run.draw(r.samples, r.seed)
    if r.kind_split in JUDGED_SPLITS and run.splits_by_evidence:
        draw_judge(run)
    run.stats = calibration_stats(run.model, run.sets, run.criterion, run.ids, r.seed, r.batch_size, r.compensate, run.stats, run.memory)
    moments = run.criterion.heldout is not None and run.criterion.heldout(r.method_options)
    if moments or run.splits_by_evidence:
        heldout_stats(run.model, run.tokenizer, run.sets, run.stats, moments, r.calib, r.samples, r.seq_len, r.seed,
                      run.data_dir, r.batch_size, run.stats.spill)
        run.calib_record["heldout_seed"] = r.seed + HELDOUT_SEED
    if r.reconstruct:
        run.walk_ids, run.calib_record["reconstruct"] = run.draw(r.reconstruct_samples, r.seed)


def draw_judge(run: Pruning) -> None:
    """evidence-best's judge windows: a draw of the calibration text and one of the second judge text (--judge-calib),
    seeded apart from every other draw; drawn before the statistics, so a missing text named by the user stops the prune
    before any work (a missing default one leaves the calibration text alone, with a warning, recorded in the recipe)."""
    r = run.recipe
    seed, draws, records = r.seed + JUDGE_SEED, [], {}
    for text in [r.calib] + ([] if r.judge_calib == "none" else [r.judge_calib]):
        name = text if isinstance(text, str) else "token ids"
        try:
            ids, records[name] = run.draw(r.judge_samples, seed, text)
        except HywiaError as e:
            if text is r.calib:
                raise
            if run.judge_given:
                raise HywiaError(f"the judge of --kind-split {r.kind_split} also reads --judge-calib {text}, and {e}: "
                                 f"{JUDGE_CALIB_FIX}") from None
            warnings.warn(f"the judge of --kind-split {r.kind_split} reads the calibration text alone: its default second text, "
                          f"{text}, is not reachable ({e}); the recipe records --judge-calib none", stacklevel=2)
            run.recipe = replace(r, judge_calib="none")
            break
        start = sum(len(d) for d in draws)
        run.judge_texts[name] = slice(start, start + len(ids))
        draws.append(ids)
    run.judge_ids = torch.cat(draws)
    run.calib_record["judge"] = {**next(iter(records.values())), "seed": seed, "texts": records}


def score(run: Pruning) -> Scores:
    """Every group's score under the criterion, checked finite; the per-weight statistics are freed once spent."""
    r = run.recipe
    scores = run.criterion.score(run.sets, run.stats, {**r.method_options, "ratio": r.ratio, "compensate": r.compensate})
    for s, values in zip(run.sets, scores.per_set):
        check_tensor(values, f"the {r.method} scores of layer {s.layer} ({s.kind})", "the calibration statistics overflowed; "
                     "calibrate in --dtype float32, or with fewer --samples")
    stored = [t for store in (run.stats.grad, run.stats.fisher, run.stats.group_sums) for t in dict.values(store)]
    run.extra["stats_mb"] = sum(t.numel() * t.element_size() for t in stored) / 2**20
    if not run.reused:  # per-weight gradients, Fisher and held-out moments are spent once scored: free them before the walks
        run.stats.grad.clear()
        run.stats.fisher.clear()
        run.stats.group_sums.clear()
        for m in run.stats.heldout.values():
            m.discard()
        run.stats.heldout.clear()
        del stored
        release_memory()
    return scores


def split_key(run: Pruning) -> dict:
    """What a prune's checkpoint must match to be resumed: the resolved recipe and a digest of the dense weights."""
    return {"recipe": run.recipe.as_dict(), "model": fingerprint(run.model, run.recipe.calib)}


def keep_split(run: Pruning, scores: Scores, shares: list, folder: Path | None, key: dict | None) -> None:
    """Keep what the build reads (draws, records, costs, scores, shares) in `folder` (hywia.checkpoints), where a
    build with a walk follows: a prune killed in its walks, hours at 1.5B on two CPU cores, resumes there."""
    if folder is None or not run.recipe.reconstruct:
        return
    r = run.recipe
    means = {name: (m.count, m.total, m.squares) for name, m in run.stats.inputs.items()} if r.compensate else {}
    save_split(folder, {"key": key, "judge_calib": r.judge_calib, "walk_ids": run.walk_ids, "judge_ids": run.judge_ids,
                        "judge_texts": {name: (s.start, s.stop) for name, s in run.judge_texts.items()},
                        "calib_record": run.calib_record, "extra": run.extra, "means": means, "stages": run.costs.stages,
                        "peak_mb": run.costs.peak_mb, "seconds": time.perf_counter() - run.started, "per_set": scores.per_set,
                        "details": scores.details, "layer_ratios": scores.layer_ratios, "shares": shares})


def resume_split(run: Pruning, folder: Path, key: dict) -> tuple[Scores, list]:
    """The scores and shares `keep_split` kept, with the draws, records and costs of the stages before the build put
    back into the run (its report's seconds and stages are the whole prune's, both processes)."""
    state = load_split(folder, key)
    run.recipe = replace(run.recipe, judge_calib=state["judge_calib"])
    run.walk_ids, run.judge_ids = state["walk_ids"], state["judge_ids"]
    run.calib_record, run.extra = state["calib_record"], state["extra"]
    run.judge_texts = {name: slice(*bounds) for name, bounds in state["judge_texts"].items()}
    means = {name: Moments(count, total, squares) for name, (count, total, squares) in state["means"].items()}
    run.stats = Stats(seed=run.recipe.seed, inputs=means)  # all the build reads of the statistics: compensation's means
    run.costs.stages.update(state["stages"])
    run.costs.peak_mb = max(run.costs.peak_mb, state["peak_mb"])
    run.started -= state["seconds"]
    run.extra["resumed"] = {"from": "split", "seconds_before": round(state["seconds"], 3)}
    return Scores(state["per_set"], state["details"], state["layer_ratios"]), state["shares"]


def report(run: Pruning, scores: Scores, share: float | None, removed: list[torch.Tensor], errors: dict | None) -> PruneReport:
    """What the prune removed, per layer and kind, with its options and costs (the body of hywia.json)."""
    r, model = run.recipe, run.model
    extra = {"options": r.method_options, "round_to": r.round_to, "attention_unit": r.attention_unit, "compensate": r.compensate,
             "reconstruct": r.reconstruct, "kind_split": r.kind_split, "memory": asdict(run.memory), **run.extra}
    if errors is not None:
        extra["reconstruction_error"] = errors
    if scores.layer_ratios:
        extra["layer_ratios"] = scores.layer_ratios
    if scores.details:
        extra["kept_params_by_score"] = compare_allocations(run.sets, scores.details, r.ratio, r.min_keep, share)
    before = {(s.layer, s.kind): s.count * s.params_per_group for s in run.sets}
    after_sets = find_groups(model, r.target, r.layers, r.attention_unit)
    prunable_after = sum(s.count * s.params_per_group for s in after_sets)
    per_layer = [{"layer": s.layer, "kind": s.kind, "groups": s.count, "params_before": before[(s.layer, s.kind)],
                  "params_after": s.count * s.params_per_group} for s in after_sets]
    kept = {f"{s.layer}.{s.kind}": kept_groups(s.count, gone) for s, gone in zip(run.sets, removed)}
    result = PruneReport(r.method, r.ratio, 1 - prunable_after / run.prunable_before, r.scope, r.target,
                         sorted({s.layer for s in run.sets}), run.params_before, count_params(model), run.prunable_before,
                         prunable_after, per_layer, kept, run.calib_record, r.seed, extra=extra,
                         scores={name: {f"{s.layer}.{s.kind}": t for s, t in zip(run.sets, values)}
                                 for name, values in scores.details.items()}, recipe=r)
    result.seconds = time.perf_counter() - run.started
    result.peak_rss_mb = max(run.costs.peak_mb, peak_rss_mb())
    result.extra["stages"] = run.costs.stages
    return result
