"""SAAP: fusion weights that follow the uncertainty of their inputs, layer ratios from the layer ranking that meet
the target, a pruned model that reloads, and group fine-tuning that trains one group of layers at a time."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_model
from hywia import prune, save_model
from hywia.finetune import FinetuneSettings, finetune, layer_of, stage_layers
from hywia.fusion import uncertainty_weights
from hywia.importance import Moments
from test_finetune import RECORDS
from test_io import fresh_process_logits, logits


def moments_of(samples: torch.Tensor) -> Moments:
    m = Moments()
    for row in samples:
        m.add(row[None])
    return m


def test_uncertainty_weights_favour_the_steadier_estimate():
    g = torch.Generator().manual_seed(0)
    truth = torch.rand(50, generator=g) + 0.5
    steady = truth + 0.05 * torch.randn(16, 50, generator=g)
    noisy = truth + 1.0 * torch.randn(16, 50, generator=g)
    weights = uncertainty_weights({"a": steady.mean(0), "b": noisy.mean(0)}, {"a": moments_of(steady), "b": moments_of(noisy)})
    assert weights["a"] > 0.95 and weights["a"] + weights["b"] == pytest.approx(1)
    swapped = uncertainty_weights({"a": noisy.mean(0), "b": steady.mean(0)}, {"a": moments_of(noisy), "b": moments_of(steady)})
    assert swapped["b"] == pytest.approx(weights["a"])
    # a constant rescaling of an estimate (its units) changes nothing
    scaled = uncertainty_weights({"a": 1000 * steady.mean(0), "b": noisy.mean(0)}, {"a": moments_of(1000 * steady), "b": moments_of(noisy)})
    assert scaled["a"] == pytest.approx(weights["a"])


def test_saap_has_one_weight_per_estimate_and_kind(calib_ids):
    _, report = prune(tiny_model(), method="saap", ratio=0.3, calib=calib_ids)
    weights = {key: t[0].item() for key, t in report.scores["weight_fine"].items()}
    assert all(0 < w < 1 for w in weights.values())
    assert len({round(w, 6) for w in weights.values()}) == 2  # one weight per kind (homoscedastic), attention and MLP


def test_saap_layer_ratios_follow_the_layer_ranking_and_meet_the_target(calib_ids, tmp_path, tokenizer):
    model, report = prune(tiny_model(layers=4), method="saap", ratio=0.3, calib=calib_ids, spread=0.5)
    ratios = report.extra["layer_ratios"]
    assert sorted(ratios.values()) == pytest.approx([0.15, 0.25, 0.35, 0.45])
    assert sum(ratios.values()) / len(ratios) == pytest.approx(0.3)
    assert report.achieved_ratio == pytest.approx(0.3, abs=0.03)
    fused = report.scores["fused"]
    importance = {layer: torch.cat([t for key, t in fused.items() if int(key.split(".")[0]) == layer]).mean().item() for layer in ratios}
    least, most = min(importance, key=importance.get), max(importance, key=importance.get)
    assert ratios[least] == max(ratios.values()) and ratios[most] == min(ratios.values())
    kept = {row["layer"]: 0 for row in report.per_layer}
    for row in report.per_layer:
        kept[row["layer"]] += row["params_after"]
    assert kept[least] < kept[most]
    out = save_model(model, tokenizer, tmp_path / "saap", {"model": "tiny", **report.as_dict()})
    assert torch.equal(fresh_process_logits(out, "remote", tmp_path), logits(model))


def test_saap_spread_zero_is_the_same_ratio_everywhere(calib_ids):
    _, report = prune(tiny_model(), method="saap", ratio=0.3, calib=calib_ids, spread=0)
    assert set(report.extra["layer_ratios"].values()) == {0.3}


def test_stage_layers_cover_every_layer_once_deepest_first():
    stages = [stage_layers(step, 12, 3, 30) for step in range(12)]
    assert stages[0] == range(20, 30) and stages[4] == range(10, 20) and stages[11] == range(0, 10)
    assert layer_of("base_model.model.model.layers.17.mlp.up_proj.lora_A.default.weight", "model.layers") == 17
    assert layer_of("base_model.model.lm_head.weight", "model.layers") is None


def test_group_finetuning_trains_one_group_of_layers_at_a_time(tmp_path, tokenizer):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(RECORDS))
    settings = FinetuneSettings(batch_size=8, micro_batch_size=4, max_steps=4, warmup_steps=1, cutoff_len=48, lr=1e-2, groups=2)
    whole, _ = finetune(tiny_model(layers=4), tokenizer, str(path), settings)
    moved = {layer_of(n, "model.layers") for n, p in whole.named_parameters() if "lora_B" in n and p.abs().sum() > 0}
    assert moved == {0, 1, 2, 3}
    assert all(p.requires_grad for n, p in whole.named_parameters() if "lora_" in n)  # left trainable for the caller
    # a 4-step run stopped after its first stage: only layers 2 and 3 (the deep group) have trained
    half, _ = finetune(tiny_model(layers=4), tokenizer, str(path), settings, stop_after=2)
    moved = {layer_of(n, "model.layers") for n, p in half.named_parameters() if "lora_B" in n and p.abs().sum() > 0}
    assert moved == {2, 3}
