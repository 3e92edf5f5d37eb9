"""Unstructured and N:M pruning: weights set to zero in place, decoder layer by decoder layer.

The other outcome of the pipeline beside `hywia.prune`'s smaller dense model: here every matrix keeps its shape
(a dense-shaped model with zeros, which saves, reloads and evaluates exactly like the original) and the recipe
records each matrix's sparsity. A method is a `Sparsifier` (hywia/methods/magnitude.py, wanda.py, sparsegpt.py,
mixed.py) that zeroes one Linear from the statistics of that Linear's inputs.

The walk is SparseGPT's and Wanda's: the calibration samples' hidden states enter decoder layer 0; each layer's
Linears gather their input statistics over all samples, are pruned, and the pruned layer is run again, so the
next layer is calibrated on what the already-pruned layers actually produce. Only one layer's statistics are
held at a time. Every other argument a decoder layer takes (rotary embeddings, masks, which differ per layer in
Gemma 3's local/global attention) is captured from one forward pass of the dense model, per layer and batch.

Sparsity is the fraction of the weights of every Linear in the decoder layers set to zero; embeddings, norms and
the LM head stay dense, as in both reference implementations. A pattern "N:M" zeroes N of every M consecutive
weights of a row along the input dimension (2:4 and 4:8 are the patterns sparse tensor cores run).
"""
from __future__ import annotations

import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from .data import calibration_ids
from .errors import HywiaError
from .finite import check_weights
from .importance import CRITERIA, check_method_options
from .options import report_record
from .walk import decoder_layers, walk_layers

if TYPE_CHECKING:
    from .recipe import Recipe


@dataclass
class InputStats:
    """Running mean of x x^T over a Linear's calibration input tokens x ([in, in], SparseGPT's layer Hessian up to
    a factor 2), or only its diagonal, the squared feature norms Wanda needs (`full=False`)."""

    full: bool
    count: int = 0
    second: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        update = x.T @ x if self.full else x.square().sum(0)
        total = self.count + len(x)
        self.second = update / total if self.second is None else self.second * (self.count / total) + update / total
        self.count = total

    @property
    def diagonal(self) -> torch.Tensor:
        return self.second.diagonal() if self.full else self.second


Pattern = tuple[int, int]  # (N, M): N zeros in every M consecutive weights of a row


@dataclass(frozen=True)
class Sparsifier:
    """`prune(module, stats, sparsity, pattern, options)` zeroes `sparsity` of the Linear's weights (or the
    `pattern`) in place and may update the others (SparseGPT). `allocate(model, matrices, ids, sparsity, options)`,
    when given, returns each matrix's own sparsity (full module name -> fraction) from the dense model; otherwise
    every matrix gets `sparsity`. `needs_hessian`: the full x x^T, not only its diagonal; `needs_data`: False for
    magnitude. `options` names the keyword options the method takes; `check` validates them before any loading."""

    prune: Callable[[nn.Linear, InputStats | None, float, Pattern | None, dict], None]
    needs_hessian: bool = False
    needs_data: bool = True
    allocate: Callable[[nn.Module, dict[str, nn.Linear], torch.Tensor, float, dict], dict[str, float]] | None = None
    options: tuple[str, ...] = ()
    check: Callable[[dict], object] | None = None
    takes_pattern: bool = True


SPARSIFIERS: dict[str, Sparsifier] = {}  # filled by hywia.methods


def register(name: str, sparsifier: Sparsifier) -> None:
    SPARSIFIERS[name] = sparsifier


@dataclass
class SparsityReport:
    method: str
    sparsity: float
    achieved_sparsity: float
    pattern: str | None
    params: int
    prunable: int
    zeros: int
    per_matrix: dict[str, float]  # full module name -> fraction of its weights that are zero
    calibration: dict
    seed: int
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    extra: dict = field(default_factory=dict)
    outcome: str = "unstructured"  # the recipe says which kind of model this is: same shapes, zeros inside
    recipe: Recipe | None = None  # every option, resolved: what `--recipe` replays

    def as_dict(self) -> dict:
        return report_record(self)


def parse_pattern(pattern: str | None) -> Pattern | None:
    if pattern is None:
        return None
    try:
        n, m = (int(p) for p in pattern.split(":"))
    except ValueError:
        raise HywiaError(f"--pattern {pattern!r} is not N:M (e.g. 2:4 zeroes 2 of every 4 weights)") from None
    if not 0 < n < m:
        raise HywiaError(f"--pattern {pattern}: need 0 < N < M (N zeros in every M weights)")
    return n, m


def check_options(method: str, sparsity: float | None, pattern: str | None, options: dict | None = None) -> Sparsifier:
    """The registered sparsifier, after checking what can be checked before a model is loaded."""
    if method not in SPARSIFIERS:
        raise HywiaError(f"unknown unstructured method '{method}': choose one of {', '.join(SPARSIFIERS)}")
    sparsifier = SPARSIFIERS[method]
    check_method_options(method, sparsifier.options, sparsifier.check, options)
    parsed = parse_pattern(pattern)
    if parsed is not None and not sparsifier.takes_pattern:
        raise HywiaError(f"--method {method} sets a sparsity per matrix; a fixed N:M --pattern leaves it nothing to set: "
                         "drop --pattern, or use sparsegpt or wanda")
    if parsed is None and sparsity is None:
        raise HywiaError(f"--method {method} needs --sparsity (fraction of weights to zero, e.g. 0.5) or --pattern N:M")
    if parsed is not None and sparsity is not None and abs(sparsity - parsed[0] / parsed[1]) > 1e-9:
        raise HywiaError(f"--sparsity {sparsity} contradicts --pattern {pattern} ({parsed[0] / parsed[1]:g}); give one of them")
    if sparsity is not None and not 0 < sparsity < 1:
        raise HywiaError(f"--sparsity {sparsity} is out of range: 0 < sparsity < 1")
    return sparsifier


def pattern_mask(metric: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """True where a weight goes: the N lowest-`metric` weights of every M consecutive ones in each row."""
    n, m = pattern
    rows, cols = metric.shape
    if cols % m:
        raise HywiaError(f"--pattern {n}:{m} needs input widths divisible by {m}; a matrix here has {cols} columns")
    lowest = metric.reshape(rows, cols // m, m).topk(n, dim=2, largest=False).indices
    return torch.zeros(rows, cols // m, m, dtype=torch.bool, device=metric.device).scatter_(2, lowest, True).reshape(rows, cols)


def lowest_mask(metric: torch.Tensor, count: int, per_row: bool = False) -> torch.Tensor:
    """True at the `count` lowest entries of `metric` (or `count` per row)."""
    mask = torch.zeros_like(metric, dtype=torch.bool)
    if count <= 0:
        return mask
    if per_row:
        return mask.scatter_(1, metric.topk(count, dim=1, largest=False).indices, True)
    mask.view(-1)[metric.flatten().topk(count, largest=False).indices] = True
    return mask


def linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every Linear inside the decoder layers, by full module name: what unstructured pruning prunes."""
    path, layers = decoder_layers(model)
    return {f"{path}.{i}.{name}": m for i, layer in enumerate(layers) for name, m in layer.named_modules() if isinstance(m, nn.Linear)}


def walk(model: nn.Module, ids: torch.Tensor | None, sparsities: dict[str, float], sparsifier: Sparsifier,
         pattern: Pattern | None, options: dict, batch_size: int = 1) -> None:
    """Prune every matrix named in `sparsities`, layer by layer on the outputs of the pruned layers before it."""
    if not sparsifier.needs_data:
        for name, sparsity in sparsities.items():
            sparsifier.prune(model.get_submodule(name), None, sparsity, pattern, options)
        return
    stats = {name: InputStats(sparsifier.needs_hessian) for name in sparsities}

    def prune_layer(index: int, layer: nn.Module) -> bool:
        done = [name for name in stats if stats[name].count]  # this layer's matrices: the ones that saw inputs
        for name in done:
            sparsifier.prune(model.get_submodule(name), stats.pop(name), sparsities[name], pattern, options)
        return bool(done)

    walk_layers(model, ids, set(sparsities), lambda name, x: stats[name].add(x), prune_layer, batch_size)


def sparsify(model: nn.Module, tokenizer=None, recipe: Recipe | None = None, *, data_dir: str | None = None,
             **options) -> tuple[nn.Module, SparsityReport]:
    """Zero the decoder layers' weights in place by `recipe` (an unstructured method: its `sparsity`, or every
    `pattern` 'N:M'), or by the Recipe that keyword `options` build (SparseGPT at 50% unless they say otherwise).

    Calibration is a dataset name or file (tokenized with `tokenizer`) or token ids [n, seq_len]; SparseGPT's and
    Wanda's papers calibrate on 128 C4 windows of 2048 tokens, the defaults. Returns the model and a report
    whose `per_matrix` holds each matrix's achieved sparsity and whose `recipe` is the one resolved."""
    from .recipe import recipe_with  # noqa: I001  (lazy: recipe.py checks unstructured options with this registry)
    fifty = {} if "sparsity" in options or options.get("pattern") is not None else {"sparsity": 0.5}
    r = recipe_with(recipe, options, {"method": "sparsegpt", **fifty})
    if r.method in CRITERIA:
        raise HywiaError(f"--method {r.method} removes whole groups (structured): use hywia.prune for it")
    r = r.check().resolved()
    start = time.perf_counter()
    options = r.method_options
    sparsifier = SPARSIFIERS[r.method]
    check_weights(model, "sparsify a model whose weights are all finite")
    parsed = parse_pattern(r.pattern)
    target = parsed[0] / parsed[1] if parsed else r.sparsity
    matrices = linears(model)
    ids, calib_record = None, {"samples": 0}
    if sparsifier.needs_data:
        context = getattr(model.config, "max_position_embeddings", None) or r.seq_len
        ids, calib_record = calibration_ids(model, tokenizer, r.calib, r.samples, min(r.seq_len, context), r.seed, data_dir)
    sparsities = sparsifier.allocate(model, matrices, ids, target, options) if sparsifier.allocate else dict.fromkeys(matrices, target)
    walk(model, ids, sparsities, sparsifier, parsed, options, r.batch_size)
    per_matrix = {name: (m.weight == 0).float().mean().item() for name, m in matrices.items()}
    zeros = sum(int((m.weight == 0).sum()) for m in matrices.values())
    prunable = sum(m.weight.numel() for m in matrices.values())
    report = SparsityReport(r.method, target, zeros / prunable, r.pattern, sum(p.numel() for p in model.parameters()), prunable,
                            zeros, per_matrix, calib_record, r.seed, extra={"options": options, "allocated": sparsities}, recipe=r)
    report.seconds = time.perf_counter() - start
    report.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return model, report
