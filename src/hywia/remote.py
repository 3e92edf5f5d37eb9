"""Rebuild a structurally pruned model whose layers have different widths.

transformers builds every decoder layer from one set of widths in the config. A pruned model records the
shape of every Linear it shrank in `config.hywia_pruned_shapes`; the class below builds the stock model and
swaps those Linears for smaller ones before the weights are loaded. Attention views projections as
(-1, head_dim), so the only other thing to set is each attention module's heads-per-KV-head
(`num_key_value_groups`), which query-head pruning may have changed layer by layer.

hywia copies this file verbatim next to the saved weights as `modeling_hywia.py` and appends one line that
names the stock class, so `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` works in a
process that has never heard of hywia. Keep it free of hywia imports.
"""
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


def sync_head_counts(model: nn.Module) -> None:
    """Set every attention module's `num_key_value_groups` (query heads per KV head) from its q/k projection shapes."""
    for module in model.modules():
        if hasattr(module, "num_key_value_groups") and hasattr(module, "q_proj") and hasattr(module, "k_proj"):
            kv_rows = module.k_proj.out_features
            module.num_key_value_groups = module.q_proj.out_features // kv_rows if kv_rows else 1


def pruned_class(base: type) -> type:
    """A subclass of the stock causal-LM class `base` that honours `config.hywia_pruned_shapes`."""

    def __init__(self, config, *args, **kwargs):
        base.__init__(self, config, *args, **kwargs)
        apply_pruned_shapes(self, getattr(config, "hywia_pruned_shapes", None) or {})
        sync_head_counts(self)

    return type(f"Hywia{base.__name__}", (base,), {"__init__": __init__, "__module__": __name__})
