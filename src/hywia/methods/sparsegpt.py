"""SparseGPT (Frantar & Alistarh, ICML 2023): layer-wise optimal brain surgeon on the calibration Hessian.

For one Linear with weights W [rows, cols] and calibration inputs X, the layer's squared output error has the
Hessian H = 2 X X^T, shared by every row. Columns are visited left to right in blocks of `blocksize`: in each
block the mask is chosen by the OBS saliency w^2 / [H^-1]_jj^2 (lowest go; for N:M, chosen every M columns),
and each column, once pruned (and optionally quantized), leaves its error e = (w - q) / [H^-1]_jj, which the
columns not yet visited absorb through the upper Cholesky factor of H^-1: W[:, j:] -= e [H^-1]_{j, j:}. The
weights that stay are therefore updated to compensate for those that go; `wbits` quantizes them in the same
pass (round to nearest on a per-row min-max grid, GPTQ-style), which is how this family pairs pruning with
quantization. The mixed-sparsity method (methods/mixed.py) runs this with a sparsity per matrix.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import HywiaError
from ..sparsify import InputStats, Pattern, Sparsifier, pattern_mask, register

BLOCKSIZE = 128
PERCDAMP = 0.01  # dampening: 1% of the mean diagonal of H, the reference's default


def check(options: dict) -> None:
    bits = options.get("wbits")
    if bits is not None and not 2 <= int(bits) <= 8:
        raise HywiaError(f"--wbits {bits} is out of range: 2 to 8 bits (leave it out to keep float weights)")


def _grid(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-row asymmetric min-max quantization grid (scale, zero point, top level) of `weight` [rows, cols]."""
    top = 2 ** bits - 1
    low, high = weight.min(1).values.clamp(max=0), weight.max(1).values.clamp(min=0)
    scale = ((high - low) / top).clamp(min=1e-12)
    return scale, torch.round(-low / scale), top


def _quantize(column: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, top: int) -> torch.Tensor:
    return scale * (torch.clamp(torch.round(column / scale) + zero, 0, top) - zero)


def inverse_hessian_factor(hessian: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The upper Cholesky factor of (H + damp I)^-1; input features never seen (zero diagonal) get a unit entry and
    their weights are zeroed by the caller, as the reference does."""
    hessian = hessian.clone()
    dead = hessian.diagonal() == 0
    hessian[dead, dead] = 1
    weight[:, dead] = 0
    hessian.diagonal().add_(PERCDAMP * hessian.diagonal().mean())
    try:
        return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hessian)), upper=True)
    except torch.linalg.LinAlgError:
        raise HywiaError("the calibration Hessian of a layer is not positive definite even after dampening; "
                         "calibrate on more samples (--samples) or longer windows (--seq-len)") from None


def sparsegpt(module: nn.Linear, stats: InputStats, sparsity: float, pattern: Pattern | None, options: dict) -> None:
    weight = module.weight.data.float().clone()
    rows, cols = weight.shape
    factor = inverse_hessian_factor(stats.second.to(weight.device), weight)
    bits = options.get("wbits")
    grid = _grid(weight, int(bits)) if bits else None
    total = round(sparsity * weight.numel())
    for i1 in range(0, cols, BLOCKSIZE):
        i2 = min(i1 + BLOCKSIZE, cols)
        block, inverse = weight[:, i1:i2].clone(), factor[i1:i2, i1:i2]
        errors = torch.zeros_like(block)
        saliency = block.square() / inverse.diagonal()[None, :].square()
        if pattern is None:  # this block's share of the matrix's count, so the matrix ends at exactly `total` zeros
            count = round(total * i2 / cols) - round(total * i1 / cols)
            mask = torch.zeros_like(block, dtype=torch.bool)
            if count:
                mask.view(-1)[saliency.flatten().topk(count, largest=False).indices] = True
        else:
            mask = torch.zeros_like(block, dtype=torch.bool)
        for j in range(i2 - i1):
            if pattern is not None and j % pattern[1] == 0:
                if (i2 - i1 - j) < pattern[1]:
                    raise HywiaError(f"--pattern {pattern[0]}:{pattern[1]} needs input widths divisible by {pattern[1]}; a matrix here has {cols} columns")
                saliency = block[:, j:j + pattern[1]].square() / inverse.diagonal()[j:j + pattern[1]][None, :].square()
                mask[:, j:j + pattern[1]] = pattern_mask(saliency, pattern)
            column = block[:, j]
            kept = _quantize(column, *grid) if grid else column.clone()
            kept[mask[:, j]] = 0
            error = (column - kept) / inverse[j, j]
            block[:, j:] -= error[:, None] * inverse[j, j:][None, :]
            block[:, j] = kept
            errors[:, j] = error
        weight[:, i1:i2] = block
        weight[:, i2:] -= errors @ factor[i1:i2, i2:]
    module.weight.data.copy_(weight.to(module.weight.dtype))


register("sparsegpt", Sparsifier(sparsegpt, needs_hessian=True, options=("wbits",), check=check))
