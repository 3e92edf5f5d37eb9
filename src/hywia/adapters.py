"""Model families as data: where each decoder block keeps the projections that prune together.

A family is one `Adapter` entry. Nothing outside this module asks for `model_type`; adding a family whose
modules are named differently means adding a row here, not branches elsewhere.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import HywiaError


@dataclass(frozen=True)
class Member:
    """One projection of a coupled structure.

    `dim` is the weight axis the structure occupies (0: output rows, 1: input columns). `unit` says how many rows
    or columns one group owns: "q" = the query heads of one KV head (n_rep * head_dim), "kv" = one head_dim,
    "head" = one query head (head_dim), "channel" = one MLP channel.
    """

    path: str
    dim: int
    unit: str


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
    # single query heads inside their KV groups (`--attention-unit query`): the KV projections stay whole
    query: tuple[Member, ...] = (
        Member("self_attn.q_proj", 0, "head"),
        Member("self_attn.o_proj", 1, "head"),
    )
    # where a layer's head counts are read from: query heads = rows of `q_rows` / head_dim, KV heads = rows of `kv_rows`
    q_rows: str = "self_attn.q_proj"
    kv_rows: str = "self_attn.k_proj"


LLAMA_LIKE = Adapter()

# Qwen2 adds q/k/v biases (sliced with their rows); Qwen3 and Gemma 3 add per-head q/k norms over head_dim, which
# every head shares, so they survive head removal untouched. All use the LLaMA module names.
ADAPTERS: dict[str, Adapter] = {
    "llama": LLAMA_LIKE,
    "mistral": LLAMA_LIKE,
    "qwen2": LLAMA_LIKE,
    "qwen3": LLAMA_LIKE,
    "gemma3_text": LLAMA_LIKE,
}


def adapter_for(config) -> Adapter:
    """The adapter of a transformers config, or a one-line error naming the supported families."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise HywiaError(
            f"unsupported architecture '{model_type}': hywia prunes {', '.join(sorted(ADAPTERS))}; "
            "add an Adapter row in hywia/adapters.py for another family"
        )
    return ADAPTERS[model_type]
