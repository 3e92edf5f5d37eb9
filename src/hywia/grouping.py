"""Coupled structures of each decoder block, found from the adapter table and the model config.

An attention group is one KV head with all the query heads that share it (grouped-query attention) and the
o_proj input columns those query heads feed; removing it keeps `num_attention_heads // num_key_value_heads`
unchanged, so transformers' attention runs on the smaller layer as is. An MLP group is one channel: a row of
gate_proj and up_proj and the matching column of down_proj.

A query group (`attention_unit="query"`) is one query head: its q_proj rows and o_proj columns, the KV heads left
whole. Its groups come in `blocks` runs, one per KV head, and are removed in balanced steps (the same number from
every run), so every KV head of a layer keeps the same number of query heads and the layer stays one that
grouped-query attention runs: its heads-per-KV-head simply drops.
"""
from __future__ import annotations

import math

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .adapters import Adapter, Member, adapter_for
from .costs import trim_heap
from .errors import HywiaError

KINDS = ("attention", "mlp", "query")
ATTENTION_UNITS = {"kv": "attention", "query": "query"}  # --attention-unit -> the kind that stands for attention


@dataclass
class Slot:
    """A parameter (weight or bias) of a member projection and how groups tile it: group g owns `size` indices of
    axis `dim` starting at `offset + g * size` (offset > 0 for a later part of a fused projection)."""

    name: str  # full parameter name, e.g. "model.layers.3.self_attn.q_proj.weight"
    param: nn.Parameter
    dim: int
    size: int
    offset: int = 0


@dataclass
class Part:
    """One member projection's share of a layer's groups (a fused projection contributes one Part per member)."""

    name: str  # full module name, e.g. "model.layers.3.self_attn.q_proj"
    module: nn.Linear
    dim: int
    size: int  # rows or columns per group
    offset: int = 0

    def indices(self, groups: torch.Tensor) -> torch.Tensor:
        """The rows (dim 0) or columns (dim 1) of `module` that `groups` own in this part."""
        return self.offset + (groups[:, None] * self.size + torch.arange(self.size)).flatten()


@dataclass
class LayerGroups:
    """All groups of one kind in one decoder layer: `count` groups of `params_per_group` parameters each."""

    layer: int
    kind: str
    count: int
    parts: list[Part]
    blocks: int = 1  # groups form `blocks` equal runs and leave in balanced steps (query heads: one run per KV head)

    @property
    def reader(self) -> Part:
        """The output projection's part (o_proj / down_proj input columns): what reads the groups' outputs."""
        return next(p for p in self.parts if p.dim == 1)

    @property
    def slots(self) -> list[Slot]:
        slots = []
        for p in self.parts:
            slots.append(Slot(f"{p.name}.weight", p.module.weight, p.dim, p.size, p.offset))
            if p.module.bias is not None and p.dim == 0:  # an input-column group leaves the bias alone
                slots.append(Slot(f"{p.name}.bias", p.module.bias, 0, p.size, p.offset))
        return slots

    @property
    def params_per_group(self) -> int:
        """Parameters one group owns, from shapes alone (so it holds for a layer pruned down to zero groups)."""
        return sum(s.size * math.prod(d for axis, d in enumerate(s.param.shape) if axis != s.dim) for s in self.slots)

    def member_sums(self, per_weight: Callable[[Slot], torch.Tensor]) -> torch.Tensor:
        """Sum a per-weight tensor (shaped like each parameter) within every group, slot by slot: [count, n_slots]."""
        columns = [per_weight(slot).float().movedim(slot.dim, 0).narrow(0, slot.offset, self.count * slot.size)
                   .reshape(self.count, -1).sum(1).cpu() for slot in self.slots]
        trim_heap()  # the per-weight temporaries: at 0.5B, untrimmed, a scoring pass left 1.6 GB of them resident
        return torch.stack(columns, dim=1)

    def sum(self, per_weight: Callable[[Slot], torch.Tensor]) -> torch.Tensor:
        """Sum a per-weight tensor over every group: [count] in float32."""
        return self.member_sums(per_weight).sum(1)


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _output_projection(adapter: Adapter, kind: str) -> Member:
    return next(m for m in getattr(adapter, kind) if m.dim == 1)


def head_counts(model: nn.Module, prefix: str, adapter: Adapter) -> tuple[int, int]:
    """(query heads, KV heads) of the layer at `prefix`, read off its weights (layers may differ after pruning)."""
    size = head_dim(model.config)
    n_heads = model.get_submodule(f"{prefix}.{_output_projection(adapter, 'attention').path}").in_features // size
    path, q_share, kv_share = adapter.kv_rows
    rows = model.get_submodule(f"{prefix}.{path}").out_features // size
    return n_heads, (rows - q_share * n_heads) // kv_share


def _layer_groups(model: nn.Module, prefix: str, layer: int, kind: str, adapter: Adapter) -> LayerGroups:
    members = getattr(adapter, kind)
    if members is None:
        raise HywiaError(f"--attention-unit query needs grouped-query attention; every {model.config.model_type} head has "
                         "its own key and value, so a KV group is already one head: use --attention-unit kv")
    n_heads, n_kv = head_counts(model, prefix, adapter)
    size = head_dim(model.config)
    units = {"q": n_heads // max(n_kv, 1) * size, "kv": size, "head": size, "qkv": 3 * size, "channel": 1}
    channels = model.get_submodule(f"{prefix}.{_output_projection(adapter, 'mlp').path}").in_features
    stacked = {"heads": n_heads * size, "kv_heads": n_kv * size, "channels": channels}
    parts = []
    for member in members:
        name = f"{prefix}.{member.path}"
        module = model.get_submodule(name)
        if not isinstance(module, nn.Linear):
            raise HywiaError(f"{name} is a {type(module).__name__}, not a Linear; load the model unquantized (dtype float32 or bfloat16)")
        parts.append(Part(name, module, member.dim, units[member.unit], sum(stacked[a] for a in member.after)))
    reader = next(p for p in parts if p.dim == 1)
    return LayerGroups(layer, kind, reader.module.in_features // reader.size, parts, blocks=n_kv if kind == "query" else 1)


def layer_slice(spec: str) -> slice:
    """'START:END' (Python slice, END exclusive, negatives count from the end), checked without a model."""
    try:
        start, end = (int(p) if p.strip() else None for p in spec.split(":"))
    except ValueError:
        raise HywiaError(f"--layers '{spec}' is not START:END (e.g. 4:28 keeps the first 4 and last 2 of 30 blocks)") from None
    return slice(start, end)


def parse_layers(spec: str | None, n_layers: int) -> range:
    """'START:END' -> range of layer indices of an `n_layers`-layer model."""
    if spec is None or spec == "":
        return range(n_layers)
    picked = range(n_layers)[layer_slice(spec)]
    if len(picked) == 0:
        raise HywiaError(f"--layers '{spec}' selects no layer of this {n_layers}-layer model")
    return picked


def find_groups(model: nn.Module, target: str = "both", layers: str | None = None, attention_unit: str = "kv") -> list[LayerGroups]:
    """Every prunable LayerGroups of `model`, for `target` in attention|mlp|both, over `layers` 'START:END' (default all);
    attention is pruned by whole KV groups (`attention_unit="kv"`) or by single query heads ("query")."""
    if target not in ("attention", "mlp", "both"):
        raise HywiaError(f"unknown target '{target}': use attention, mlp or both")
    if attention_unit not in ATTENTION_UNITS:
        raise HywiaError(f"unknown attention unit '{attention_unit}': use kv (whole KV groups) or query (query heads, balanced per KV group)")
    adapter: Adapter = adapter_for(model.config)
    blocks = model.get_submodule(adapter.layers)
    attention = ATTENTION_UNITS[attention_unit]
    kinds = {"both": (attention, "mlp"), "attention": (attention,), "mlp": ("mlp",)}[target]
    return [_layer_groups(model, f"{adapter.layers}.{layer}", layer, kind, adapter)
            for layer in parse_layers(layers, len(blocks)) for kind in kinds]
