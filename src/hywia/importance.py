"""Importance criteria, the shared machinery: calibration statistics, the `Criterion` type and its registry.
The criteria themselves live in hywia/methods/, one module per method family, and register here.

Statistics come from the causal-LM loss on calibration samples:
  grad   = gradient of the mean loss over the batch (first order, what `vector` and `element1` use);
  fisher = mean over samples of the squared per-sample gradient, the diagonal of the empirical Fisher, which
           stands in for the Hessian diagonal in the second-order Taylor term (what `element2` uses).
and from a forward pass alone:
  inputs = per input feature of every input-column projection (o_proj, down_proj), the count, sum and sum of
           squares of its value over calibration tokens: the activation norms Wanda-sp weighs weights by, and
           the mean and variance FLAP scores (variance) and compensates (mean) with.
  samples = optionally, per calibration sample, per-group values a criterion derives from that sample's gradient
           (their moments over samples: SAAP's measure of how uncertain each estimate is).
A criterion declares which of them it needs, so magnitude criteria never run a backward pass, activation
criteria never run one either, and only the second-order ones pay for per-sample backward passes.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import itertools
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.utils.checkpoint
from torch import nn
from tqdm.auto import tqdm

from .adapters import adapter_for
from .costs import HeapTrimmer
from .errors import HywiaError
from .grouping import LayerGroups, Slot
from .scratch import scratch_dir
from .walk import decoder_layers, walk_layers


@dataclass
class Moments:
    """Running moments of features over observations (a Linear's input features over calibration tokens, or
    per-group values over calibration samples), in float64 so that the variance of features with a large mean
    survives the subtraction."""

    count: int = 0
    total: torch.Tensor | float = 0.0
    squares: torch.Tensor | float = 0.0
    outer: bool = False  # also keep the full second moment X^T X (feature x feature)
    cross: torch.Tensor | float = 0.0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double()
        self.count += len(x)
        self.total = self.total + x.sum(0)
        self.squares = self.squares + x.square().sum(0)
        if self.outer:
            self.cross = x.T @ x if isinstance(self.cross, float) else self.cross.add_(x.T @ x)  # in place after the first

    def full(self) -> torch.Tensor:
        """X^T X (needs outer=True), read back from disk if it was spilled."""
        return torch.load(self.cross, weights_only=True) if isinstance(self.cross, Path) else self.cross

    def loaded(self) -> Moments:
        """These moments with X^T X in memory (read from disk once, if it was spilled), for repeated use."""
        return dataclasses.replace(self, cross=self.full()) if isinstance(self.cross, Path) else self

    def spill(self, path: Path) -> None:
        """Keep X^T X in the file `path` instead of memory: every Linear's [in, in] float64 matrix at once grows as
        layers x width^2 (18 GB for a 1.5B model's down projections), more than the model; one at a time does not."""
        torch.save(self.cross, path)
        self.cross = path

    def discard(self) -> None:
        """Drop X^T X, and its file if it was spilled: the moments are spent, and at 1.5B one set of them is 18 GB of disk."""
        if isinstance(self.cross, Path):
            self.cross.unlink(missing_ok=True)
        self.cross = 0.0

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.count

    @property
    def variance(self) -> torch.Tensor:
        """Unbiased sample variance per feature."""
        return (self.squares - self.total.square() / self.count).clamp_min(0) / max(self.count - 1, 1)


class Store(dict):
    """Accumulated per-weight statistics, possibly kept in a lower precision or on another device than the model
    (`Memory`); a lookup hands back float32 on the device of the weights it belongs to, so criteria need not know."""

    def __init__(self, device: torch.device | str | None = None):
        super().__init__()
        self.device = device

    def __getitem__(self, name: str) -> torch.Tensor:
        value = super().__getitem__(name)
        return value.to(device=self.device or value.device, dtype=torch.float32)


@dataclass(frozen=True)
class Memory:
    """How calibration statistics are gathered when the model, its gradients and the Fisher buffers do not fit at
    once (peak memory of each option: docs/RESULTS.md, "Memory"). The defaults are one pass, float32, in place."""

    layers_per_pass: int | None = None  # gradient criteria: one backward sweep per this many decoder layers' weights
    store_dtype: str = "float32"  # finished per-weight accumulators kept in this dtype ("bfloat16" halves them)
    store: str | None = None  # "groups": per-sample statistics summed into per-group totals as backward gives them
    # (GroupSums); "weights": the per-weight store; None: the method's own (Criterion.store)
    store_device: str | None = None  # ... and on this device ("cpu": off the accelerator)
    checkpointing: bool = False  # gradient criteria: recompute each decoder layer's activations during backward
    sequential: bool = False  # forward-only statistics walked one decoder layer at a time (`hywia.walk`)
    device: str | None = None  # with `sequential`: move each layer here for its turn (the model stays where it is)

    def check(self) -> None:
        if self.layers_per_pass is not None and self.layers_per_pass < 1:
            raise HywiaError(f"--layers-per-pass {self.layers_per_pass} must be at least 1")
        if self.store_dtype not in ("float32", "bfloat16", "float16"):
            raise HywiaError(f"unknown --stats-dtype '{self.store_dtype}': use float32, bfloat16 or float16")
        if self.store is not None and self.store not in STORES:
            raise HywiaError(f"unknown --stats-store '{self.store}': use weights (per-weight statistics) or groups (per-group totals)")
        if self.store == "groups" and self.store_dtype != "float32":
            raise HywiaError("--stats-dtype sets the per-weight store's precision, and --stats-store groups keeps no per-weight "
                             "store (its per-group totals are float64): leave --stats-dtype out")


@dataclass
class Stats:
    """Calibration statistics: gradients keyed by full parameter name (read back as float32 on the parameter's
    device), input moments keyed by module name."""

    grad: dict[str, torch.Tensor] = field(default_factory=Store)
    fisher: dict[str, torch.Tensor] = field(default_factory=Store)
    inputs: dict[str, Moments] = field(default_factory=dict)
    samples: dict[str, Moments] = field(default_factory=dict)
    heldout: dict[str, Moments] = field(default_factory=dict)  # output projections' inputs on a second calibration draw
    heldout_ids: torch.Tensor | None = None  # that draw's windows [n, seq_len]
    group_sums: dict[tuple, torch.Tensor] = field(default_factory=dict)  # `--stats-store groups`: GroupSums.totals
    seed: int = 0
    _spill: tempfile.TemporaryDirectory | None = field(default=None, repr=False)

    @property
    def spill(self) -> Path:
        """A folder for second moments kept on disk (`Moments.spill`), removed with these statistics."""
        if self._spill is None:
            self._spill = scratch_dir("moments")
        return Path(self._spill.name)


@dataclass
class Scores:
    """Per-group scores aligned with the list of LayerGroups, and any intermediate scores worth keeping."""

    per_set: list[torch.Tensor]
    details: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    layer_ratios: dict[int, float] | None = None  # a criterion that ranks layers sets each layer's share (SAAP)


@dataclass(frozen=True)
class Criterion:
    """`score(sets, stats, options)` scores every LayerGroups at once, so a criterion may normalise across layers.
    `options` names the keyword options it accepts (e.g. a fusion's alpha); others are refused (the options
    `score` gets also carry the run's "ratio"), and `check`
    validates their values before any model is loaded. `scope` is the allocation the method is defined with
    (the default when none is asked for); `compensates` asks removal to fold the calibration mean of every removed
    input column into the output bias (FLAP's bias compensation); `attention_unit` the attention granularity it
    is defined with, and `kind_split` how it splits the budget between attention and MLP. `per_sample(sets, grads, scale)` maps one
    sample's gradients (param name -> gradient, times `scale`) to named per-group values [total groups], whose
    moments over samples land in `stats.samples`; it implies the per-sample backward passes of `needs_fisher`.
    `heldout(options)` says whether the options ask for `stats.heldout`: the full input second moments of every
    output projection on a second, disjoint draw of calibration windows (evidence for choosing among scorings).
    `reconstructs` is the method's default `--reconstruct` (True or "obs", hywia.reconstruct); `select(set, W, Hinv, n)` picks the
    n groups of a set to remove from its reader's weights W and dampened inverse calibration Hessian during that walk, on the
    outputs of the layers already pruned (SlimGPT): the scores then only size each set's removal."""

    score: Callable[[list[LayerGroups], Stats, dict], Scores]
    needs_grad: bool = False
    needs_fisher: bool = False
    needs_inputs: bool = False
    options: tuple[str, ...] = ()
    check: Callable[[dict], object] | None = None
    scope: str = "layer"
    compensates: bool = False
    attention_unit: str = "kv"  # the default --attention-unit ("query" falls back to "kv" where heads have their own K/V)
    kind_split: str = "ratio"  # the default --kind-split (hywia.split)
    per_sample: Callable[[list[LayerGroups], dict[str, torch.Tensor], float], dict[str, torch.Tensor]] | None = None
    heldout: Callable[[dict], bool] | None = None
    reconstructs: bool | str = False  # the default --reconstruct: True (refit) or "obs" (OBS chooses too)
    select: Callable[[LayerGroups, torch.Tensor, torch.Tensor, int], torch.Tensor] | None = None
    group_sums: bool = False  # its scores read the gradients only through `taylor_sums`: `--stats-store groups` applies
    store: str = "weights"  # the default --stats-store ("groups" needs group_sums)

    @property
    def needs_data(self) -> bool:
        return self.needs_grad or self.needs_fisher or self.needs_inputs


STORES = ("weights", "groups")


def slot_key(slot: Slot, count: int, order: int) -> tuple:
    return slot.name, slot.dim, slot.offset, slot.size, count, order


class GroupSums:
    """Gradient statistics summed per group as backward produces them (`--stats-store groups`): for each slot of each
    group, the sum over its weights of w * g (order 1) and w^2 * F (order 2, with the Fisher), added one sample (or
    micro-batch) at a time in float64. Criteria made of those sums (Vector, Element², HyWIA's two granularities)
    then need no per-weight store, which is two float32 copies of the prunable weights (52 GB at 7B); the totals are
    a few numbers per group. The same sums as the per-weight store's, added in another order: equal to float
    rounding, not bit for bit."""

    def __init__(self, sets: list[LayerGroups], names: set[str], fisher: bool):
        self.orders = (1, 2) if fisher else (1,)
        self.slots: dict[str, list[tuple[Slot, int]]] = {}
        for s in sets:
            for slot in s.slots:
                if slot.name in names:
                    self.slots.setdefault(slot.name, []).append((slot, s.count))
        self.totals: dict[tuple, torch.Tensor] = {}

    def add(self, name: str, param: torch.Tensor, grad: torch.Tensor, n: int) -> None:
        """Add one backward's gradient `grad` of `param` (the per-sample gradient scaled by 1/n under the Fisher)."""
        w, g = param.detach().float(), grad.float()
        values = {1: w * g}
        if 2 in self.orders:
            values[2] = w.square() * ((g * n).square() / n)
        for slot, count in self.slots.get(name, []):
            for order, value in values.items():
                total = value.movedim(slot.dim, 0).narrow(0, slot.offset, count * slot.size).reshape(count, -1).sum(1).double()
                key = slot_key(slot, count, order)
                self.totals[key] = self.totals[key] + total if key in self.totals else total


def taylor_sums(s: LayerGroups, stats: Stats, order: int) -> torch.Tensor:
    """Per group and slot of `s` [count, n_slots]: the sum over its weights of w * g (order 1; g the batch gradient)
    or of w^2 * F (order 2; F the empirical Fisher's diagonal), from the per-group totals when calibration kept those
    (`--stats-store groups`), else from the per-weight store."""
    if stats.group_sums:
        return torch.stack([stats.group_sums[slot_key(slot, s.count, order)].float().cpu() for slot in s.slots], dim=1)
    if order == 1:
        return s.member_sums(lambda slot: slot.param.detach() * stats.grad[slot.name])
    return s.member_sums(lambda slot: slot.param.detach().float().square() * stats.fisher[slot.name])


def per_layer(score: Callable[[LayerGroups, Stats], torch.Tensor]) -> Callable[[list[LayerGroups], Stats, dict], Scores]:
    """Lift a criterion that scores one layer's groups on its own."""
    return lambda sets, stats, options: Scores([score(s, stats) for s in sets])


def collect_stats(model: nn.Module, samples: torch.Tensor, param_names: set[str], fisher: bool,
                  batch_size: int = 4, seed: int = 0,
                  per_sample: Callable[[dict[str, torch.Tensor], float], dict[str, torch.Tensor]] | None = None,
                  memory: Memory = Memory(), sets: list[LayerGroups] | None = None) -> Stats:
    """Accumulate gradient statistics of `param_names` over `samples` [n, seq_len] (token ids).

    With `fisher`, every sample gets its own backward pass: the empirical Fisher needs per-sample gradients,
    and the batch gradient is their mean. Without it, micro-batches of `batch_size` are enough. `per_sample`
    (with `fisher`) gets every sample's gradients and the scale that makes them per-sample ones; the moments of
    what it returns go to `stats.samples`. `memory.checkpointing` recomputes decoder layers' activations in the
    backward pass; finished accumulators move to `memory.store_dtype` / `store_device`. With `memory.store` "groups",
    each gradient goes into the per-group totals of `sets` instead (`GroupSums`, in `stats.group_sums`).
    """
    stats = Stats(seed=seed)
    params = dict(model.named_parameters())
    device = next(model.parameters()).device
    stats.grad.device = stats.fisher.device = device
    was_training = model.training
    saved_flags = {name: p.requires_grad for name, p in params.items()}
    model.eval()  # no dropout: scores must be reproducible
    for name, p in params.items():
        p.requires_grad_(name in param_names)
        p.grad = None
    step, n = (1 if fisher else batch_size), len(samples)
    sums = GroupSums(sets or [], param_names, fisher) if memory.store == "groups" else None
    per_weight = param_names if sums is None else set()
    grad = {name: torch.zeros_like(params[name], dtype=torch.float32) for name in per_weight}
    squares = {name: torch.zeros_like(params[name], dtype=torch.float32) for name in per_weight} if fisher else {}

    trimmer = HeapTrimmer()  # freed gradients and their products must not pile up in the heap

    def add(name: str) -> None:
        if sums is not None:
            sums.add(name, params[name], params[name].grad, n)
        else:
            g = params[name].grad.float()
            grad[name] += g
            if fisher:  # g is the per-sample gradient scaled by 1/n; undo the scale before squaring
                squares[name] += (g * n).square() / n
        params[name].grad = None
        trimmer()

    # Each weight's gradient is added to the statistics (and freed) the moment backward has it, so only one weight's
    # gradient exists at a time instead of every prunable weight's; per-sample criteria need them all at once.
    hooks = [] if per_sample is not None else [params[name].register_post_accumulate_grad_hook(lambda p, name=name: add(name))
                                               for name in param_names]
    try:
        with checkpointed(model, memory.checkpointing):
            for start in tqdm(range(0, n, step), desc="gradients", unit="batch" if step > 1 else "sample", leave=False):
                batch = samples[start:start + step].to(device)
                loss = model(input_ids=batch, labels=batch, use_cache=False).loss * (len(batch) / n)
                loss.backward()
                if per_sample is not None:
                    for key, value in per_sample({name: params[name].grad for name in param_names}, float(n)).items():
                        stats.samples.setdefault(key, Moments()).add(value[None])
                    for name in param_names:
                        add(name)
    finally:
        for hook in hooks:
            hook.remove()
        for name, p in params.items():
            p.requires_grad_(saved_flags[name])
            p.grad = None
        model.train(was_training)
    if sums is not None:
        stats.group_sums = sums.totals
    store = {"dtype": getattr(torch, memory.store_dtype), "device": memory.store_device or device}
    for name in per_weight:
        dict.__setitem__(stats.grad, name, grad.pop(name).to(**store))
        if fisher:
            dict.__setitem__(stats.fisher, name, squares.pop(name).to(**store))
    return stats


@contextmanager
def checkpointed(model: nn.Module, enabled: bool):
    """Within it, every decoder layer's forward is run under torch.utils.checkpoint (its activations recomputed in
    backward). transformers' own switch only acts in training mode, which would turn dropout on in OPT or BLOOM."""
    if not enabled:
        yield
        return
    layers = model.get_submodule(adapter_for(model.config).layers)
    own = [layer.__dict__.get("forward") for layer in layers]  # an instance-level forward, if some wrapper set one
    for layer in layers:
        layer.forward = functools.partial(torch.utils.checkpoint.checkpoint, layer.forward, use_reentrant=False)
    try:
        yield
    finally:
        for layer, forward in zip(layers, own):
            if forward is None:
                del layer.forward  # back to the class's own method
            else:
                layer.forward = forward


def collect_inputs(model: nn.Module, samples: torch.Tensor, module_names: set[str], batch_size: int = 4,
                   outer: bool = False, sequential: bool = False, device: str | torch.device | None = None,
                   spill: Path | None = None) -> dict[str, Moments]:
    """Moments of each named Linear's input features over all calibration tokens (forward passes only); `outer`
    keeps each one's full second moment too. `sequential` walks the decoder one layer at a time (`hywia.walk`: the
    same moments, only one layer's activations live, and with `device` only one layer's weights there). With
    `spill` (a folder; `outer` only) the walk is sequential and each layer's second moments go to disk as it ends."""
    moments = {name: Moments(outer=outer) for name in module_names}
    was_training = model.training
    model.eval()
    try:
        if sequential or (outer and spill is not None):
            finished = spiller(moments, spill, decoder_layers(model)[0]) if outer and spill is not None else None
            walk_layers(model, samples, module_names, lambda name, x: moments[name].add(x), batch_size=batch_size,
                        device=device, desc="activations", finished=finished)
            return moments
        handles = [model.get_submodule(name).register_forward_pre_hook(lambda module, args, name=name: moments[name].add(args[0]))
                   for name in module_names]
        device = next(model.parameters()).device
        # the pass runs for its hooks: logits of the last position only (a batch's at every position over Gemma 3's
        # 262,144-token vocabulary is 0.5 GB that nothing reads)
        last_only = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
        try:
            with torch.no_grad():
                for start in tqdm(range(0, len(samples), batch_size), desc="activations", unit="batch", leave=False):
                    model(input_ids=samples[start:start + batch_size].to(device), use_cache=False, **last_only)
        finally:
            for handle in handles:
                handle.remove()
    finally:
        model.train(was_training)
    return moments


_SPILLED = itertools.count()


def spiller(moments: dict[str, Moments], folder: Path, layers_path: str) -> Callable[[int, nn.Module], None]:
    """A walk's `finished` hook that spills the second moments of the Linears of each layer the walk is done with."""
    def finished(index: int, layer: nn.Module) -> None:
        prefix = f"{layers_path}.{index}."
        for name, m in moments.items():
            if name.startswith(prefix) and not isinstance(m.cross, Path):
                m.spill(folder / f"{name}.{next(_SPILLED)}.pt")
    return finished


CRITERIA: dict[str, Criterion] = {}  # filled by hywia.methods, one module per method family


def register(name: str, criterion: Criterion) -> None:
    CRITERIA[name] = criterion


def get_criterion(name: str, options: dict | None = None) -> Criterion:
    """The registered criterion `name`, refusing options it does not take."""
    if name not in CRITERIA:
        raise HywiaError(f"unknown method '{name}': choose one of {', '.join(CRITERIA)}")
    criterion = CRITERIA[name]
    check_method_options(name, criterion.options, criterion.check, options)
    return criterion


def check_method_options(method: str, accepted: tuple[str, ...], check: Callable[[dict], object] | None, options: dict | None) -> None:
    """Refuse an option the method does not take (naming those it does), then let the method check the values."""
    unknown = sorted(set(options or {}) - set(accepted))
    if unknown:
        flags = ", ".join("--" + o.replace("_", "-") for o in accepted)
        raise HywiaError(f"--{unknown[0].replace('_', '-')} does not apply to --method {method}" + (f" (it takes {flags})" if accepted else ""))
    if check is not None:
        check(options or {})
