"""Coupled structures of each decoder block, found from the adapter table and the model config.

An attention group is one KV head with all the query heads that share it (grouped-query attention) and the
o_proj input columns those query heads feed; removing it keeps `num_attention_heads // num_key_value_heads`
unchanged, so transformers' attention runs on the smaller layer as is. An MLP group is one channel: a row of
gate_proj and up_proj and the matching column of down_proj.
"""
from __future__ import annotations

import math

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .adapters import Adapter, Member, adapter_for
from .errors import HywiaError

KINDS = ("attention", "mlp")


@dataclass
class Slot:
    """A parameter (weight or bias) of a member projection and how groups tile it."""

    name: str  # full parameter name, e.g. "model.layers.3.self_attn.q_proj.weight"
    param: nn.Parameter
    dim: int
    size: int  # rows or columns per group


@dataclass
class LayerGroups:
    """All groups of one kind in one decoder layer: `count` groups of `params_per_group` parameters each."""

    layer: int
    kind: str
    count: int
    modules: dict[str, tuple[nn.Linear, int, int]]  # full module name -> (module, dim, size)

    @property
    def slots(self) -> list[Slot]:
        slots = []
        for name, (module, dim, size) in self.modules.items():
            slots.append(Slot(f"{name}.weight", module.weight, dim, size))
            if module.bias is not None and dim == 0:  # an input-column group leaves the bias alone
                slots.append(Slot(f"{name}.bias", module.bias, 0, size))
        return slots

    @property
    def params_per_group(self) -> int:
        """Parameters one group owns, from shapes alone (so it holds for a layer pruned down to zero groups)."""
        return sum(s.size * math.prod(d for axis, d in enumerate(s.param.shape) if axis != s.dim) for s in self.slots)

    def member_sums(self, per_weight: Callable[[Slot], torch.Tensor]) -> torch.Tensor:
        """Sum a per-weight tensor (shaped like each parameter) within every group, slot by slot: [count, n_slots]."""
        columns = [per_weight(slot).float().movedim(slot.dim, 0).reshape(self.count, -1).sum(1).cpu() for slot in self.slots]
        return torch.stack(columns, dim=1)

    def sum(self, per_weight: Callable[[Slot], torch.Tensor]) -> torch.Tensor:
        """Sum a per-weight tensor over every group: [count] in float32."""
        return self.member_sums(per_weight).sum(1)


def _unit_sizes(config) -> dict[str, int]:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    n_rep = config.num_attention_heads // config.num_key_value_heads
    return {"q": n_rep * head_dim, "kv": head_dim, "channel": 1}


def _layer_groups(model: nn.Module, prefix: str, layer: int, kind: str, members: tuple[Member, ...], units) -> LayerGroups:
    modules = {}
    for member in members:
        name = f"{prefix}.{member.path}"
        module = model.get_submodule(name)
        if not isinstance(module, nn.Linear):
            raise HywiaError(f"{name} is a {type(module).__name__}, not a Linear; load the model unquantized (dtype float32 or bfloat16)")
        modules[name] = (module, member.dim, units[member.unit])
    module, dim, size = next(iter(modules.values()))
    return LayerGroups(layer, kind, module.weight.shape[dim] // size, modules)


def parse_layers(spec: str | None, n_layers: int) -> range:
    """'START:END' (Python slice, END exclusive, negatives count from the end) -> range of layer indices."""
    if spec is None or spec == "":
        return range(n_layers)
    try:
        start, end = (int(p) if p.strip() else None for p in spec.split(":"))
    except ValueError:
        raise HywiaError(f"--layers '{spec}' is not START:END (e.g. 4:28 keeps the first 4 and last 2 of 30 blocks)") from None
    picked = range(n_layers)[slice(start, end)]
    if len(picked) == 0:
        raise HywiaError(f"--layers '{spec}' selects no layer of this {n_layers}-layer model")
    return picked


def find_groups(model: nn.Module, target: str = "both", layers: str | None = None) -> list[LayerGroups]:
    """Every prunable LayerGroups of `model`, for `target` in attention|mlp|both, over `layers` 'START:END' (default all)."""
    if target not in ("attention", "mlp", "both"):
        raise HywiaError(f"unknown target '{target}': use attention, mlp or both")
    adapter: Adapter = adapter_for(model.config)
    units = _unit_sizes(model.config)
    blocks = model.get_submodule(adapter.layers)
    kinds = KINDS if target == "both" else (target,)
    found = []
    for layer in parse_layers(layers, len(blocks)):
        prefix = f"{adapter.layers}.{layer}"
        for kind in kinds:
            found.append(_layer_groups(model, prefix, layer, kind, getattr(adapter, kind), units))
    return found
