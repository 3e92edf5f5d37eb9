"""Reconstruction: the weights that read removed groups' outputs are refit by least squares on calibration inputs,
layer by layer on what the already-pruned layers produce.

For an output projection (o_proj, down_proj) W [out, in] with calibration inputs X [in, tokens], H = X X^T, and
kept input columns K, the refit

    W_K' = argmin ||W X - W_K' X_K||^2 = W H[:, K] (H_KK + damp I)^-1

is the Optimal Brain Surgeon update for removing the other columns R at once (W_K' = W_K - W_R ([H^-1]_RR)^-1
[H^-1]_RK, the same matrix), dampened as SparseGPT dampens (1% of the mean diagonal). With `intercept` the bias is
refit jointly (a constant feature 1 appended to X): the least-squares optimum over weights and bias, of which
FLAP's bias compensation (W_K unchanged, b += W_R mean(X_R)) is one feasible point, so never better.

`remove_and_refit` walks the decoder (`hywia.walk`): each layer runs on the outputs of the layers already pruned
and refit, its output projections' inputs give H, its groups are removed and its readers refit, and the changed
layer runs again for the next one (SparseGPT's protocol). A method that chooses its groups from H itself (SlimGPT,
methods/slimgpt.py, and any criterion under `--reconstruct obs`) passes `select`, which picks, per set, as many
groups as the allocation removed there: `obs_select`, greedy OBS on the same H (errors of whole heads from the
Cholesky factors of their blocks of H^-1, each removal followed by the OBS update of W and H^-1); the refit then
starts from that H^-1 (`obs_refit`) instead of factorising H_KK again.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
import itertools
import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from .costs import trim_heap
from .errors import HywiaError
from .grouping import LayerGroups
from .importance import Moments
from .removal import remove_groups
from .walk import decoder_layers, walk_layers

if TYPE_CHECKING:
    from .aside import Aside

PERCDAMP = 0.01  # SparseGPT's dampening: 1% of the mean diagonal of H
DEGENERATE = ("the calibration inputs of a layer are degenerate even after dampening; calibrate on more samples "
              "(--reconstruct-samples) or longer windows (--seq-len), or leave --reconstruct out")

_SPILLED = itertools.count()  # numbers the spilled inverses' files apart

Select = Callable[[LayerGroups, torch.Tensor, torch.Tensor, int], torch.Tensor]  # (set, W, (H + damp I)^-1, groups to remove) -> ids


def dampened(hessian: torch.Tensor, damp: float = PERCDAMP) -> torch.Tensor:
    """H + damp * mean(diag H) * I in float64; input features never seen (zero diagonal) get a unit diagonal, so the
    solve stays defined and their (zero) inputs get zero weight."""
    h = hessian.double().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    h.diagonal().add_(damp * h.diagonal().mean())
    return h


def damped_inverse(hessian: torch.Tensor, damp: float = PERCDAMP) -> torch.Tensor:
    """(H + damp I)^-1 in float64 (`dampened`): what greedy OBS selects by and `obs_refit` refits from."""
    factor, info = torch.linalg.cholesky_ex(dampened(hessian, damp))
    if info:
        raise HywiaError(DEGENERATE)
    return torch.cholesky_inverse(factor)


def obs_refit(weight: torch.Tensor, inverse: torch.Tensor, keep: torch.Tensor, total: torch.Tensor | None = None,
              count: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`refit` from the dampened inverse H^-1 that OBS selection has already made: the OBS update that removes the
    other columns R at once, W_K' = W_K - W_R ([H^-1]_RR)^-1 [H^-1]_RK, the same matrix as refit's solve. It costs
    |R|^3 + |R|^2 |K| + out |R| |K| operations where refit's factorisation of H_KK costs |K|^3 / 3 + 2 out |K|^2: at
    20% of a 1.5B model's down projection about a tenth. With `total` and `count` the constant feature 1 joins X, as
    in `refit`: the rows R of the inverse of [[H, s], [s^T, count]] come from H^-1 by the block inverse (u = H^-1 s,
    sigma = count - s.u), and the constant's column of the update is the bias shift."""
    w, n = weight.double(), inverse.shape[0]
    keep = keep.to(inverse.device)
    gone = torch.ones(n, dtype=torch.bool, device=inverse.device)
    gone[keep] = False
    drop = gone.nonzero().flatten()
    rows = inverse[drop]  # [R, n]
    if total is not None:
        s = total.double().to(inverse.device)
        u = inverse @ s
        sigma = count - s @ u
        rows = torch.cat([rows + u[drop, None] * u[None] / sigma, -u[drop, None] / sigma], 1)
        keep = torch.cat([keep, keep.new_tensor([n])])
        w = torch.cat([w, w.new_zeros(len(w), 1)], 1)  # the constant's weight: no bias to shift yet
    factor, info = torch.linalg.cholesky_ex(rows[:, drop])
    step = torch.cholesky_solve(rows[:, keep], factor) if not info else torch.linalg.solve(rows[:, drop], rows[:, keep])
    new = w[:, keep] - w[:, drop] @ step
    return (new, None) if total is None else (new[:, :-1], new[:, -1])


def refit(weight: torch.Tensor, hessian: torch.Tensor, keep: torch.Tensor, total: torch.Tensor | None = None,
          count: int = 0, damp: float = PERCDAMP) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The least-squares kept columns W_K' [out, |K|] of `weight` [out, in] given H = X X^T [in, in] (summed over
    tokens), and with `total` (the inputs summed over the `count` tokens) the bias shift fit jointly (else None).

    The dampening enters as OBS has it, H + lambda I throughout, which adds lambda ||W_K' - W_K||^2 to the squared
    error: the refit is pulled towards the weights it starts from (as lambda grows it becomes removal alone), and
    equals the sequence of OBS updates that removes the other columns (methods/slimgpt.py). damp=0: plain least squares."""
    w = weight.double()
    h = dampened(hessian, damp) if damp else hessian.double()
    keep = keep.to(h.device)
    system, right = h[keep][:, keep], w @ h[:, keep]
    if total is not None:  # the constant feature 1 joins X: H gains the row and column of sums and the corner `count`
        s = total.double().to(h.device)
        system = torch.cat([torch.cat([system, s[keep, None]], 1), torch.cat([s[keep], s.new_tensor([count])])[None]], 0)
        right = torch.cat([right, (w @ s)[:, None]], 1)
    factor, info = torch.linalg.cholesky_ex(system)  # symmetric positive definite once dampened: half LU's work
    try:
        solution = torch.cholesky_solve(right.T, factor).T if not info else torch.linalg.solve(system, right.T).T
    except torch.linalg.LinAlgError:
        raise HywiaError(DEGENERATE) from None
    if total is None:
        return solution, None
    return solution[:, :-1], solution[:, -1]


def output_error(weight: torch.Tensor, hessian: torch.Tensor, new: torch.Tensor, bias_shift: torch.Tensor | None = None,
                 total: torch.Tensor | None = None, count: int = 0) -> float:
    """||W X - (W' X + shift)||^2 over the calibration tokens, from H alone: `new` [out, in] holds the kept columns'
    new weights and zeros for the removed ones; `shift` needs `total` (sum of inputs) and `count` (tokens)."""
    d = (weight.double() - new.double())
    error = torch.einsum("oi,ij,oj->", d, hessian.double(), d)
    if bias_shift is not None:
        b = bias_shift.double()
        error = error - 2 * b @ (d @ total.double()) + count * b @ b
    return error.item()


def group_errors(weight: torch.Tensor, inverse: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """E_C of every group: `columns` [groups, size] holds each group's input columns of `weight` [out, in]."""
    blocks = inverse[columns[:, :, None], columns[:, None, :]]  # [groups, size, size]
    factor, info = torch.linalg.cholesky_ex(blocks)
    if info.any():
        raise HywiaError("a head's block of the inverse calibration Hessian is not positive definite; calibrate on more "
                         "samples (--samples) or longer windows (--seq-len)")
    w = weight[:, columns].permute(1, 2, 0)  # [groups, size, out]
    return torch.linalg.solve_triangular(factor, w, upper=False).square().sum((1, 2))


def obs_remove(weight: torch.Tensor, inverse: torch.Tensor, drop: torch.Tensor,
               keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The OBS update that removes columns `drop` (1-d): `weight` and `inverse` (float64) over the columns `keep`
    alone. A removed column's row and column of the inverse are never read again, so only the kept block is updated:
    2 k^2 |drop| operations for k kept columns, where updating the whole inverse costs 2 n^2 |drop| at every step."""
    step = torch.linalg.solve(inverse[drop][:, drop], inverse[drop][:, keep])  # ([H^-1]_DD)^-1 [H^-1]_D,K
    return weight[:, keep] - weight[:, drop] @ step, inverse[keep][:, keep] - inverse[keep][:, drop] @ step


def obs_order(s: LayerGroups, weight: torch.Tensor, inverse: torch.Tensor, count: int) -> torch.Tensor:
    """The first `count` groups of `s` that batched greedy OBS removes, in the order it removes them (cheapest first
    within a batch), from its reader's weights and dampened inverse calibration Hessian (`damped_inverse`)."""
    if count == 0:
        return torch.zeros(0, dtype=torch.long)
    reader, device = s.reader, weight.device
    columns = reader.indices(torch.arange(s.count)).to(device)  # group-major: group g owns size columns in a row
    # OBS on the groups' block of the inverse is OBS with every other column kept, so only that block is carried;
    # after each batch it shrinks to the groups still alive (`alive`, in the order of its column blocks)
    w, inverse = weight.double()[:, columns], inverse[columns][:, columns]
    blocks = torch.arange(s.count * reader.size, device=device).view(s.count, reader.size)
    alive = torch.arange(s.count, device=device)
    gone: list[int] = []
    per_block = s.count // s.blocks
    while len(gone) < count:
        here = blocks[:len(alive)]
        errors = torch.full((s.count,), math.inf, dtype=torch.float64, device=device)
        errors[alive] = group_errors(w, inverse, here)
        if s.blocks > 1:  # one group from every block per step
            picked = errors.view(s.blocks, per_block).argmin(1) + per_block * torch.arange(s.blocks, device=device)
        else:  # heads one at a time; channels half of those still to go at once
            batch = (count - len(gone) + 1) // 2 if s.kind == "mlp" else 1
            picked = errors.topk(batch, largest=False).indices
        dropped = torch.zeros(len(alive), dtype=torch.bool, device=device)
        dropped[torch.searchsorted(alive, picked)] = True
        w, inverse = obs_remove(w, inverse, here[dropped].flatten(), here[~dropped].flatten())
        alive = alive[~dropped]
        gone += picked.tolist()
    return torch.tensor(gone, dtype=torch.long)


def obs_select(s: LayerGroups, weight: torch.Tensor, inverse: torch.Tensor, count: int) -> torch.Tensor:
    """The `count` groups of `s` that batched greedy OBS removes, from its reader's weights and dampened inverse
    calibration Hessian."""
    return obs_order(s, weight, inverse, count).sort().values


class PrefixSelect:
    """`obs_select` for a screen that asks each set for several counts of the same dense weights (the evidence
    split's candidates): one greedy run per set to the largest count asked so far, whose first `count` removals
    answer every smaller request. Exact for heads (removed one step at a time, so a shorter run is a prefix); for MLP
    channels a smaller count gets the longer run's prefix, whose batches fall differently from its own run's. One
    greedy run per set instead of one per candidate: at 0.5B the runs were most of the screen's time."""

    def __init__(self) -> None:
        self.orders: dict[tuple[int, str], torch.Tensor] = {}

    def __call__(self, s: LayerGroups, weight: torch.Tensor, inverse: torch.Tensor, count: int) -> torch.Tensor:
        order = self.orders.get((s.layer, s.kind))
        if order is None or len(order) < count:
            order = self.orders[(s.layer, s.kind)] = obs_order(s, weight, inverse, count)
        return order[:count].sort().values


def accumulate(m: Moments, x: torch.Tensor) -> None:
    """Add inputs `x` [..., in] to `m`: X X^T per batch in float32 (as SparseGPT accumulates it; float64 would triple
    the walk's time), summed in float64, with the inputs' sum and count for the intercept."""
    x = x.detach().reshape(-1, x.shape[-1]).float()
    m.count += len(x)
    m.total = m.total + x.sum(0).double()
    if isinstance(m.cross, float):  # the first batch
        m.cross = (x.T @ x).double()
    else:
        m.cross.add_(x.T @ x)  # promoted to float64 in place: no second [in, in] float64 tensor per batch


@dataclass
class Inverse:
    """A reader's dampened inverse input second moment (H + damp I)^-1, in memory or in a file (`matrix`), with the
    inputs' sum and count for an intercept: all that OBS selection and `obs_refit` read."""

    matrix: torch.Tensor | Path
    total: torch.Tensor
    count: int

    def full(self) -> torch.Tensor:
        return torch.load(self.matrix, weights_only=True) if isinstance(self.matrix, Path) else self.matrix

    def discard(self) -> None:
        """Drop the matrix, and its file: at 1.5B one set of them is 18 GB of disk."""
        if isinstance(self.matrix, Path):
            self.matrix.unlink(missing_ok=True)
        self.matrix = torch.zeros(0)


def reader_inverses(model: nn.Module, sets: list[LayerGroups], ids: torch.Tensor, batch_size: int,
                    device: str | torch.device | None = None, spill: Path | None = None,
                    damp: float = PERCDAMP) -> dict[str, Inverse]:
    """The dense model's inputs of every reader of `sets` on `ids`, accumulated as the walk accumulates them and
    inverted, dampened, once the walk is past each layer: what every candidate of the refit screen reads, so that
    each reader is factorised once for all candidates. With `spill` (a folder), each inverse goes to disk."""
    moments = {s.reader.name: Moments() for s in sets}
    inverses: dict[str, Inverse] = {}
    prefix = decoder_layers(model)[0]

    def finished(index: int, layer: nn.Module) -> None:
        for name in [n for n in moments if n.startswith(f"{prefix}.{index}.")]:
            m = moments.pop(name)
            matrix = damped_inverse(m.cross, damp)
            if spill is not None:
                torch.save(matrix, path := spill / f"{name}.inverse.{next(_SPILLED)}.pt")
                matrix = path
            inverses[name] = Inverse(matrix, m.total, m.count)

    walk_layers(model, ids, set(moments), lambda name, x: accumulate(moments[name], x), batch_size=batch_size,
                device=device, desc="reader inputs", finished=finished)
    return inverses


def kept_columns(s: LayerGroups, removed: torch.Tensor, width: int) -> torch.Tensor:
    """Indices of the reader's input columns that survive removing `removed` from `s`."""
    keep = torch.ones(width, dtype=torch.bool)
    keep[s.reader.indices(removed)] = False
    return keep.nonzero().flatten()


@contextmanager
def refitted(sets: list[LayerGroups], removed: list[torch.Tensor], inverses: dict[str, Inverse], intercept: bool,
             select: Select | None = None) -> Iterator[None]:
    """Within the block, the model computes as if `removed` were gone and every reader refit (after `select`, if
    given, re-chose as many groups per set) on `inverses`, from the dense model's inputs of each reader
    (`reader_inverses`): the one-shot reconstruction of all layers at once. The evidence split (hywia.split) weighs
    its candidates this way under `--kind-split evidence-refit`, because which share of attention is cheapest to lose
    depends on whether the readers are refit (an o_proj refit absorbs much of a removed head). It is not the sequential
    walk, which would cost one walk per candidate. The readers' weights are restored on exit."""
    saved: dict[str, torch.Tensor] = {}
    handles = []
    try:
        for s, gone in zip(sets, removed):
            if not len(gone):
                continue
            module, inverse = s.reader.module, inverses[s.reader.name]
            weight = module.weight.data
            saved.setdefault(s.reader.name, weight.clone())
            matrix = inverse.full().to(weight.device)
            if select is not None:
                gone = select(s, weight, matrix, len(gone))
            keep = kept_columns(s, gone, weight.shape[1])
            new, shift = obs_refit(weight, matrix, keep, inverse.total.to(weight.device) if intercept else None, inverse.count)
            del matrix
            weight.zero_()
            weight[:, keep] = new.to(weight.dtype)
            if shift is not None:
                handles.append(module.register_forward_hook(
                    lambda mod, args, out, shift=shift.to(weight.dtype): out + shift.to(out.device, out.dtype)))
            trim_heap()  # the solve's float64 temporaries, freed, would otherwise stay resident through the forward pass
        yield
    finally:
        for handle in handles:
            handle.remove()
        for s in sets:
            if s.reader.name in saved:
                s.reader.module.weight.data.copy_(saved.pop(s.reader.name))


def _refit_reader(s: LayerGroups, removed: torch.Tensor, m: Moments, intercept: bool, damp: float,
                  inverse: torch.Tensor | None = None) -> tuple[dict[str, float], torch.Tensor | None]:
    """Refit, in place, the kept columns of the reader of `s` on its input moments `m` (the removed columns are left
    for removal to drop), from `inverse`, the dampened inverse of its X^T X, where a selection made it already;
    returns its relative output errors, removed alone and refit, and the bias shift if any."""
    weight = s.reader.module.weight.data
    h = m.cross.to(weight.device)
    keep = kept_columns(s, removed, weight.shape[1])
    total = m.total.to(weight.device) if intercept else None
    new, shift = refit(weight, h, keep, total, m.count, damp) if inverse is None else obs_refit(weight, inverse, keep, total, m.count)
    placed = torch.zeros_like(weight, dtype=torch.float64)
    placed[:, keep] = new
    gone = s.reader.indices(removed).to(weight.device)  # removal alone errs by W_R H_RR W_R^T: |R|^2, not in^2
    scale = max(output_error(weight, h, torch.zeros_like(weight)), 1e-30)
    errors = {"removed": output_error(weight[:, gone], h[gone][:, gone], torch.zeros_like(weight[:, gone])) / scale,
              "refit": output_error(weight, h, placed, shift, m.total, m.count) / scale}
    weight[:, keep] = new.to(weight.dtype)
    return errors, shift


def remove_and_refit(model: nn.Module, sets: list[LayerGroups], removed: list[torch.Tensor], ids: torch.Tensor,
                     batch_size: int, intercept: bool, select: Select | None = None, damp: float = PERCDAMP,
                     device: str | torch.device | None = None, aside: Aside | None = None) -> dict[int, dict[str, dict[str, float]]]:
    """Remove `removed[i]` from `sets[i]` (in place: `select` may replace them by as many of its own choosing) layer
    by layer, refitting each reader on its inputs; with `intercept`, jointly with its bias. Returns per layer and
    kind the relative squared output error of the readers on their calibration inputs, removed alone vs refit.
    With `aside` (hywia.aside), the model stays as it is: the candidate is built on the aside's shadow, layer by layer."""
    if aside is not None:
        model, sets = aside.shadow, aside.sets
    by_layer: dict[int, list[int]] = {}
    for i, s in enumerate(sets):
        by_layer.setdefault(s.layer, []).append(i)
    moments = {s.reader.name: Moments() for s in sets}
    errors: dict[int, dict[str, dict[str, float]]] = {}
    observe = lambda name, x: accumulate(moments[name], x)  # noqa: E731

    def after(index: int, layer: nn.Module) -> bool:
        members = by_layer.get(index, [])
        if not members:
            return False
        shifts = {}
        for i in members:
            s, m = sets[i], moments.pop(sets[i].reader.name)
            inverse = None  # a selection's inverse serves the refit too: one factorisation of H a reader
            if select is not None and len(removed[i]):
                weight = s.reader.module.weight.data
                inverse = damped_inverse(m.cross.to(weight.device), damp)
                removed[i] = select(s, weight, inverse, len(removed[i]))
            if len(removed[i]):  # a set that loses nothing keeps its reader as it is
                errors.setdefault(index, {})[s.kind], shift = _refit_reader(s, removed[i], m, intercept, damp, inverse)
                if shift is not None:
                    shifts[s.reader.name] = shift
        remove_groups(model, [sets[i] for i in members], [removed[i] for i in members], shifts=shifts)
        return True

    hooks = {"before": aside.before, "finished": aside.finished, "passengers": aside.passengers} if aside is not None else {}
    walk_layers(model, ids, set(moments), observe, after, batch_size=batch_size, device=device,
                desc="reconstruct" if aside is None else "reconstruct aside", **hooks)
    return errors
