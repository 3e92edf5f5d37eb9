"""GGUF export for llama.cpp: a pruned model where people run 100M-8B models, with the widths hywia gave it.

A family is a row of TARGETS: the llama.cpp architecture its uniformly pruned models are written as, and the one
that reads per-layer head counts and FFN widths for a model whose layers differ (`deci`, the architecture of
NAS-pruned Nemotron models: `deci.attention.head_count`, `head_count_kv` and `feed_forward_length` as arrays, with
optional output-projection biases, so FLAP-style compensation is kept), or None where llama.cpp has none for that
family (Gemma 3's graph takes one head count and one FFN width for every layer): such a model is refused with the
options that make it uniform. BLOOM maps onto llama.cpp's `bloom` with its MLP pruned uniformly (that graph sizes
attention by the hidden size and derives ALiBi slopes from the head count, so heads stay). Families without a row
(OPT: no llama.cpp architecture) are refused by name.

What is written: every metadata field of the model's *source* GGUF (tokenizer, merges, special tokens, chat
template, RoPE and norm settings), renamed to the target architecture, with the widths replaced by the pruned
ones; the tensors of the pruned model under llama.cpp's names (gguf's own name map), with the two conversions
llama.cpp's converter applies and transformers' GGUF loader undid: Q/K rows permuted from the rotate-half layout
to llama.cpp's (for its interleaved-RoPE architectures, `llama` and `deci`), and Gemma's RMSNorm weights stored as
1 + w. Both packaged models come from GGUF, and a model pruned from one records it (hywia.json `model`, followed back
through fine-tuning). A model from a Hugging Face folder gets its metadata from the config (default RoPE, or Llama 3's
scaled RoPE as llama.cpp's `rope_freqs` tensor) and
its tokenizer from its tokenizer.json: byte-level BPE as llama.cpp's `gpt2` tokenizer, SentencePiece-style BPE with
byte fallback (LLaMA 2's layout) as its `llama` tokenizer (`_tokenizer_metadata`, `_spm_metadata`).

Types: f32; f16 and bf16 (matrices; norms and biases stay f32, as llama.cpp's converter does); q8_0 and q4_0
(matrices whose rows are a multiple of 32, the block size; a pruned width that is not stays f16 and is counted in
the report). q4_0 keeps the output matrix (the embedding, when tied) at q8_0, as llama.cpp's own quantizer keeps it
at a higher type: on SmolLM2 a q4_0 output alone drops next-token agreement with float32 to 42%.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import HywiaError
from .finite import check_weights
from .io import PACKAGED, joined_parts, parts_glob
from .outputs import check_output, clear_stale
from .modes import as_user_file
from .removal import layer_widths

TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
BLOCK = 32  # q8_0 / q4_0 quantize rows in blocks of 32 values


def _llama_metadata(writer, config, arch: str, head_dim: int) -> None:
    """The fields llama.cpp's LLaMA-style architectures read, from a transformers config."""
    writer.add_uint32(f"{arch}.context_length", config.max_position_embeddings)
    writer.add_uint32(f"{arch}.embedding_length", config.hidden_size)
    writer.add_uint32(f"{arch}.block_count", config.num_hidden_layers)
    writer.add_float32(f"{arch}.rope.freq_base", float(_rope(config)["rope_theta"]))
    writer.add_uint32(f"{arch}.rope.dimension_count", head_dim)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", float(config.rms_norm_eps))
    writer.add_uint32(f"{arch}.vocab_size", config.vocab_size)


def _bloom_metadata(writer, config, arch: str, head_dim: int) -> None:
    """BLOOM's fields as llama.cpp's converter writes them (ALiBi: no RoPE; its maximum bias is llama.cpp's own 8)."""
    writer.add_uint32(f"{arch}.context_length", getattr(config, "seq_length", None) or 2048)
    writer.add_uint32(f"{arch}.embedding_length", config.hidden_size)
    writer.add_uint32(f"{arch}.block_count", config.num_hidden_layers)
    writer.add_float32(f"{arch}.attention.layer_norm_epsilon", float(config.layer_norm_epsilon))


def _bloom_qkv(name: str, value: torch.Tensor, head_dim: int) -> torch.Tensor:
    """BLOOM's fused query_key_value holds each head's q, k and v together; llama.cpp's holds all q, then all k, then v
    (its converter's reordering)."""
    if ".query_key_value." not in name:
        return value
    per_head = value.reshape(-1, 3, head_dim, *value.shape[1:])
    return per_head.transpose(0, 1).reshape(value.shape)


@dataclass(frozen=True)
class Target:
    uniform: str  # llama.cpp architecture for a model whose layers share their widths
    per_layer: str | None  # ... for one whose layers differ (None: llama.cpp has none for this family)
    norm_offset: float = 0.0  # added to every RMSNorm weight (Gemma applies 1 + w)
    metadata: Callable = _llama_metadata  # the architecture's fields from a transformers config (HF folders)
    reorder: Callable[[str, torch.Tensor, int], torch.Tensor] | None = None  # a tensor's layout in llama.cpp
    prefix: str = ""  # stripped from transformers' tensor names before gguf's name map reads them
    heads_fixed: bool = False  # llama.cpp sizes attention by the hidden size: heads cannot be pruned


TARGETS: dict[str, Target] = {
    "llama": Target("llama", "deci"),
    "mistral": Target("llama", "deci"),
    # llama.cpp's qwen2 graph sizes Q as the hidden size, which pruned heads no longer fill; deci (LLaMA's graph, with
    # the optional q/k/v biases Qwen2 has, Q/K permuted to its RoPE) takes any widths
    "qwen2": Target("deci", "deci"),
    "qwen3": Target("qwen3", None),  # per-head q/k norms: no per-layer architecture has them
    "gemma3_text": Target("gemma3", None, norm_offset=1.0),
    # llama.cpp's phi3 graph sizes Q as the hidden size too; split into LLaMA's projections, Phi-3 is LLaMA's graph
    "phi3": Target("deci", "deci"),
    # llama.cpp's bloom graph sizes Q, K, V and the output projection by the hidden size and derives ALiBi slopes
    # from the head count: MLP-only pruning, uniform (`--target mlp --scope layer`)
    "bloom": Target("bloom", None, metadata=_bloom_metadata, reorder=_bloom_qkv, prefix="transformer.", heads_fixed=True),
}
# llama.cpp architectures whose RoPE rotates interleaved pairs: HF's rotate-half Q/K rows are permuted for them
NORM_ROPE = {"llama", "deci"}
UNIFORM_OPTIONS = "--scope layer (the same widths in every layer)"
MLP_ONLY_OPTIONS = "--target mlp --scope layer (uniform MLP widths, every head kept)"


def source_gguf(reference: str, hops: int = 8) -> Path:
    """Where the tokenizer and metadata come from: the GGUF file a model came from (itself, its packaged file, or what
    its hywia.json names, followed back), else the model's own folder when its tokenizer.json is one the export converts."""
    path = Path(reference).expanduser()
    if reference in PACKAGED:
        entry = PACKAGED[reference]
        return entry.gguf_path(entry.check(reference))
    if parts_glob(reference):
        return joined_parts(reference)
    if path.suffix == ".gguf" and path.is_file():
        return path
    recipe = path / "hywia.json"
    if hops and recipe.is_file():
        origin = json.loads(recipe.read_text()).get("model")
        if origin and Path(origin).expanduser().resolve() != path.resolve():
            with contextlib.suppress(HywiaError):
                return source_gguf(origin, hops - 1)
    if _bpe_tokenizer(path) is not None or _spm_tokenizer(path) is not None:
        return path
    raise HywiaError(f"{reference} neither comes from a GGUF file nor holds a BPE tokenizer.json (byte-level, or "
                     "SentencePiece-style with byte fallback), whose tokenizer the export could carry over: export a model "
                     "pruned from a .gguf file, a packaged model, or a folder with such a tokenizer.json")


def _bpe_tokenizer(folder: Path) -> dict | None:
    file = folder / "tokenizer.json"
    if not file.is_file():
        return None
    data = json.loads(file.read_text(encoding="utf-8"))
    return data if data.get("model", {}).get("type") == "BPE" and not data["model"].get("byte_fallback") else None


def _spm_tokenizer(folder: Path) -> dict | None:
    """A SentencePiece-style tokenizer.json (LLaMA 2's layout): BPE with byte fallback, decoded by a sequence."""
    file = folder / "tokenizer.json"
    if not file.is_file():
        return None
    data = json.loads(file.read_text(encoding="utf-8"))
    model = data.get("model", {})
    spm = model.get("type") == "BPE" and model.get("byte_fallback") and (data.get("decoder") or {}).get("type") == "Sequence"
    return data if spm else None


def check_tokenizer_fits(source: Path, vocab_size: int) -> None:
    """A tokenizer.json with ids beyond the embedding's rows would be cut to fit, and its last tokens lost: refused."""
    if source.suffix == ".gguf" or not (source / "tokenizer.json").is_file():
        return
    data = json.loads((source / "tokenizer.json").read_text(encoding="utf-8"))
    ids = [*data.get("model", {}).get("vocab", {}).values(), *(t["id"] for t in data.get("added_tokens", []))]
    top = max((i for i in ids if isinstance(i, int)), default=-1)
    if top >= vocab_size:
        raise HywiaError(f"the tokenizer in {source} has ids up to {top}, beyond the model's {vocab_size} embedding rows, and "
                         "llama.cpp would read its last tokens as missing: resize the model's embeddings to the tokenizer "
                         "(model.resize_token_embeddings(len(tokenizer))) and save it again; nothing was exported")


def _spm_metadata(writer, folder: Path, vocab_size: int) -> None:
    """A SentencePiece-style tokenizer.json as llama.cpp's `llama` tokenizer, read by gguf's own LlamaHfVocab (tokens,
    types, <0xXX> byte tokens) and SpecialVocab (special ids, BOS/EOS rules, chat template). llama.cpp merges by
    score; tokenizer.json has merges, not scores, and these vocabularies list tokens in merge order, so a token's
    score is minus its id (what SentencePiece's own BPE models hold, up to an offset). Padded to the embedding's rows."""
    import gguf
    from gguf.vocab import LlamaHfVocab, SpecialVocab
    tokens, scores, types = [], [], []
    for i, (text, _, kind) in enumerate(LlamaHfVocab(folder).all_tokens()):
        tokens.append(text)
        scores.append(-float(i) if kind == gguf.TokenType.NORMAL else 0.0)
        types.append(kind)
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    SpecialVocab(folder, load_merges=False, n_vocab=vocab_size).add_to_gguf(writer)


def _tokenizer_metadata(writer, folder: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer.json as llama.cpp's `gpt2` tokenizer: tokens by id (padded to the embedding's rows
    as convert_hf_to_gguf does), their types, merges, special ids, BOS rule and chat template. The pre-tokenizer is
    llama.cpp's default regex: token ids are exact, text split into words may differ for tokenizers with their own."""
    import gguf
    from transformers import AutoTokenizer
    data = _bpe_tokenizer(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    vocab = dict(data["model"]["vocab"])
    added = {t["id"]: t for t in data.get("added_tokens", [])}
    vocab.update({t["content"]: i for i, t in added.items()})
    by_id = {i: token for token, i in vocab.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i in by_id:
            tokens.append(by_id[i])
            kind = gguf.TokenType.CONTROL if added.get(i, {}).get("special") else \
                gguf.TokenType.USER_DEFINED if i in added else gguf.TokenType.NORMAL
        else:
            tokens.append(f"[PAD{i}]")
            kind = gguf.TokenType.UNUSED
        types.append(kind)
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for name, value in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id), ("unk", tokenizer.unk_token_id),
                        ("pad", tokenizer.pad_token_id)):
        if value is not None:
            getattr(writer, f"add_{name}_token_id")(value)
    from .data import bos_id
    writer.add_add_bos_token(bos_id(tokenizer) is not None)
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


def _rope(config) -> dict:
    return getattr(config, "rope_parameters", None) or {"rope_type": "default", "rope_theta": getattr(config, "rope_theta", 10000.0)}


def _check_config_metadata(config, arch: str) -> None:
    if getattr(config, "partial_rotary_factor", 1.0) != 1.0:
        raise HywiaError("partial rotary embeddings are not exported from a Hugging Face folder yet")
    rope = _rope(config).get("rope_type", "default")
    if rope != "default" and not (rope == "llama3" and arch in NORM_ROPE):
        raise HywiaError(f"RoPE scaling '{rope}' is not exported from a Hugging Face folder yet (llama.cpp needs its factors; "
                         "Llama 3's is): export a model pruned from a .gguf file")


def _rope_freqs(config, head_dim: int) -> np.ndarray | None:
    """Llama 3's RoPE scaling as llama.cpp takes it: one factor per rotary frequency (`rope_freqs.weight`), computed
    as its converter computes it from the config's factors; None for unscaled RoPE."""
    rope = _rope(config)
    if rope.get("rope_type") != "llama3":
        return None
    freqs = 1.0 / (float(rope.get("rope_theta", 10000.0)) ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    context = rope.get("original_max_position_embeddings", 8192)
    wavelen = 2 * np.pi / freqs
    smooth = (context / wavelen - low) / (high - low)
    factors = np.where(wavelen < context / high, 1.0,
                       np.where(wavelen > context / low, factor, 1 / ((1 - smooth) / factor + smooth)))
    return factors.astype(np.float32)


def check_exportable(model_type: str, per_layer_widths: bool, source: str, heads_pruned: bool = False,
                     vocab_size: int | None = None) -> None:
    """Before a prune that ends in an export: the family maps onto llama.cpp (per layer too, if the run may give
    layers different widths; with pruned heads, if the run prunes attention), and the source's tokenizer can be
    carried over."""
    target = TARGETS.get(model_type)
    if target is None:
        raise HywiaError(f"GGUF export of '{model_type}' models is not supported: hywia exports {', '.join(sorted(TARGETS))}")
    if heads_pruned and target.heads_fixed:
        raise HywiaError(f"llama.cpp's {target.uniform} architecture sizes attention by the hidden size: heads cannot be pruned "
                         f"for it; prune with {MLP_ONLY_OPTIONS}")
    if per_layer_widths and target.per_layer is None:
        raise HywiaError(f"llama.cpp's {target.uniform} architecture takes one head count and one FFN width for every layer: "
                         f"to export, prune with {MLP_ONLY_OPTIONS if target.heads_fixed else UNIFORM_OPTIONS} over all layers")
    found = source_gguf(source)
    if vocab_size is not None:
        check_tokenizer_fits(found, vocab_size)


def widths(model: nn.Module) -> tuple[list[int], list[int], list[int], int]:
    """Per layer: query heads, KV heads, FFN width (read off the modules by the family's adapter); the head size."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    layers = layer_widths(model)
    return ([w["num_attention_heads"] for w in layers], [w["num_key_value_heads"] for w in layers],
            [w["intermediate_size"] for w in layers], head_dim)


def _unfused(state: dict[str, torch.Tensor], heads: list[int], kv: list[int], head_dim: int):
    """(name, tensor) of every weight, fused projections (Phi-3's qkv_proj, gate_up_proj) split into LLaMA's q/k/v and
    gate/up, sized by each layer's own widths."""
    for name, value in state.items():
        prefix, _, leaf = name.rpartition(".")
        if prefix.endswith("self_attn.qkv_proj"):
            layer = int(name.split(".layers.")[1].split(".")[0])
            sizes = [heads[layer] * head_dim, kv[layer] * head_dim, kv[layer] * head_dim]
            base = prefix.removesuffix("qkv_proj")
            yield from ((f"{base}{part}.{leaf}", t) for part, t in zip(("q_proj", "k_proj", "v_proj"), value.split(sizes)))
        elif prefix.endswith("mlp.gate_up_proj"):
            base = prefix.removesuffix("gate_up_proj")
            yield from ((f"{base}{part}.{leaf}", t) for part, t in zip(("gate_proj", "up_proj"), value.chunk(2)))
        else:
            yield name, value


def _permute(weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """llama.cpp's converter's permutation of Q/K rows (and biases), head by head."""
    heads = weight.shape[0] // head_dim
    return weight.reshape(heads, 2, head_dim // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


_FFN = re.compile(r"blk\.(\d+)\.ffn_(gate|up|down)\.(weight|bias)")


def padded_ffn(gguf_name: str, value: torch.Tensor, ffn: list[int]) -> torch.Tensor:
    """An FFN tensor with zero channels appended up to its layer's width in `ffn`: rows of gate/up (and their
    biases), columns of down. A zero channel adds act(0) x 0 = 0 through a zero column: the output is unchanged."""
    match = _FFN.fullmatch(gguf_name)
    if match is None or (match[2] == "down" and match[3] == "bias"):
        return value
    dim = 1 if match[2] == "down" else 0
    extra = ffn[int(match[1])] - value.shape[dim]
    if extra <= 0:
        return value
    shape = list(value.shape)
    shape[dim] = extra
    return torch.cat([value, value.new_zeros(shape)], dim)


def _encode(tensor: np.ndarray, kind: str):
    """(data, raw_dtype) of one tensor in `kind`; 1-D tensors stay f32, matrices that cannot be blocked stay f16."""
    import gguf
    q = gguf.GGMLQuantizationType
    if tensor.ndim == 1 or kind == "f32":
        return tensor.astype(np.float32), None, False
    if kind == "f16":
        return tensor.astype(np.float16), None, False
    if kind == "bf16":
        return gguf.quants.quantize(tensor.astype(np.float32), q.BF16), q.BF16, False
    if tensor.shape[-1] % BLOCK:
        return tensor.astype(np.float16), None, True
    qtype = q.Q8_0 if kind == "q8_0" else q.Q4_0
    return gguf.quants.quantize(tensor.astype(np.float32), qtype), qtype, False


def as_stored(tensor: np.ndarray, kind: str) -> np.ndarray:
    """The float32 values a tensor holds once written as `kind` (rounded, or quantized and dequantized): what
    llama.cpp computes with, for comparing its outputs with a PyTorch model of the same weights."""
    import gguf
    data, raw_dtype, _ = _encode(tensor, kind)
    if raw_dtype is None:
        return data.astype(np.float32)
    return gguf.quants.dequantize(data, raw_dtype).reshape(tensor.shape).astype(np.float32)


def output_kind(kind: str) -> str:
    """The type of the output matrix (the embedding, when tied): q4_0 keeps it at q8_0."""
    return "q8_0" if kind == "q4_0" else kind


FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7, "bf16": 32}  # llama.cpp's LLAMA_FTYPE_*
WIDTH_KEYS = ("attention.head_count", "attention.head_count_kv", "feed_forward_length", "attention.key_length",
              "attention.value_length")


@dataclass
class Layout:
    """What a model becomes in GGUF: the llama.cpp architecture, and per-layer widths (FFN padded)."""

    target: Target
    arch: str
    heads: list[int]
    kv: list[int]
    ffn: list[int]
    pruned_ffn: list[int]
    head_dim: int

    @property
    def uniform(self) -> bool:
        return len(set(self.heads)) == len(set(self.kv)) == len(set(self.ffn)) == 1


def gguf_layout(model: nn.Module, pad_to: int) -> Layout:
    """The architecture and widths `model` exports as, refusing what llama.cpp's architectures cannot hold."""
    config = model.config
    target = TARGETS.get(config.model_type)
    if target is None:
        raise HywiaError(f"GGUF export of '{config.model_type}' models is not supported: hywia exports "
                         f"{', '.join(sorted(TARGETS))} (llama.cpp has no architecture mapped for this family yet)")
    if pad_to < 1:
        raise HywiaError(f"--pad-to {pad_to} must be at least 1 (1: no padding)")
    heads, kv, pruned_ffn, head_dim = widths(model)
    ffn = [-(-width // pad_to) * pad_to for width in pruned_ffn]
    layout = Layout(target, "", heads, kv, ffn, pruned_ffn, head_dim)
    layout.arch = target.uniform if layout.uniform else target.per_layer
    if layout.arch is None:
        raise HywiaError(f"llama.cpp's {target.uniform} architecture takes one head count and one FFN width for every layer, "
                         f"and this model's layers differ: prune it with {UNIFORM_OPTIONS} to export it")
    if target.heads_fixed and (getattr(config, "hywia_kept_heads", None) or heads[0] != config.num_attention_heads):
        raise HywiaError(f"llama.cpp's {layout.arch} architecture sizes attention by the hidden size (and its ALiBi slopes by "
                         f"the head count): heads cannot be pruned for it; prune with {MLP_ONLY_OPTIONS}")
    return layout


def export_gguf(model: nn.Module, out: str | Path, kind: str = "f16", source: str | Path | None = None,
                overwrite: bool = False, pad_to: int = BLOCK) -> dict:
    """Write `model` (a loaded hywia model) as a GGUF file for llama.cpp; returns what was written.

    `source` is the model reference it came from (a hywia folder, a .gguf file or a packaged name), for the
    tokenizer and the metadata the weights do not hold. Every FFN width is padded with zero channels up to a multiple
    of `pad_to` (`padded_ffn`): exact, and what lets q8_0/q4_0 quantize the down projection and llama.cpp's kernels
    run on whole blocks (1: the widths as pruned)."""
    import gguf
    if kind not in TYPES:
        raise HywiaError(f"unknown --type '{kind}': use {', '.join(TYPES)}")
    layout = gguf_layout(model, pad_to)
    check_weights(model, "nothing was exported")
    if source is None:
        raise HywiaError("export needs the model's source (its folder, .gguf file or packaged name) for the tokenizer")
    src_path = source_gguf(str(source))
    check_tokenizer_fits(src_path, model.config.vocab_size)
    reader = gguf.GGUFReader(src_path) if src_path.suffix == ".gguf" else None
    src_arch = reader.fields["general.architecture"].contents() if reader is not None else layout.target.uniform
    if reader is None:
        _check_config_metadata(model.config, layout.arch)
    out = Path(out).expanduser()
    if out.suffix != ".gguf":
        raise HywiaError(f"--out {out} must name a .gguf file")
    check_output(out, overwrite, file=True)
    tensors, fallback = _gguf_tensors(model, layout, gguf.get_tensor_name_map(gguf.MODEL_ARCH[src_arch.upper()], len(layout.heads)), kind)

    def metadata(writer) -> None:
        if reader is not None:
            _copy_metadata(writer, reader, src_arch, layout.arch)
        else:
            layout.target.metadata(writer, model.config, layout.arch, layout.head_dim)
            writer.add_string("general.name", "hywia model")
            (_spm_metadata if _spm_tokenizer(src_path) else _tokenizer_metadata)(writer, src_path, model.config.vocab_size)

    _write_gguf(out, layout, kind, metadata, tensors)
    return {"out": str(out), "arch": layout.arch, "type": kind, "uniform": layout.uniform, "source_gguf": str(src_path),
            "bytes": out.stat().st_size, "f16_fallback": fallback, "pad_to": pad_to,
            "padded_channels": sum(layout.ffn) - sum(layout.pruned_ffn),
            "widths": {"head_count": layout.heads, "head_count_kv": layout.kv, "feed_forward_length": layout.ffn,
                       "head_dim": layout.head_dim}}


def _gguf_tensors(model: nn.Module, layout: Layout, name_map, kind: str) -> tuple[list[tuple], list[str]]:
    """Every tensor under its llama.cpp name, in llama.cpp's layout and encoded as `kind` (the names kept in f16
    because their rows do not divide into `kind`'s blocks, second)."""
    config, target, arch, head_dim = model.config, layout.target, layout.arch, layout.head_dim
    tensors, fallback = [], []
    tied = getattr(config, "tie_word_embeddings", False)
    for name, value in _unfused(model.state_dict(), layout.heads, layout.kv, head_dim):
        if tied and name == "lm_head.weight":
            continue
        gguf_name = name_map.get_name(name.removeprefix(target.prefix), try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise HywiaError(f"no llama.cpp name for tensor {name} of a {config.model_type} model; nothing was exported")
        value = padded_ffn(gguf_name, value.detach().float().cpu(), layout.ffn)
        if arch in NORM_ROPE and (".q_proj." in name or ".k_proj." in name):
            value = _permute(value, head_dim)
        if target.reorder is not None:
            value = target.reorder(name, value, head_dim)
        if target.norm_offset and name.endswith("norm.weight"):
            value = value + target.norm_offset
        is_output = gguf_name == "output.weight" or (tied and gguf_name == "token_embd.weight")
        data, raw_dtype, kept_f16 = _encode(value.numpy(), output_kind(kind) if is_output else kind)
        tensors.append((gguf_name, data, raw_dtype))
        if kept_f16:
            fallback.append(gguf_name)
    rope_freqs = _rope_freqs(config, head_dim) if arch in NORM_ROPE else None
    if rope_freqs is not None:
        tensors.append(("rope_freqs.weight", rope_freqs, None))
    return tensors, fallback


def _write_gguf(out: Path, layout: Layout, kind: str, metadata: Callable, tensors: list[tuple]) -> None:
    """Write the file atomically: a temporary file beside `out`, renamed over it once complete."""
    import gguf
    folder = out.parent
    folder.mkdir(parents=True, exist_ok=True)
    clear_stale(out)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.hywia-{os.getpid()}-", suffix=".tmp", dir=folder)
    os.close(fd)
    tmp = Path(tmp_name)
    arch = layout.arch
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        metadata(writer)
        writer.add_file_type(FILE_TYPES[kind])
        values = {"attention.head_count": layout.heads, "attention.head_count_kv": layout.kv, "feed_forward_length": layout.ffn}
        for key, per_layer in values.items():
            if layout.uniform:
                writer.add_uint32(f"{arch}.{key}", per_layer[0])
            else:
                writer.add_array(f"{arch}.{key}", per_layer)
        writer.add_uint32(f"{arch}.attention.key_length", layout.head_dim)
        writer.add_uint32(f"{arch}.attention.value_length", layout.head_dim)
        for gguf_name, data, raw_dtype in tensors:
            writer.add_tensor(gguf_name, data, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        as_user_file(tmp)  # mkstemp makes 0600
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _copy_metadata(writer, reader, src_arch: str, arch: str) -> None:
    """Every field of the source GGUF but the ones the writer owns or the export rewrites, renamed to `arch`."""
    import gguf
    skip = {"general.architecture", "general.file_type", "general.quantization_version", "general.name"} | \
        {f"{src_arch}.{key}" for key in WIDTH_KEYS}
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in skip:
            continue
        value = field.contents()
        name = f"{arch}{key[len(src_arch):]}" if key.startswith(f"{src_arch}.") else key
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(name, value, vtype, sub_type=field.types[-1])
        else:
            writer.add_key_value(name, value, vtype)
    writer.add_string("general.name", f"{reader.fields['general.name'].contents() if 'general.name' in reader.fields else 'model'} (hywia)")
