"""Physical removal: every member Linear of a removed group is replaced by a smaller one holding the kept rows or
columns, and the config learns the new widths (plain fields when the family's stock config can say them, else
per-module shapes for modeling_hywia.py). What goes is decided elsewhere (hywia.prune, hywia.reconstruct)."""
from __future__ import annotations

import copy

import torch
from torch import nn

from .adapters import adapter_for
from .grouping import LayerGroups, Part, find_groups, head_counts
from .remote import sync_head_counts


def kept_groups(count: int, removed: torch.Tensor) -> list[int]:
    gone = set(removed.tolist())
    return [g for g in range(count) if g not in gone]


def _shrunk(module: nn.Linear, dim: int, rows: torch.Tensor, bias_shift: torch.Tensor | None = None) -> nn.Linear:
    """A Linear holding the kept rows (dim 0) or columns (dim 1); `bias_shift` is added to its bias (created if absent).
    It is built on the meta device and handed its weights: a random initialisation would only be overwritten."""
    weight = module.weight.data.index_select(dim, rows.to(module.weight.device))
    has_bias = module.bias is not None or bias_shift is not None
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias, device="meta", dtype=weight.dtype)
    new.weight = nn.Parameter(weight, requires_grad=module.weight.requires_grad)
    if has_bias:
        bias = torch.zeros(weight.shape[0], dtype=torch.float64, device=weight.device)
        if module.bias is not None:
            bias += module.bias.data[rows.to(weight.device)] if dim == 0 else module.bias.data
        if bias_shift is not None:
            bias += bias_shift.to(bias.device)
        new.bias = nn.Parameter(bias.to(weight.dtype))
    return new


def remove_groups(model: nn.Module, sets: list[LayerGroups], removed: list[torch.Tensor],
                  input_means: dict[str, torch.Tensor] | None = None, shifts: dict[str, torch.Tensor] | None = None) -> None:
    """Physically remove groups: every member Linear is replaced by a smaller one holding the kept slices (a fused
    projection loses the rows of every part, and keeps its parts' order).

    With `input_means` (module name -> mean input per feature), each removed input column j of an output
    projection leaves W[:, j] * mean_j in the bias, so the layer's output moves by the removed columns'
    fluctuation only (FLAP's bias compensation). `shifts` (module name -> bias shift) adds given shifts instead
    (hywia.reconstruct's jointly refit biases). Such added biases are recorded as a third `True` in the module's
    entry of `hywia_pruned_shapes`, which is how a reload knows to build them."""
    config = model.config
    if not getattr(config, "head_dim", None):
        config.head_dim = config.hidden_size // config.num_attention_heads  # pin it before head counts change
    before = layer_widths(model)
    shapes = dict(getattr(config, "hywia_pruned_shapes", None) or {})
    if adapter_for(config).alibi:
        _record_kept_heads(model, sets, removed)
    for s, gone in zip(sets, removed):
        if len(gone) == 0:
            continue
        by_module: dict[str, list[Part]] = {}
        for part in s.parts:
            by_module.setdefault(part.name, []).append(part)
        for name, parts in by_module.items():
            module, dim = parts[0].module, parts[0].dim
            dropped = torch.cat([part.indices(gone) for part in parts])
            keep = torch.ones(module.weight.shape[dim], dtype=torch.bool)
            keep[dropped] = False
            shift = (shifts or {}).get(name) if dim == 1 else None
            if shift is None and input_means is not None and dim == 1 and name in input_means:
                columns = dropped.to(module.weight.device)
                mean = input_means[name].to(module.weight.device)[columns]
                shift = module.weight.data[:, columns].double() @ mean
            new = _shrunk(module, dim, keep.nonzero().flatten(), shift)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, new)
            module.to("meta")  # the groups still name the dense Linear: without this its weights live as long as they do
            added_bias = shift is not None or len(shapes.get(name, ())) > 2
            shapes[name] = [new.out_features, new.in_features] + ([True] if added_bias else [])
    record_widths(model, shapes, before)
    sync_head_counts(model)


def _record_kept_heads(model: nn.Module, sets: list[LayerGroups], removed: list[torch.Tensor]) -> None:
    """ALiBi families: which of the original heads each layer keeps (`config.hywia_kept_heads`), composed with
    any earlier pruning, so each kept head keeps its own slope on reload."""
    config = model.config
    if not any(s.kind == "attention" and len(gone) for s, gone in zip(sets, removed)):
        return
    kept_heads = list(getattr(config, "hywia_kept_heads", None) or [list(range(config.num_attention_heads))
                                                                     for _ in model.get_submodule(adapter_for(config).layers)])
    for s, gone in zip(sets, removed):
        if s.kind == "attention" and len(gone):
            kept_heads[s.layer] = [kept_heads[s.layer][g] for g in kept_groups(s.count, gone)]
    config.hywia_kept_heads = kept_heads


def layer_widths(model: nn.Module) -> list[dict]:
    """Per-layer widths read off the modules: query heads, KV heads, MLP channels."""
    adapter = adapter_for(model.config)
    widths = []
    for s in find_groups(model, "mlp"):
        n_heads, n_kv = head_counts(model, f"{adapter.layers}.{s.layer}", adapter)
        widths.append({"layer": s.layer, "num_attention_heads": n_heads, "num_key_value_heads": n_kv, "intermediate_size": s.count})
    return widths


def record_widths(model: nn.Module, shapes: dict[str, list[int]], before: list[dict]) -> None:
    """Write the new widths into the config: plain config fields when every layer has the same widths and the
    family's stock config can say them (the model then reloads with stock transformers, no flag), else per-module
    shapes for modeling_hywia.py. `before` is `layer_widths` of the model as its config last described it."""
    config = model.config
    adapter = adapter_for(config)
    widths = [{k: v for k, v in w.items() if k != "layer"} for w in layer_widths(model)]
    config.hywia_layer_widths = widths
    was_stock = not getattr(config, "hywia_pruned_shapes", None)
    changed = {k for w, old in zip(widths, before) for k in w if w[k] != old[k]}
    mapped = dict(adapter.config_widths)
    stock = (was_stock and all(w == widths[0] for w in widths) and changed <= set(mapped)
             and not any(len(shape) > 2 for shape in shapes.values())  # a stock config cannot ask for a bias on one projection
             and not getattr(config, "hywia_kept_heads", None)  # nor for ALiBi slopes of a subset of heads
             and _stock_config_accepts(config, {mapped[k]: widths[0][k] for k in changed}))
    if stock:
        for key in changed:
            setattr(config, mapped[key], widths[0][key])
        config.hywia_pruned_shapes = None
    else:
        config.hywia_pruned_shapes = shapes


def _stock_config_accepts(config, fields: dict) -> bool:
    """Whether transformers' own validation takes these widths as plain config fields (LLaMA, for one, insists
    that hidden_size be a multiple of num_attention_heads, which a pruned head count need not be)."""
    candidate = copy.deepcopy(config)
    try:
        for key, value in fields.items():
            setattr(candidate, key, value)
        candidate.validate()
    except Exception:  # huggingface_hub's validation errors share no narrower base; any refusal means "use shapes"
        return False
    return True
