"""The sequential layer walk every forward-only calibration shares: calibration samples enter decoder layer 0 and
go through the decoder one layer at a time, so only one layer's activations (and, with `device`, only one layer's
weights on the compute device) are live at once.

Each layer's Linears named in the walk show their inputs to `observe(name, x)` while the layer runs; `after(index,
layer)` may then change the layer (SparseGPT and Wanda prune it), and a changed layer is run again, so the next layer
is calibrated on what the already-processed layers actually produce (their papers' protocol). When nothing changes
(structured criteria score the dense model and remove afterwards) one run per layer serves both, and the statistics
equal those of full forward passes. Every other argument a decoder layer takes (rotary embeddings, masks, which
differ per layer in Gemma 3's local/global attention) is captured from one forward pass, per layer and batch.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from .adapters import adapter_for


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    path = adapter_for(model.config).layers
    return path, model.get_submodule(path)


class _Stop(Exception):
    pass


def _capture(model: nn.Module, layers: nn.ModuleList, ids: torch.Tensor, batch_size: int) -> tuple[list[torch.Tensor], list[list[dict]]]:
    """Hidden states entering layer 0 per batch, and the keyword arguments each layer receives per batch."""
    hidden: list[torch.Tensor] = []
    kwargs: list[list[dict]] = [[] for _ in layers]

    def hook(index):
        def grab(module, args, kw):
            if index == 0:
                hidden.append(args[0] if args else kw["hidden_states"])
            kwargs[index].append({k: v for k, v in kw.items() if k != "hidden_states"})
            if index == len(layers) - 1:
                raise _Stop  # the last layer's inputs are known: skip it, the norm and the LM head
        return grab

    handles = [layer.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for start in range(0, len(ids), batch_size):
                try:
                    model(input_ids=ids[start:start + batch_size].to(device), use_cache=False)
                except _Stop:
                    pass
    finally:
        for handle in handles:
            handle.remove()
    return hidden, kwargs


def _output(result) -> torch.Tensor:
    return result[0] if isinstance(result, tuple) else result


def walk_layers(model: nn.Module, ids: torch.Tensor, names: set[str], observe: Callable[[str, torch.Tensor], None],
                after: Callable[[int, nn.Module], bool] | None = None, batch_size: int = 1,
                device: str | torch.device | None = None, desc: str = "layers") -> None:
    """Run `ids` through the decoder layer by layer; each Linear named in `names` shows its inputs to `observe`.
    `after(index, layer)` returns True if it changed the layer, which is then run again for the next layer's inputs.
    With `device`, each layer is moved there for its turn and back afterwards (the rest of the model stays put)."""
    path, layers = decoder_layers(model)
    hidden, kwargs = _capture(model, layers, ids, batch_size)
    for index, layer in enumerate(tqdm(layers, desc=desc, unit="layer", leave=False)):
        home = next(layer.parameters()).device
        if device is not None:
            layer.to(device)
            hidden = [h.to(device) for h in hidden]
            kwargs[index] = [_moved(kw, device) for kw in kwargs[index]]
        prefix = f"{path}.{index}."
        handles = [m.register_forward_pre_hook(lambda module, args, name=prefix + local: observe(name, args[0]))
                   for local, m in layer.named_modules() if prefix + local in names]
        try:
            with torch.no_grad():
                outputs = [_output(layer(h, **kw)) for h, kw in zip(hidden, kwargs[index])]
        finally:
            for handle in handles:
                handle.remove()
        if after is not None and after(index, layer):
            with torch.no_grad():
                outputs = [_output(layer(h, **kw)) for h, kw in zip(hidden, kwargs[index])]
        hidden = outputs
        if device is not None:
            layer.to(home)
            kwargs[index] = []


def _moved(value, device):
    """Tensors inside a layer's keyword arguments (masks, rotary (cos, sin) pairs) moved to `device`."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _moved(v, device) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_moved(v, device) for v in value)
    return value
