"""Importance criteria: functions from one layer's groups and calibration statistics to per-group scores.

Statistics come from the causal-LM loss on calibration samples:
  grad   = gradient of the mean loss over the batch (first order, what `vector` and `element1` use);
  fisher = mean over samples of the squared per-sample gradient, the diagonal of the empirical Fisher, which
           stands in for the Hessian diagonal in the second-order Taylor term (what `element2` uses).
and from a forward pass alone:
  inputs = per input feature of every input-column projection (o_proj, down_proj), the count, sum and sum of
           squares of its value over calibration tokens: the activation norms Wanda-sp weighs weights by, and
           the mean and variance FLAP scores (variance) and compensates (mean) with.
A criterion declares which of them it needs, so magnitude criteria never run a backward pass, activation
criteria never run one either, and only the second-order ones pay for per-sample backward passes.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import HywiaError
from .grouping import LayerGroups


@dataclass
class InputMoments:
    """Running moments of a Linear's input features over calibration tokens, in float64 so that the variance of
    features with a large mean survives the subtraction."""

    count: int = 0
    total: torch.Tensor | float = 0.0
    squares: torch.Tensor | float = 0.0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double()
        self.count += len(x)
        self.total = self.total + x.sum(0)
        self.squares = self.squares + x.square().sum(0)

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.count

    @property
    def variance(self) -> torch.Tensor:
        """Unbiased sample variance per feature."""
        return (self.squares - self.total.square() / self.count).clamp_min(0) / max(self.count - 1, 1)


@dataclass
class Stats:
    """Calibration statistics: gradients keyed by full parameter name (float32, on the parameter's device),
    input moments keyed by module name."""

    grad: dict[str, torch.Tensor] = field(default_factory=dict)
    fisher: dict[str, torch.Tensor] = field(default_factory=dict)
    inputs: dict[str, InputMoments] = field(default_factory=dict)
    seed: int = 0


@dataclass
class Scores:
    """Per-group scores aligned with the list of LayerGroups, and any intermediate scores worth keeping."""

    per_set: list[torch.Tensor]
    details: dict[str, list[torch.Tensor]] = field(default_factory=dict)


@dataclass(frozen=True)
class Criterion:
    """`score(sets, stats, options)` scores every LayerGroups at once, so a criterion may normalise across layers.
    `options` names the keyword options it accepts (e.g. a fusion's alpha); others are refused, and `check`
    validates their values before any model is loaded. `scope` is the allocation the method is defined with
    (the default when none is asked for); `compensates` asks removal to fold the calibration mean of every removed
    input column into the output bias (FLAP's bias compensation)."""

    score: Callable[[list[LayerGroups], Stats, dict], Scores]
    needs_grad: bool = False
    needs_fisher: bool = False
    needs_inputs: bool = False
    options: tuple[str, ...] = ()
    check: Callable[[dict], object] | None = None
    scope: str = "layer"
    compensates: bool = False

    @property
    def needs_data(self) -> bool:
        return self.needs_grad or self.needs_fisher or self.needs_inputs


def per_layer(score: Callable[[LayerGroups, Stats], torch.Tensor]) -> Callable[[list[LayerGroups], Stats, dict], Scores]:
    """Lift a criterion that scores one layer's groups on its own."""
    return lambda sets, stats, options: Scores([score(s, stats) for s in sets])


def collect_stats(model: nn.Module, samples: torch.Tensor, param_names: set[str], fisher: bool,
                  batch_size: int = 4, seed: int = 0) -> Stats:
    """Accumulate gradient statistics of `param_names` over `samples` [n, seq_len] (token ids).

    With `fisher`, every sample gets its own backward pass: the empirical Fisher needs per-sample gradients,
    and the batch gradient is their mean. Without it, micro-batches of `batch_size` are enough.
    """
    stats = Stats(seed=seed)
    params = dict(model.named_parameters())
    was_training = model.training
    saved_flags = {name: p.requires_grad for name, p in params.items()}
    model.eval()  # no dropout: scores must be reproducible
    for name, p in params.items():
        p.requires_grad_(name in param_names)
        p.grad = None
    device = next(model.parameters()).device
    step = 1 if fisher else batch_size
    try:
        for name in param_names:
            stats.grad[name] = torch.zeros_like(params[name], dtype=torch.float32)
            if fisher:
                stats.fisher[name] = torch.zeros_like(params[name], dtype=torch.float32)
        n = len(samples)
        for start in tqdm(range(0, n, step), desc="gradients", unit="batch" if step > 1 else "sample", leave=False):
            batch = samples[start:start + step].to(device)
            loss = model(input_ids=batch, labels=batch).loss * (len(batch) / n)
            loss.backward()
            for name in param_names:
                g = params[name].grad.float()
                stats.grad[name] += g
                if fisher:  # g is the per-sample gradient scaled by 1/n; undo the scale before squaring
                    stats.fisher[name] += (g * n).square() / n
                params[name].grad = None
    finally:
        for name, p in params.items():
            p.requires_grad_(saved_flags[name])
            p.grad = None
        model.train(was_training)
    return stats


def collect_inputs(model: nn.Module, samples: torch.Tensor, module_names: set[str], batch_size: int = 4) -> dict[str, InputMoments]:
    """Moments of each named Linear's input features over all calibration tokens (forward passes only)."""
    moments = {name: InputMoments() for name in module_names}
    handles = [model.get_submodule(name).register_forward_pre_hook(lambda module, args, name=name: moments[name].add(args[0]))
               for name in module_names]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for start in tqdm(range(0, len(samples), batch_size), desc="activations", unit="batch", leave=False):
                model(input_ids=samples[start:start + batch_size].to(device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return moments


def _random(groups: LayerGroups, stats: Stats) -> torch.Tensor:
    """Uniform random scores, seeded per layer and kind so a run is reproducible."""
    generator = torch.Generator().manual_seed(stats.seed * 100_003 + groups.layer * 2 + (groups.kind == "mlp"))
    return torch.rand(groups.count, generator=generator)


def _l1(groups: LayerGroups, stats: Stats) -> torch.Tensor:
    return groups.sum(lambda s: s.param.detach().abs())


def _l2(groups: LayerGroups, stats: Stats) -> torch.Tensor:
    return groups.sum(lambda s: s.param.detach().square()).sqrt()


def _element1(groups: LayerGroups, stats: Stats) -> torch.Tensor:
    """LLM-Pruner Element^1 (`param_first`): sum over the group's weights of |w * dL/dw|."""
    return groups.sum(lambda s: (s.param.detach() * stats.grad[s.name]).abs())


def _element2(groups: LayerGroups, stats: Stats) -> torch.Tensor:
    """LLM-Pruner Element^2 (`param_second`): sum of |1/2 w^2 F_ww| with F the diagonal empirical Fisher."""
    return groups.sum(lambda s: 0.5 * s.param.detach().float().square() * stats.fisher[s.name])


def _vector(groups: LayerGroups, stats: Stats) -> torch.Tensor:
    """First-order Taylor of removing the group as a whole: |sum over the group of w * dL/dw| on the batch."""
    return groups.sum(lambda s: s.param.detach() * stats.grad[s.name]).abs()


def _wanda_sp(groups: LayerGroups, stats: Stats) -> torch.Tensor:
    """Wanda-sp (the structured Wanda of An et al., FLAP, AAAI 2024): sum over the group's input columns of the
    output projection (o_proj / down_proj) of |W_ij| * ||X_j||_2, X_j the column's input over calibration tokens.
    Rows of q/k/v/gate/up contribute nothing: Wanda-sp scores a structure by the weights that read its output."""
    def per_weight(slot):
        if slot.dim != 1:
            return torch.zeros_like(slot.param, dtype=torch.float32)
        norm = stats.inputs[slot.name.rsplit(".", 1)[0]].squares.sqrt().float()
        return slot.param.detach().float().abs() * norm
    return groups.sum(per_weight)


def _column_fluctuation(groups: LayerGroups, stats: Stats) -> torch.Tensor:
    """FLAP's weighted input feature variance of every input column of the group's output projection,
    Var(X_j) * ||W_:,j||^2, as [count, columns per group]."""
    name, (module, _, size) = next((name, member) for name, member in groups.modules.items() if member[1] == 1)
    column_norms = module.weight.detach().double().square().sum(0)
    return (stats.inputs[name].variance.to(column_norms.device) * column_norms).float().cpu().reshape(groups.count, size)


def _flap(sets: list[LayerGroups], stats: Stats, options: dict) -> Scores:
    """FLAP (An et al., AAAI 2024): a structure matters as much as its output fluctuates over calibration tokens,
    since a steady output is replaced by its mean through the bias. Column fluctuations are standardised over all
    layers per kind (attention, MLP), so that the two kinds can share one ranking, and a group scores the mean of
    its standardised columns (an attention group: the n_rep * head_dim columns of one KV head's query heads)."""
    columns = [_column_fluctuation(s, stats) for s in sets]
    scores: list[torch.Tensor] = [torch.empty(0)] * len(sets)
    for kind in dict.fromkeys(s.kind for s in sets):
        members = [i for i, s in enumerate(sets) if s.kind == kind]
        pooled = torch.cat([columns[i].flatten() for i in members])
        mean, std = pooled.mean(), pooled.std() if len(pooled) > 1 else torch.tensor(0.0)
        for i in members:
            scores[i] = ((columns[i] - mean) / (std if std > 0 else 1)).mean(1)
    return Scores(scores)


CRITERIA: dict[str, Criterion] = {
    "random": Criterion(per_layer(_random)),
    "l1": Criterion(per_layer(_l1)),
    "l2": Criterion(per_layer(_l2)),
    "element1": Criterion(per_layer(_element1), needs_grad=True),
    "element2": Criterion(per_layer(_element2), needs_grad=True, needs_fisher=True),
    "vector": Criterion(per_layer(_vector), needs_grad=True),
    "wanda_sp": Criterion(per_layer(_wanda_sp), needs_inputs=True),
    "flap": Criterion(_flap, needs_inputs=True, scope="joint", compensates=True),
}


def register(name: str, criterion: Criterion) -> None:
    CRITERIA[name] = criterion


def get_criterion(name: str, options: dict | None = None) -> Criterion:
    """The registered criterion `name`, refusing options it does not take."""
    if name not in CRITERIA:
        raise HywiaError(f"unknown method '{name}': choose one of {', '.join(CRITERIA)}")
    criterion = CRITERIA[name]
    unknown = sorted(set(options or {}) - set(criterion.options))
    if unknown:
        raise HywiaError(f"--{unknown[0].replace('_', '-')} does not apply to --method {name}" +
                         (f" (it takes {', '.join(criterion.options)})" if criterion.options else ""))
    if criterion.check is not None:
        criterion.check(options or {})
    return criterion
