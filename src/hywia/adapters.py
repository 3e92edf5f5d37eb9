"""Model families as data: where each decoder block keeps the projections that prune together.

A family is one `Adapter` entry. Nothing outside this module asks for `model_type`; adding a family whose
modules are named differently means adding a row here, not branches elsewhere (docs/families.md walks through one).

A fused projection (Phi-3's `qkv_proj`, `gate_up_proj`; BLOOM's `query_key_value`) is several members with the same
path: each owns its part of the rows, placed by `after` (the parts stacked before it) or by a per-head `unit`.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import HywiaError


@dataclass(frozen=True)
class Member:
    """One projection (or one part of a fused projection) of a coupled structure.

    `dim` is the weight axis the structure occupies (0: output rows, 1: input columns). `unit` says how many rows
    or columns one group owns: "q" = the query heads of one KV head (n_rep * head_dim), "kv" = one head_dim,
    "head" = one query head (head_dim), "qkv" = one head's query, key and value rows laid out together (3 * head_dim,
    BLOOM), "channel" = one MLP channel. `after` names the parts stacked before this one in a fused projection
    ("heads": all query rows, "kv_heads": all rows of one of K or V, "channels": all rows of one MLP half), so the
    part starts at their summed size.
    """

    path: str
    dim: int
    unit: str
    after: tuple[str, ...] = ()


@dataclass(frozen=True)
class Adapter:
    layers: str = "model.layers"
    attention: tuple[Member, ...] = (
        Member("self_attn.q_proj", 0, "q"),
        Member("self_attn.k_proj", 0, "kv"),
        Member("self_attn.v_proj", 0, "kv"),
        Member("self_attn.o_proj", 1, "q"),
    )
    mlp: tuple[Member, ...] = (
        Member("mlp.gate_proj", 0, "channel"),
        Member("mlp.up_proj", 0, "channel"),
        Member("mlp.down_proj", 1, "channel"),
    )
    # single query heads inside their KV groups (`--attention-unit query`): the KV projections stay whole.
    # None where every query head has its own K/V (multi-head attention): a KV group is already one head.
    query: tuple[Member, ...] | None = (
        Member("self_attn.q_proj", 0, "head"),
        Member("self_attn.o_proj", 1, "head"),
    )
    # KV heads of a layer = (rows of `kv_rows` / head_dim - q_share * query heads) / kv_share; query heads are read
    # off the attention output projection (its input columns / head_dim), which is never fused
    kv_rows: tuple[str, int, int] = ("self_attn.k_proj", 0, 1)
    # the width fields a stock config of this family can carry (hywia's name -> the config's); a pruned width
    # outside this table makes the saved model use modeling_hywia.py (e.g. OPT derives head_dim from the head count)
    config_widths: tuple[tuple[str, str], ...] = (
        ("num_attention_heads", "num_attention_heads"),
        ("num_key_value_heads", "num_key_value_heads"),
        ("intermediate_size", "intermediate_size"),
    )
    alibi: bool = False  # per-head ALiBi slopes: a pruned head's slope must leave with it (recorded per layer)


LLAMA_LIKE = Adapter()

# OPT: multi-head attention with biases, `out_proj`, fc1/fc2 MLP (no gate), layers under model.decoder
OPT = Adapter(
    layers="model.decoder.layers",
    attention=(Member("self_attn.q_proj", 0, "q"), Member("self_attn.k_proj", 0, "kv"),
               Member("self_attn.v_proj", 0, "kv"), Member("self_attn.out_proj", 1, "q")),
    mlp=(Member("fc1", 0, "channel"), Member("fc2", 1, "channel")),
    query=None,
    config_widths=(("intermediate_size", "ffn_dim"),),
)

# Phi-3: q|k|v stacked in one `qkv_proj` under GQA, gate|up stacked in one `gate_up_proj`
PHI3 = Adapter(
    attention=(Member("self_attn.qkv_proj", 0, "q"), Member("self_attn.qkv_proj", 0, "kv", ("heads",)),
               Member("self_attn.qkv_proj", 0, "kv", ("heads", "kv_heads")), Member("self_attn.o_proj", 1, "q")),
    mlp=(Member("mlp.gate_up_proj", 0, "channel"), Member("mlp.gate_up_proj", 0, "channel", ("channels",)),
         Member("mlp.down_proj", 1, "channel")),
    query=(Member("self_attn.qkv_proj", 0, "head"), Member("self_attn.o_proj", 1, "head")),
    kv_rows=("self_attn.qkv_proj", 1, 2),
)

# BLOOM: `query_key_value` holds each head's q, k, v rows together (view [heads, 3, head_dim]); ALiBi; biases;
# LayerNorm; GELU MLP of 4 * hidden (not a config field, so a narrower MLP always reloads through modeling_hywia.py)
BLOOM = Adapter(
    layers="transformer.h",
    attention=(Member("self_attention.query_key_value", 0, "qkv"), Member("self_attention.dense", 1, "q")),
    mlp=(Member("mlp.dense_h_to_4h", 0, "channel"), Member("mlp.dense_4h_to_h", 1, "channel")),
    query=None,
    kv_rows=("self_attention.query_key_value", 0, 3),
    config_widths=(),
    alibi=True,
)

# Qwen2 adds q/k/v biases (sliced with their rows); Qwen3 and Gemma 3 add per-head q/k norms over head_dim, which
# every head shares, so they survive head removal untouched. Llama 3 is model_type "llama". All use LLaMA's names.
ADAPTERS: dict[str, Adapter] = {
    "llama": LLAMA_LIKE,
    "mistral": LLAMA_LIKE,
    "qwen2": LLAMA_LIKE,
    "qwen3": LLAMA_LIKE,
    "gemma3_text": LLAMA_LIKE,
    "opt": OPT,
    "phi3": PHI3,
    "bloom": BLOOM,
}


def adapter_for(config) -> Adapter:
    """The adapter of a transformers config, or a one-line error naming the supported families."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise HywiaError(
            f"unsupported architecture '{model_type}': hywia prunes {', '.join(sorted(ADAPTERS))}; "
            "add an Adapter row in hywia/adapters.py for another family (docs/families.md)"
        )
    return ADAPTERS[model_type]
