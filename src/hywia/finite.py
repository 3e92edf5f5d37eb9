"""Non-finite numbers never leave as results: weights before they are used or saved, scores before they are ranked,
losses and perplexities before they are reported. Each check names where the first bad value appeared."""
from __future__ import annotations

import math

import torch
from torch import nn

from .errors import HywiaError


def check_number(value: float, what: str, fix: str) -> float:
    if not math.isfinite(value):
        raise HywiaError(f"{what} is {value}: {fix}")
    return value


CHUNK = 1 << 22  # elements tested at a time


@torch.no_grad()
def check_tensor(tensor: torch.Tensor, what: str, fix: str) -> None:
    """Chunk by chunk: `torch.isfinite` of a whole tensor takes an absolute-value copy of it and a mask beside it (a
    262,144 x 640 embedding: 0.9 GB for a check that finds nothing)."""
    flat = tensor.reshape(-1)
    for start in range(0, flat.numel(), CHUNK):
        bad = ~torch.isfinite(flat[start:start + CHUNK])
        if bad.any():
            count = sum(int((~torch.isfinite(flat[i:i + CHUNK])).sum()) for i in range(start, flat.numel(), CHUNK))
            first = start + bad.nonzero()[0].item()
            raise HywiaError(f"{what} holds {count} non-finite value(s) (NaN or inf), the first at flat index {first}: {fix}")


@torch.no_grad()
def check_weights(model: nn.Module, fix: str = "the model is corrupt or comes from a diverged run; use a good checkpoint") -> None:
    """Every parameter of `model` finite (a meta tensor, not yet materialised, is skipped). Buffers are left out:
    some families keep masks of -inf there by design."""
    for name, tensor in model.named_parameters():
        if tensor.device.type != "meta" and tensor.is_floating_point():
            check_tensor(tensor, f"tensor {name}", fix)
