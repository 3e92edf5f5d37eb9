"""A candidate built beside the model, one layer at a time, so choosing between two prunes never holds two models.

`--kind-split evidence-best` builds two candidates from the same dense model and keeps one. A copy of the whole
model for the second would double the peak (a 7B model in float32 held twice is 56 GB). Instead the incumbent is
built on a *shadow*: an object graph that shares every module with the model except the decoder's list of layers and
the config. The reconstruction walk copies each layer into the shadow just before it reaches it, prunes and refits
it there, runs it for the next layer's inputs and for the judge's windows riding along (`walk.Passengers`), then
writes it to a temporary folder and leaves it on the meta device (its shapes, no memory). The judge reads the
incumbent's logits from the passengers' final hidden states (`walk.replayed`); if the incumbent wins, its layers
come back from disk into the model. Cost: one dense layer at a time, the judge windows' hidden states, and disk for
the pruned layers. The result equals building the incumbent in place (tests/test_split.py).
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .grouping import LayerGroups
from .remote import sync_head_counts
from .scratch import scratch_dir
from .split import window_losses
from .walk import Passengers, decoder_layers, replayed


def shadow_of(model: nn.Module) -> nn.Module:
    """A shallow copy of `model` whose decoder layer list and config are its own: replacing a layer in it, or pruning
    a replaced layer, leaves the model as it was."""
    path, _ = decoder_layers(model)
    shadow = copy.copy(model)
    parent = shadow
    parent._modules = dict(parent._modules)
    for name in path.split("."):
        child = copy.copy(parent._modules[name])
        child._modules = dict(child._modules)
        parent._modules[name] = child
        parent = child
    shadow.config = copy.deepcopy(model.config)
    return shadow


def _tensors(layer: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(layer.named_parameters()), **dict(layer.named_buffers())}


class Aside:
    """The walk hooks that build a candidate on a shadow of `model`: pass `sets`, `before`, `finished` and
    `passengers` to `hywia.reconstruct.remove_and_refit(aside.shadow, ...)`; then `losses()` judges it and
    `restore()` puts it into the model. `regroup(model)` finds the prune's groups on a model (the run's target,
    layers and attention unit)."""

    def __init__(self, model: nn.Module, regroup: Callable[[nn.Module], list[LayerGroups]], judge_ids: torch.Tensor):
        self.model, self.regroup = model, regroup
        self.shadow = shadow_of(model)
        self.sets = regroup(self.shadow)
        self.passengers = Passengers(judge_ids)
        self.folder = scratch_dir("aside")
        self.copies: dict[int, nn.Module] = {}
        self.homes: dict[int, torch.device] = {}

    def before(self, index: int) -> None:
        """Copy layer `index` into the shadow, and point the sets of that layer at the copy's modules."""
        if not any(s.layer == index for s in self.sets):
            return  # a layer the prune leaves alone is walked as it is, shared
        _, dense = decoder_layers(self.model)
        _, layers = decoder_layers(self.shadow)
        layers[index] = copy.deepcopy(dense[index])
        fresh = {s.kind: s for s in self.regroup(self.shadow) if s.layer == index}
        self.sets[:] = [fresh[s.kind] if s.layer == index else s for s in self.sets]

    def finished(self, index: int, layer: nn.Module) -> None:
        """Write a built copy to the folder and keep only its shapes."""
        if not any(s.layer == index for s in self.sets):
            return
        self.homes[index] = next(layer.parameters()).device
        torch.save({name: t.detach().cpu() for name, t in _tensors(layer).items()}, Path(self.folder.name) / f"{index}.pt")
        self.copies[index] = layer.to("meta")

    def losses(self, batch_size: int) -> torch.Tensor:
        """The candidate's per-window judge losses, from the passengers' final hidden states."""
        with replayed(self.model, self.passengers):
            return window_losses(self.model, self.passengers.ids, batch_size)

    def restore(self) -> None:
        """Make the model the candidate: its layers read back from disk, its config's widths."""
        _, layers = decoder_layers(self.model)
        for index, layer in self.copies.items():
            saved = torch.load(Path(self.folder.name) / f"{index}.pt", weights_only=True)
            layer.to_empty(device=self.homes[index])
            with torch.no_grad():
                for name, tensor in _tensors(layer).items():
                    tensor.copy_(saved[name])
            for module in layer.modules():  # the copy carried a copy of the config; the model's is the one that counts
                if module is not layer and hasattr(module, "config") and type(module.config) is type(self.model.config):
                    module.config = self.model.config
            layers[index] = layer
        self.model.config.__dict__.update(self.shadow.config.__dict__)
        sync_head_counts(self.model)
        self.close()

    def close(self) -> None:
        self.copies.clear()
        self.folder.cleanup()
