"""Query-head pruning under GQA: the same number of query heads leaves every KV group of a layer, the pruned model
equals the dense one with those heads masked, runs in stock transformers and reloads in a fresh process."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import FAMILIES, tiny_model
from test_io import assert_reloads_and_generates, fresh_process_logits
from test_io import logits as reload_ids_logits
from test_prune import logits, masked_reference, mean_substituted_reference

from hywia import HywiaError, find_groups, load_model, prune, save_model
from hywia.allocate import allocate

N_KV, N_REP, HEAD_DIM = 4, 2, 8  # tiny_model: 8 query heads over 4 KV heads


def kept_per_kv_group(kept_heads: list[int], n_rep: int = N_REP) -> list[int]:
    return [sum(1 for h in kept_heads if h // n_rep == kv) for kv in range(N_KV)]


def test_query_groups_are_single_heads_in_kv_blocks():
    sets = find_groups(tiny_model(), "attention", attention_unit="query")
    assert [(s.kind, s.count, s.blocks) for s in sets] == [("query", 8, 4)] * 3
    assert sets[0].params_per_group == 2 * HEAD_DIM * 64  # its q_proj rows and o_proj columns
    with pytest.raises(HywiaError, match="attention unit"):
        find_groups(tiny_model(), attention_unit="head")


def test_balanced_allocation_removes_each_blocks_lowest_heads():
    sets = find_groups(tiny_model(), "attention", attention_unit="query")
    # block b's heads are 2b and 2b+1; make head 2b+1 the lower one in even blocks, 2b in odd ones
    scores = [torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 0.5, 0.1, 3.0]) for _ in sets]
    removed = allocate(sets, scores, 0.5, "layer")
    assert [r.tolist() for r in removed] == [[1, 2, 5, 6]] * 3


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("method, scope", [("element2", "layer"), ("hywia", "layer"), ("wanda_sp", "global"), ("flap", "joint")])
def test_query_head_pruning_equals_masked_dense(family, method, scope, calib_ids):
    dense = tiny_model(family)
    pruned, report = prune(copy.deepcopy(dense), method=method, ratio=0.3, calib=calib_ids, scope=scope, attention_unit="query",
                           compensate=False)
    for layer, block in enumerate(pruned.model.layers):
        heads = report.kept[f"{layer}.query"]
        counts = kept_per_kv_group(heads)
        assert len(set(counts)) == 1 and counts[0] >= 1  # balanced, and every KV group keeps a head
        assert block.self_attn.q_proj.out_features == len(heads) * HEAD_DIM
        assert block.self_attn.k_proj.out_features == N_KV * HEAD_DIM  # KV heads untouched
        assert block.self_attn.num_key_value_groups == counts[0]
    assert any(len(h) < 8 for k, h in report.kept.items() if k.endswith("query"))
    diff = (logits(pruned) - logits(masked_reference(dense, report.kept, "query"))).abs().max().item()
    assert diff < 1e-4, diff


def test_compensation_is_available_to_every_criterion(calib_ids):
    dense = tiny_model("qwen2")
    pruned, report = prune(copy.deepcopy(dense), method="element2", ratio=0.3, calib=calib_ids, attention_unit="query",
                           compensate=True)
    assert report.extra["compensate"] is True
    reference = mean_substituted_reference(dense, report.kept, calib_ids, "query")
    assert (logits(pruned) - logits(reference)).abs().max().item() < 1e-4
    plain, _ = prune(copy.deepcopy(dense), method="element2", ratio=0.3, calib=calib_ids, attention_unit="query")
    assert not torch.allclose(logits(plain), logits(pruned))  # the compensation changed something


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_hywia_adaptive_defaults_to_query_heads_compensation_global_scope_obs_and_the_best_evidence_split(family, calib_ids):
    dense = tiny_model(family)
    chosen, report = prune(copy.deepcopy(dense), method="hywia-adaptive", ratio=0.3, calib=calib_ids, reconstruct=False)
    extra = report.extra
    assert (report.scope, extra["attention_unit"], extra["compensate"], extra["kind_split"]) == ("global", "query", True, "evidence")
    assert set(report.scores["alpha"]) == {f"{layer}.{kind}" for layer in range(3) for kind in ("query", "mlp")}
    assert len({len(report.kept[f"{layer}.mlp"]) for layer in range(3)}) > 1  # per-layer ratios: layers differ
    reference = mean_substituted_reference(dense, report.kept, calib_ids, "query")
    assert (logits(chosen) - logits(reference)).abs().max().item() < 1e-4
    same, again = prune(copy.deepcopy(dense), method="hywia", ratio=0.3, calib=calib_ids, fusion="evidence", attention_unit="query",
                        compensate=True, scope="global", kind_split="evidence")
    assert again.kept == report.kept and torch.equal(logits(same), logits(chosen))  # exactly those five options of hywia
    # the default adds --reconstruct obs: the same number of groups leaves each set, OBS picks which, the readers are refit
    default, obs = prune(copy.deepcopy(dense), method="hywia-adaptive", ratio=0.3, calib=calib_ids)
    assert obs.extra["reconstruct"] == "obs" and obs.kept.keys() == report.kept.keys()
    assert all(len(obs.kept[k]) == len(report.kept[k]) for k in report.kept)
    # and the split by evidence-best (both screens; where they disagree, both models built and judged)
    assert obs.extra["kind_split"] == "evidence-best" and obs.extra["kind_split_evidence"]["candidates"] == "masked+refit"
    explicit, _ = prune(copy.deepcopy(dense), method="hywia", ratio=0.3, calib=calib_ids, fusion="evidence", attention_unit="query",
                        compensate=True, scope="global", kind_split="evidence-best", reconstruct="obs")
    assert torch.equal(logits(explicit), logits(default))


def test_hywia_adaptive_uses_kv_groups_where_every_head_has_its_own(calib_ids):
    _, report = prune(tiny_model("opt"), method="hywia-adaptive", ratio=0.3, calib=calib_ids)
    assert report.extra["attention_unit"] == "kv"
    with pytest.raises(HywiaError, match="--fusion does not apply to --method hywia-adaptive"):
        prune(tiny_model(), method="hywia-adaptive", ratio=0.3, calib=calib_ids, fusion="attention")


@pytest.mark.parametrize("family, scope, compensate", [("llama", "layer", False), ("gemma3_text", "global", False),
                                                       ("qwen3", "joint", True)])
def test_query_pruned_model_reloads_in_fresh_process(family, scope, compensate, tmp_path, tokenizer, calib_ids):
    model, _ = prune(tiny_model(family), method="element2", ratio=0.4, calib=calib_ids, scope=scope, attention_unit="query",
                     compensate=compensate)
    assert_reloads_and_generates(model, tokenizer, tmp_path)


def test_kv_groups_then_query_heads(tmp_path, tokenizer, calib_ids):
    """The two attention granularities combine: whole KV groups first, then query heads of the groups left."""
    model, _ = prune(tiny_model(), method="element2", ratio=0.25, calib=calib_ids, target="attention", scope="global")
    first = save_model(model, tokenizer, tmp_path / "kv", {})
    again, _ = load_model(str(first))
    before = [b.self_attn.k_proj.out_features for b in again.model.layers]
    again, report = prune(again, method="element2", ratio=0.5, calib=calib_ids, target="attention", attention_unit="query")
    assert [b.self_attn.k_proj.out_features for b in again.model.layers] == before
    assert all(b.self_attn.num_key_value_groups == 1 for b in again.model.layers)  # 2 heads per KV group -> 1
    out = save_model(again, tokenizer, tmp_path / "kvq", {})
    assert torch.equal(fresh_process_logits(out, "remote", tmp_path), reload_ids_logits(again))


def test_unknown_attention_unit_is_refused_before_loading():
    with pytest.raises(HywiaError, match="--attention-unit"):
        prune(tiny_model(), method="l2", ratio=0.2, attention_unit="heads")
