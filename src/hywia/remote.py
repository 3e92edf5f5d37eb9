"""Rebuild a structurally pruned model whose layers have different widths.

transformers builds every decoder layer from one set of widths in the config. A pruned model records the
shape of every Linear it shrank in `config.hywia_pruned_shapes`; the class below builds the stock model and
swaps those Linears for smaller ones before the weights are loaded. What attention reads from attributes rather
than from tensor shapes is then set per layer from `config.hywia_layer_widths` (heads per KV head, head counts,
and for Phi-3 the q|k|v split of its fused projection), and an ALiBi model (BLOOM) gives each layer the slopes of
the heads it kept (`config.hywia_kept_heads`).

hywia copies this file verbatim next to the saved weights as `modeling_hywia.py` and appends one line that
names the stock class, so `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` works in a
process that has never heard of hywia. Keep it free of hywia imports.
"""
import copy

import torch
from torch import nn


def apply_pruned_shapes(model: nn.Module, shapes: dict) -> None:
    """Replace each named Linear with an uninitialised one of shape [out, in] (weights are loaded afterwards).
    An entry [out, in, true] also gives it a bias the stock layer lacks (one that pruning folded removed inputs into)."""
    for name, (out_features, in_features, *added_bias) in shapes.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        bias = old.bias is not None or bool(added_bias and added_bias[0])
        new = nn.Linear(in_features, out_features, bias=bias, device=old.weight.device, dtype=old.weight.dtype)
        setattr(parent, child, new)


def _attention_modules(model: nn.Module):
    """(layer index, module) of every attention module: those with a layer index and a head_dim."""
    for module in model.modules():
        if isinstance(getattr(module, "layer_idx", None), int) and hasattr(module, "head_dim"):
            yield module.layer_idx, module


def sync_head_counts(model: nn.Module) -> None:
    """Set each attention module's head counts from its layer's recorded widths."""
    widths = getattr(model.config, "hywia_layer_widths", None)
    if not widths:
        return
    for layer, module in _attention_modules(model):
        n_heads, n_kv = widths[layer]["num_attention_heads"], widths[layer]["num_key_value_heads"]
        if hasattr(module, "num_key_value_groups"):
            module.num_key_value_groups = n_heads // n_kv if n_kv else 1
        for attribute, value in (("num_heads", n_heads), ("num_key_value_heads", n_kv)):
            if hasattr(module, attribute):
                setattr(module, attribute, value)
        if hasattr(module, "qkv_proj") and module.config.num_attention_heads != n_heads:
            module.config = copy.copy(module.config)  # Phi-3 splits its fused projection by the config's head count
            module.config.num_attention_heads, module.config.num_key_value_heads = n_heads, n_kv
    kept = getattr(model.config, "hywia_kept_heads", None)
    if kept:
        total = model.config.num_attention_heads  # ALiBi is built for every original head, then each layer takes its own
        for layer, module in _attention_modules(model):
            module.hywia_kept_heads = list(kept[layer])  # a list: models are built on the meta device
            if not hasattr(module, "hywia_alibi_hook"):
                module.hywia_alibi_hook = module.register_forward_pre_hook(_alibi_rows(total), with_kwargs=True)


def _alibi_rows(total: int):
    """A forward pre-hook that hands the attention module only the ALiBi rows [batch * heads, ...] of its kept heads."""
    def hook(module, args, kwargs):
        alibi = kwargs.get("alibi")
        if alibi is None:
            return None
        batch = alibi.shape[0] // total
        rows = alibi.view(batch, total, *alibi.shape[1:])[:, torch.tensor(module.hywia_kept_heads, device=alibi.device)]
        return args, {**kwargs, "alibi": rows.reshape(-1, *alibi.shape[1:])}
    return hook


def pruned_class(base: type) -> type:
    """A subclass of the stock causal-LM class `base` that honours `config.hywia_pruned_shapes`."""

    def __init__(self, config, *args, **kwargs):
        base.__init__(self, config, *args, **kwargs)
        apply_pruned_shapes(self, getattr(config, "hywia_pruned_shapes", None) or {})
        sync_head_counts(self)

    return type(f"Hywia{base.__name__}", (base,), {"__init__": __init__, "__module__": __name__})
