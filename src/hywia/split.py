"""How the budget is split between attention and MLP (`kind_split`), and choosing that split by evidence.

A ratio can be met with more attention and less MLP or the reverse. The default split ("ratio") removes the same
fraction of each kind: the coarser kind (attention) removes round(ratio x its groups) and the finer one (MLP)
takes what is left of the budget. Models disagree about which kind is cheaper to cut: on Gemma-3-270M (one KV
head, four query heads a layer) Element² at the default split removes MLP only, because one KV group cannot go,
and beats the same scores when they must also take 20% of the query heads. So the split is a choice, and
`kind_split="evidence"` makes it on the held-out calibration draw: each candidate attention share (MULTIPLES of the
ratio) is allocated with the same scores and scope, applied to the dense model as masks (the removed groups' inputs
to o_proj / down_proj zeroed, or set to their calibration means when removal compensates: equal to removing them,
tested), and charged the mean token loss of the held-out windows; the lowest loss wins. That is one forward pass of
the held-out windows per candidate, no copy of the model, and the test split is never read.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .costs import trim_heap
from .errors import HywiaError
from .finite import check_number
from .grouping import LayerGroups
from .reconstruct import PrefixSelect, obs_select, reader_inverses, refitted

if TYPE_CHECKING:
    from .prune import Pruning
    from .reconstruct import Inverse

MULTIPLES = (0.0, 0.5, 1.0, 1.5, 2.0)  # evidence's candidate attention shares, as multiples of the ratio
SPLITS = ("ratio", "evidence", "evidence-refit", "evidence-best", "evidence-both")
REFIT_SPLITS = ("evidence-refit", "evidence-best", "evidence-both")  # splits that weigh candidates as the reconstruction builds them
JUDGED_SPLITS = ("evidence-best", "evidence-both")  # both screens, and a judge where they disagree: of built models, of screened ones
# the judge keeps the masked screen's share unless the refit one's judge loss is lower by more than this many
# standard errors of the paired per-window difference (a one-sided test at about 2.3% when nothing differs)
JUDGE_MARGIN = 2.0
LOGITS_BYTES = 320 * 2**20  # the most logits one held-out forward makes: 4 windows of 128 tokens up to 164k tokens


def check_split(kind_split: str | float, scope: str) -> None:
    if isinstance(kind_split, str) and kind_split not in SPLITS:
        try:
            kind_split = float(kind_split)
        except ValueError:
            raise HywiaError(f"unknown --kind-split '{kind_split}': use ratio, evidence, evidence-refit, evidence-best, evidence-both, or the fraction of attention "
                             "parameters to remove (e.g. 0.1)") from None
    if not isinstance(kind_split, str) and not 0 <= float(kind_split) < 1:
        raise HywiaError(f"--kind-split {kind_split} is out of range: give the fraction of attention parameters to remove, 0 <= x < 1")
    if kind_split != "ratio" and scope == "joint":
        raise HywiaError("--kind-split does not apply to --scope joint, where one ranking of every group decides the split; "
                         "use --scope global or layer")


def attention_kind(sets: list[LayerGroups]) -> str | None:
    """The kind that stands for attention in `sets` (KV groups or query heads), None when only MLP is pruned."""
    kinds = {s.kind for s in sets}
    return next((k for k in ("attention", "query") if k in kinds), None) if "mlp" in kinds else None


@contextmanager
def masked(sets: list[LayerGroups], removed: list[torch.Tensor], means: dict[str, torch.Tensor] | None = None):
    """Within the block, the model computes as if `removed` were gone: each output projection sees the removed
    groups' input columns as zero (or as their calibration mean, `means` by module name, as compensation does)."""
    columns: dict[str, tuple[nn.Module, list[torch.Tensor]]] = {}
    for s, gone in zip(sets, removed):
        if len(gone):
            columns.setdefault(s.reader.name, (s.reader.module, []))[1].append(s.reader.indices(gone))

    def hook(name: str, dropped: torch.Tensor) -> Callable:
        def pre(module, args):
            x = args[0].clone()
            index = dropped.to(x.device)
            x[..., index] = means[name].to(x.device, x.dtype)[index] if means is not None else 0
            return (x, *args[1:])
        return pre

    handles = [module.register_forward_pre_hook(hook(name, torch.cat(parts))) for name, (module, parts) in columns.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def heldout_loss(model: nn.Module, ids: torch.Tensor, batch_size: int) -> float:
    """Mean next-token loss of `ids` [n, seq_len] (every window weighs the same), at most `batch_size` windows a
    forward and no more than LOGITS_BYTES of logits: the screens' forward passes are otherwise the largest thing a
    270M model's prune holds (four windows over Gemma 3's 262,144-token vocabulary are 0.54 GB of logits). A window's
    loss does not depend on which windows share its forward (checked bit for bit on Gemma 3 at 4, 2 and 1)."""
    head = model.get_output_embeddings()
    vocab = head.weight.shape[0] if head is not None else model.config.vocab_size
    per_forward = max(1, min(batch_size, LOGITS_BYTES // (ids.shape[1] * vocab * 4)))
    return window_losses(model, ids, per_forward).double().mean().item()


@torch.no_grad()
def window_losses(model: nn.Module, ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Mean next-token loss of each window of `ids` [n, seq_len], in float32 (n values: a paired comparison of two
    models on the same windows needs them one by one). The log-probabilities are taken one window at a time from the
    batch's logits: a batch's at once is a second copy of its logits (four windows of 128 tokens over Gemma 3's
    262,144-token vocabulary: 0.5 GB each)."""
    device = next(model.parameters()).device
    losses = []
    for batch in ids.split(batch_size):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits  # no KV cache: nothing is generated
        losses += [F.cross_entropy(logits[i, :-1].float(), batch[i, 1:], reduction="none").mean().cpu() for i in range(len(batch))]
        del logits
        trim_heap()  # a window's log-probabilities (25 MB at 49,152 tokens) fall under glibc's mmap threshold: freed, they stay resident
    return torch.stack(losses)


def judged_share(losses: dict[float, torch.Tensor], incumbent: float, texts: dict[str, slice] | None = None) -> tuple[float, dict]:
    """Of two built models' per-window losses on the same windows, the incumbent's share (the masked screen's, what
    `evidence` alone builds) unless the other's mean loss is lower by more than JUDGE_MARGIN standard errors of the
    paired differences on every one of `texts` (name -> its windows; default: all windows, one text). Two built
    models 1-2% apart were ranked one way by one 100-window draw and the other way by another, and a share that won on
    WikiText-2 read 8% worse on PTB than the other (docs/reconstruction.md): a difference inside a draw's noise, or a gain on one kind of
    text only, is no reason to leave the default's share. Returns the kept share and the record: over all windows
    the mean difference (other - incumbent) and its standard error, the margin, and the same for each text."""
    (other,) = [share for share in losses if share != incumbent]
    difference = losses[other].double() - losses[incumbent].double()
    texts = texts or {"calibration": slice(0, len(difference))}
    per_text = {name: _paired(difference[where]) for name, where in texts.items()}
    wins = all(v["difference"] < -JUDGE_MARGIN * v["standard_error"] for v in per_text.values())
    record = {**_paired(difference), "margin": JUDGE_MARGIN}
    if len(texts) > 1:
        record["texts"] = per_text
    return (other if wins else incumbent), record


def _paired(difference: torch.Tensor) -> dict:
    """Mean of paired per-window differences, its standard error (inf for one window: no noise estimate) and count."""
    n = len(difference)
    error = (difference.std() / math.sqrt(n)).item() if n > 1 else math.inf
    return {"difference": difference.mean().item(), "standard_error": error, "windows": n}


def choose_attention_share(allocate: Callable[[float], list[torch.Tensor]], model: nn.Module, sets: list[LayerGroups],
                           ratio: float, ids: torch.Tensor, means: dict[str, torch.Tensor] | None,
                           batch_size: int, candidate: Callable[[list[torch.Tensor]], AbstractContextManager] | None = None,
                           desc: str = "split screen") -> tuple[float, dict[float, float]]:
    """The candidate attention share whose allocation (`allocate(share)` -> removed groups per set) leaves the
    lowest held-out loss, and every feasible candidate's loss. Candidates the floors make impossible are skipped.
    `candidate(removed)` is the context in which the model computes as that candidate would (default: `masked`, the
    groups removed and nothing else changed; a reconstructing prune passes `hywia.reconstruct.refitted`). A bar named
    `desc` counts the candidates: at 1.5B the refit screen's five take about half an hour."""
    candidate = candidate or (lambda removed: masked(sets, removed, means))
    losses: dict[float, float] = {}
    for share in tqdm(sorted({round(m * ratio, 6) for m in MULTIPLES}), desc=desc, unit="share", leave=False):
        try:
            removed = allocate(share)
        except HywiaError:  # more attention than the floors allow, or an MLP that would have to empty a layer
            continue
        with candidate(removed):
            losses[share] = check_number(heldout_loss(model, ids, batch_size), f"--kind-split evidence: the held-out loss "
                                         f"with {share:g} of attention removed", "the model computes NaN or inf on calibration "
                                         "text; check its weights, or prune in --dtype float32")
    if not losses:
        raise HywiaError(f"--kind-split evidence found no feasible split at --ratio {ratio}; lower --ratio")
    return min(losses, key=lambda share: (losses[share], abs(share - ratio))), losses


def screen_shares(run: Pruning, allocation: Callable[[float], list[torch.Tensor]]) -> list[float]:
    """The attention shares the recipe's evidence split screens out on the held-out draw: one, or under evidence-best
    two where the masked and the refit screens disagree (the masked one's first: the incumbent). Under evidence-both
    the judge settles a disagreement here, on the refit screen's models. Records both screens' losses in the run's
    `kind_split_evidence`."""
    r = run.recipe
    screens: dict[str, Callable | None] = {}
    inputs: dict[str, Inverse] = {}
    if r.kind_split != "evidence-refit":
        screens["masked"] = None
    if r.kind_split in REFIT_SPLITS:  # weigh each candidate as the walk will build it: refit, one-shot
        inputs = reader_inverses(run.model, run.sets, run.walk_ids, r.batch_size, run.memory.device, run.stats.spill)
        select = PrefixSelect() if run.select is obs_select else run.select  # one greedy run per set, not per candidate
        screens["refit"] = lambda gone: refitted(run.sets, gone, inputs, r.compensate, select)
    screened = {}
    try:
        for weighed, candidate in screens.items():
            chosen, losses = choose_attention_share(allocation, run.model, run.sets, r.ratio, run.stats.heldout_ids, run.means,
                                                    r.batch_size, candidate, desc=f"{weighed} screen")
            screened[weighed] = {"attention_share": chosen, "heldout_loss": losses}
        shares = list(dict.fromkeys(s["attention_share"] for s in screened.values()))
        run.extra["kind_split_evidence"] = {**screened[next(iter(screened))], "candidates": "+".join(screened)}
        if len(screened) > 1:
            run.extra["kind_split_evidence"]["screened"] = screened
        if r.kind_split == "evidence-both" and len(shares) > 1:
            shares = [judge_screened(run, allocation, shares, screens["refit"])]
    finally:
        for m in inputs.values():  # the readers' inverses are spent: their files leave the disk before the build walks
            m.discard()
    return shares


def judge_screened(run: Pruning, allocation: Callable[[float], list[torch.Tensor]], shares: list[float],
                   candidate: Callable[[list[torch.Tensor]], AbstractContextManager]) -> float:
    """evidence-both's verdict between the masked screen's share (`shares[0]`, the incumbent) and the refit screen's:
    the judge of evidence-best (judged_share, on the same windows of two texts) reading the refit screen's one-shot
    models of the two shares instead of the walk's built ones, so one walk builds the kept share alone. Records the
    verdict and each share's mean judge loss as evidence-best does."""
    r = run.recipe
    per_window = {}
    for share in tqdm(shares, desc="screen judge", unit="share", leave=False):
        with candidate(allocation(share)):
            per_window[share] = window_losses(run.model, run.judge_ids, r.batch_size)
    return settle(run, per_window, shares[0], models="refit screen")


def settle(run: Pruning, per_window: dict[float, torch.Tensor], incumbent: float, models: str | None = None) -> float:
    """The judge's verdict on the run's judge texts (judged_share), recorded in the run's `kind_split_evidence` with
    each share's mean judge loss and, if given, which `models` the judge read; returns the kept share."""
    share, verdict = judged_share(per_window, incumbent=incumbent, texts=run.judge_texts)
    if models is not None:
        verdict["models"] = models
    run.extra["kind_split_evidence"].update(attention_share=share, judge=verdict,
                                            judge_loss={s: losses.double().mean().item() for s, losses in per_window.items()})
    return share
