"""Unstructured and N:M pruning: SparseGPT's reconstruction beats magnitude and Wanda, N:M masks are exact, mixed
sparsity meets its target exactly with different per-layer sparsities, the sequential walk calibrates each layer on
the pruned layers before it, and every sparsified model reloads in a fresh process with identical logits."""
from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from conftest import tiny_model
from hywia import HywiaError, save_model, sparsify
from hywia.methods.magnitude import unstructured_magnitude
from hywia.methods.mixed import allocate_sparsity
from hywia.methods.sparsegpt import sparsegpt
from hywia.methods.wanda import wanda
from hywia.sparsify import SPARSIFIERS, InputStats, Sparsifier, linears, pattern_mask, walk
from test_io import logits, fresh_process_logits


def correlated_layer(seed: int = 0) -> tuple[nn.Linear, torch.Tensor]:
    """A random 64 -> 32 Linear and 2,048 inputs whose features are correlated and differently scaled."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(16, 64, generator=g)
    x = torch.randn(2048, 16, generator=g) @ mixing + 0.1 * torch.randn(2048, 64, generator=g)
    x = x * torch.linspace(0.2, 3.0, 64)
    layer = nn.Linear(64, 32, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(32, 64, generator=g))
    return layer, x


def reconstruction_error(prune_fn, pattern=None, sparsity=0.5) -> float:
    layer, x = correlated_layer()
    stats = InputStats(full=True)
    stats.add(x)
    pruned = copy.deepcopy(layer)
    prune_fn(pruned, stats, sparsity, pattern, {})
    assert (pruned.weight == 0).float().mean().item() == pytest.approx(sparsity, abs=1e-9)
    with torch.no_grad():
        return (pruned(x) - layer(x)).square().sum().item()


@pytest.mark.parametrize("pattern", [None, (2, 4)])
def test_sparsegpt_reconstructs_better_than_magnitude_and_wanda(pattern):
    errors = {name: reconstruction_error(fn, pattern) for name, fn in
              (("sparsegpt", sparsegpt), ("wanda", wanda), ("magnitude", unstructured_magnitude))}
    assert errors["sparsegpt"] < errors["wanda"] and errors["sparsegpt"] < errors["magnitude"], errors
    assert errors["sparsegpt"] < 0.8 * errors["magnitude"], errors


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_n_m_masks_are_exactly_n_of_every_m(method, pattern, calib_ids):
    n, m = (int(p) for p in pattern.split(":"))
    model, report = sparsify(tiny_model(), method=method, sparsity=None, pattern=pattern, calib=calib_ids)
    for name, module in linears(model).items():
        zeros = (module.weight == 0).reshape(module.weight.shape[0], -1, m).sum(2)
        assert torch.equal(zeros, torch.full_like(zeros, n)), name
    assert report.achieved_sparsity == n / m and report.pattern == pattern


def test_pattern_mask_picks_the_lowest_of_each_block():
    metric = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.5, 0.1, 9.0, 8.0]])
    assert pattern_mask(metric, (2, 4)).tolist() == [[False, True, False, True, True, True, False, False]]


def test_allocation_follows_sensitivity_and_meets_the_target_to_the_weight():
    sizes = {f"model.layers.{i}.mlp.up_proj": 1000 + 37 * i for i in range(5)}
    sizes |= {f"model.layers.{i}.self_attn.q_proj": 333 for i in range(5)}
    sensitivity = {name: float(name.split(".")[2]) + 1 for name in sizes}  # deeper layer: more sensitive
    for target in (0.5, 0.7):
        allocated = allocate_sparsity(sizes, sensitivity, target, 0.1)
        zeros = sum(round(allocated[n] * sizes[n]) for n in sizes)
        assert zeros == round(target * sum(sizes.values()))
        per_layer = [allocated[f"model.layers.{i}.mlp.up_proj"] for i in range(5)]
        assert per_layer == sorted(per_layer, reverse=True) and per_layer[0] - per_layer[-1] > 0.15
    uniform = allocate_sparsity(sizes, sensitivity, 0.5, 0.0)
    assert all(abs(s - 0.5) < 2 / min(sizes.values()) for s in uniform.values())


def test_mixed_gives_layers_different_sparsities_with_the_exact_weighted_mean(calib_ids):
    model, report = sparsify(tiny_model(layers=4), method="mixed", sparsity=0.6, calib=calib_ids, spread=0.15)
    per_layer = {}
    for name, module in linears(model).items():
        layer = int(name.split(".")[2])
        zeros, total = per_layer.get(layer, (0, 0))
        per_layer[layer] = (zeros + int((module.weight == 0).sum()), total + module.weight.numel())
    fractions = [z / t for z, t in per_layer.values()]
    assert max(fractions) - min(fractions) > 0.1
    assert report.zeros == round(0.6 * report.prunable)


def test_walk_calibrates_each_layer_on_the_pruned_layers_before_it(calib_ids):
    """The inputs a layer's q_proj saw during the walk are those the finished, pruned model gives it (including
    Gemma 3's per-layer masks and rotary tables)."""
    for family in ("llama", "gemma3_text"):
        model = tiny_model(family)
        seen: dict[str, torch.Tensor] = {}

        def recording(module, stats, sparsity, pattern, options, seen=seen):
            seen[next(n for n, m in linears(model).items() if m is module)] = stats.second.clone()
            sparsegpt(module, stats, sparsity, pattern, options)

        matrices = linears(model)
        walk(model, calib_ids, dict.fromkeys(matrices, 0.5), Sparsifier(recording, needs_hessian=True), None, {}, batch_size=4)
        after = {name: InputStats(full=True) for name in matrices if name.endswith("q_proj")}
        handles = [matrices[n].register_forward_pre_hook(lambda m, a, n=n: after[n].add(a[0])) for n in after]
        with torch.no_grad():
            model(input_ids=calib_ids)
        for h in handles:
            h.remove()
        for name, stats in after.items():
            assert torch.allclose(seen[name], stats.second, rtol=1e-4, atol=1e-5), (family, name)


@pytest.mark.parametrize("method, options", [("sparsegpt", {"sparsity": 0.5}), ("wanda", {"sparsity": None, "pattern": "2:4"}),
                                             ("mixed", {"sparsity": 0.7}), ("magnitude", {"sparsity": 0.6}),
                                             ("sparsegpt", {"sparsity": 0.5, "wbits": 4})])
def test_sparsified_model_reloads_in_fresh_process_with_identical_logits(method, options, tmp_path, tokenizer, calib_ids):
    model, report = sparsify(tiny_model("qwen2"), method=method, calib=calib_ids, **options)
    out = save_model(model, tokenizer, tmp_path / "sparse", {"model": "tiny", **report.as_dict()})
    recipe = json.loads((out / "hywia.json").read_text())
    assert recipe["outcome"] == "unstructured" and len(recipe["per_matrix"]) == len(linears(model))
    assert not (out / "modeling_hywia.py").exists()  # same shapes: a stock config
    assert torch.equal(fresh_process_logits(out, "plain", tmp_path), logits(model))


def test_quantized_sparsegpt_keeps_at_most_16_levels_per_row(calib_ids):
    model, _ = sparsify(tiny_model(), method="sparsegpt", sparsity=0.5, calib=calib_ids, wbits=4)
    for module in linears(model).values():
        assert max(len(torch.unique(row)) for row in module.weight) <= 16


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "mixed", "sparsity": 0.5, "pattern": "2:4"}, "N:M --pattern"),
    ({"method": "sparsegpt", "sparsity": 0.3, "pattern": "2:4"}, "contradicts"),
    ({"method": "sparsegpt", "sparsity": None}, "needs --sparsity"),
    ({"method": "sparsegpt", "sparsity": 1.2}, "out of range"),
    ({"method": "wanda", "sparsity": 0.5, "wbits": 4}, "--wbits does not apply"),
    ({"method": "sparsegpt", "sparsity": None, "pattern": "4:2"}, "0 < N < M"),
    ({"method": "sparsegpt", "sparsity": None, "pattern": "2:3"}, "divisible by 3"),
    ({"method": "mixed", "sparsity": 0.5, "spread": 0.7}, "--spread"),
])
def test_bad_options_are_one_line_errors(kwargs, message, calib_ids):
    with pytest.raises(HywiaError, match=message):
        sparsify(tiny_model(), calib=calib_ids, **kwargs)


def test_every_registered_sparsifier_runs_on_a_tiny_model(calib_ids):
    for name in SPARSIFIERS:
        model, report = sparsify(tiny_model(), method=name, sparsity=0.5, calib=calib_ids)
        assert report.achieved_sparsity == pytest.approx(0.5, abs=1e-3), name


@pytest.mark.parametrize("args, message", [
    (["--method", "sparsegpt", "--ratio", "0.2"], "--ratio does not apply to --method sparsegpt"),
    (["--method", "wanda", "--sparsity", "0.5", "--scope", "layer"], "--scope does not apply"),
    (["--method", "element2", "--sparsity", "0.5"], "--sparsity does not apply to --method element2"),
    (["--method", "hywia", "--ratio", "0.2", "--pattern", "2:4"], "--pattern does not apply"),
    (["--method", "sparsegpt", "--sparsity", "0.5", "--attention-unit", "query"], "--attention-unit does not apply"),
    (["--method", "element2"], "needs --ratio"),
    (["--method", "mixed", "--pattern", "2:4"], "N:M --pattern"),
])
def test_cli_structured_and_unstructured_options_refuse_each_other(args, message, tmp_path):
    done = subprocess.run([sys.executable, "-m", "hywia.cli", "prune", "--model", str(tmp_path / "none"), "--out", str(tmp_path / "o"), *args],
                          capture_output=True, text=True)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr
