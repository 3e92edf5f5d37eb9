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

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .adapters import adapter_for
from .costs import trim_heap


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    path = adapter_for(model.config).layers
    return path, model.get_submodule(path)


class _Stop(Exception):
    pass


def _capture(model: nn.Module, layers: nn.ModuleList, ids: torch.Tensor, batch_size: int) -> tuple[list[torch.Tensor], list[list[dict]]]:
    """Hidden states entering layer 0 per batch, and the keyword arguments each layer receives per batch.

    A layer's keyword arguments (rotary embeddings, causal or sliding-window masks, ALiBi, positions) depend on the
    batch's shape, not on its tokens: calibration windows carry no padding. So they are taken from one forward pass
    through the layers for the first batch of each size and shared by the other batches of that size, whose pass
    stops at layer 0 once its input is known (running every batch through every layer would add a third to a walk's
    forward compute). `tests/test_memory.py` checks the shared arguments equal each batch's own, for every family."""
    hidden: list[torch.Tensor] = []
    known: dict[int, list[dict]] = {}  # batch size -> each layer's keyword arguments for a batch of that size
    taking: list[dict] = []

    def hook(index):
        def grab(module, args, kw):
            if index == 0:
                hidden.append(args[0] if args else kw["hidden_states"])
            if len(taking) == index and len(hidden[-1]) not in known:
                taking.append({k: v for k, v in kw.items() if k != "hidden_states"})
            else:
                raise _Stop  # this batch's size is known: its layer-0 input is all it adds
            if index == len(layers) - 1:
                raise _Stop  # the last layer's inputs are known: skip it, the norm and the LM head
        return grab

    handles = [layer.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    device = next(model.parameters()).device
    kwargs: list[list[dict]] = [[] for _ in layers]
    try:
        with torch.no_grad():
            for start in range(0, len(ids), batch_size):
                taking.clear()
                try:
                    model(input_ids=ids[start:start + batch_size].to(device), use_cache=False)
                except _Stop:
                    pass
                size = len(hidden[-1])
                if size not in known:
                    known[size] = list(taking)
                for index in range(len(layers)):
                    kwargs[index].append(known[size][index])
    finally:
        for handle in handles:
            handle.remove()
    return hidden, kwargs


def _output(result) -> torch.Tensor:
    return result[0] if isinstance(result, tuple) else result


@torch.no_grad()
def _through(layer: nn.Module, batches: list[torch.Tensor], kwargs: list[dict]) -> bool:
    """Replace each batch of hidden states in `batches` by `layer`'s output on it, so a batch's input is freed as its
    output is made (two copies of a walk's windows are never alive at once); True if the layer returns tuples."""
    tupled = False
    for i, kw in enumerate(kwargs):
        result = layer(batches[i], **kw)
        tupled |= isinstance(result, tuple)
        batches[i] = _output(result)
    return tupled


@dataclass
class Passengers:
    """Windows that ride along a walk unobserved, through each layer as `after` left it: `ids` in, and once the walk
    is done `hidden`, the last layer's outputs per batch (a tuple when the layers return tuples), for `replayed`."""

    ids: torch.Tensor
    hidden: list[torch.Tensor] = field(default_factory=list)
    tupled: bool = False


def walk_layers(model: nn.Module, ids: torch.Tensor, names: set[str], observe: Callable[[str, torch.Tensor], None],
                after: Callable[[int, nn.Module], bool] | None = None, batch_size: int = 1,
                device: str | torch.device | None = None, desc: str = "layers", passengers: Passengers | None = None,
                before: Callable[[int], None] | None = None, finished: Callable[[int, nn.Module], None] | None = None) -> None:
    """Run `ids` through the decoder layer by layer; each Linear named in `names` shows its inputs to `observe`.
    `after(index, layer)` returns True if it changed the layer, which is then run again for the next layer's inputs.
    With `device`, each layer is moved there for its turn and back afterwards (the rest of the model stays put).
    `before(index)` may replace the layer before its turn (a walk over copies); `finished(index, layer)` sees it once
    its outputs are computed; `passengers` go through every layer after `after`, observed by nobody."""
    path, layers = decoder_layers(model)
    hidden, kwargs = _capture(model, layers, ids, batch_size)
    riders, rider_kwargs = _capture(model, layers, passengers.ids, batch_size) if passengers is not None else ([], [[] for _ in layers])
    for index in tqdm(range(len(layers)), desc=desc, unit="layer", leave=False):
        if before is not None:
            before(index)
        layer = layers[index]
        home = next(layer.parameters()).device
        if device is not None:
            layer.to(device)
            hidden, riders = [h.to(device) for h in hidden], [h.to(device) for h in riders]
            kwargs[index] = [_moved(kw, device) for kw in kwargs[index]]
            rider_kwargs[index] = [_moved(kw, device) for kw in rider_kwargs[index]]
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
            del outputs  # the unchanged layer's
            trim_heap()  # what `after` freed (its H, the selection's and the refit's solves), before the layer runs again
            _through(layer, hidden, kwargs[index])
            outputs = hidden
        if passengers is not None:
            passengers.tupled = _through(layer, riders, rider_kwargs[index])
            rider_kwargs[index] = []
        hidden = outputs
        if device is not None:
            layer.to(home)
            kwargs[index] = []
        if finished is not None:
            finished(index, layer)
        trim_heap()  # a layer's transient matrices (its H, the refit's solves) must not pile up in the heap
    if passengers is not None:
        passengers.hidden = riders


@contextmanager
def replayed(model: nn.Module, passengers: Passengers) -> Iterator[None]:
    """Within the block, a forward pass of `passengers.ids` (batch by batch, in order, as the walk batched them)
    skips the decoder layers and hands the final norm and LM head the hidden states a walk left in `passengers`:
    the logits of a model that was built layer by layer and never held whole."""
    _, layers = decoder_layers(model)
    last = len(layers) - 1
    batches = iter(passengers.hidden)

    def skip(index: int) -> Callable:
        def forward(hidden_states, *args, **kwargs):
            out = next(batches).to(hidden_states.device, hidden_states.dtype) if index == last else hidden_states
            return (out,) if passengers.tupled else out
        return forward

    for index, layer in enumerate(layers):
        layer.forward = skip(index)  # an instance attribute: nn.Module.__call__ calls it instead of the class's forward
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


def _moved(value, device):
    """Tensors inside a layer's keyword arguments (masks, rotary (cos, sin) pairs) moved to `device`."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _moved(v, device) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_moved(v, device) for v in value)
    return value
