"""Families beyond the LLaMA layout: OPT (MHA, biases, fc1/fc2), Phi-3 (fused qkv_proj under GQA, fused
gate_up_proj), BLOOM (fused per-head query_key_value, ALiBi, biases) and Llama 3 (llama3 RoPE scaling). Every
criterion prunes each; the pruned model equals the masked dense model, reloads in a fresh process with the same
logits and generates; fused projections are checked part by part."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import OTHER_FAMILIES, tiny_model
from hywia import CRITERIA, SPARSIFIERS, HywiaError, find_groups, prune, sparsify
from test_io import assert_reloads_and_generates
from test_prune import logits, masked_reference, mean_substituted_reference, with_readers_of

HEAD_DIM = 8


def layers_of(model):
    return {"opt": lambda m: m.model.decoder.layers, "bloom": lambda m: m.transformer.h}.get(
        model.config.model_type, lambda m: m.model.layers)(model)


@pytest.mark.parametrize("family", list(OTHER_FAMILIES))
@pytest.mark.parametrize("method", list(CRITERIA))
def test_every_criterion_prunes_every_family_to_the_masked_dense_model(family, method, calib_ids):
    dense = tiny_model(family)
    pruned, report = prune(copy.deepcopy(dense), method=method, ratio=0.3, calib=calib_ids, seed=1, compensate=False)
    assert report.params_after < report.params_before
    unit = report.extra["attention_unit"]  # the method's own: query heads for hywia-adaptive under GQA, else KV groups
    assert any(len(kept) < 8 for key, kept in report.kept.items() if not key.endswith("mlp"))  # heads went too
    reference = masked_reference(dense, report.kept, unit)
    if CRITERIA[method].reconstructs:
        reference = with_readers_of(reference, pruned, report.kept, unit)
    diff = (logits(pruned) - logits(reference)).abs().max().item()
    assert diff < 1e-4, diff


@pytest.mark.parametrize("family", list(OTHER_FAMILIES))
def test_compensation_equals_mean_substitution(family, calib_ids):
    dense = tiny_model(family)
    pruned, report = prune(copy.deepcopy(dense), method="flap", ratio=0.3, calib=calib_ids)
    reference = mean_substituted_reference(dense, report.kept, calib_ids)
    assert (logits(pruned) - logits(reference)).abs().max().item() < 1e-4


@pytest.mark.parametrize("family, scope", [("opt", "global"), ("opt", "layer"), ("phi3", "global"), ("phi3", "layer"),
                                           ("bloom", "global"), ("bloom", "layer"), ("llama3", "global")])
def test_pruned_family_reloads_in_fresh_process_and_generates(family, scope, tmp_path, tokenizer, calib_ids):
    model, _ = prune(tiny_model(family), method="element2", ratio=0.4, calib=calib_ids, scope=scope)
    assert_reloads_and_generates(model, tokenizer, tmp_path)


def test_uniform_cuts_stay_stock_configs_where_the_family_can_say_them(calib_ids):
    """Layer scope cuts every layer alike (here to 4 of 8 heads, which LLaMA's check that hidden_size divides by the
    head count accepts): Phi-3 and Llama 3 keep a stock config; OPT derives head_dim from its head count and BLOOM
    its ALiBi slopes, so a head cut there needs modeling_hywia.py."""
    stock = {f: prune(tiny_model(f), method="l2", ratio=0.5, calib=calib_ids, scope="layer")[0].config.hywia_pruned_shapes is None
             for f in OTHER_FAMILIES}
    assert stock == {"llama3": True, "opt": False, "phi3": True, "bloom": False}
    opt_mlp, _ = prune(tiny_model("opt"), method="l2", ratio=0.3, target="mlp", scope="layer")
    assert opt_mlp.config.hywia_pruned_shapes is None and opt_mlp.config.ffn_dim == opt_mlp.model.decoder.layers[0].fc1.out_features


def test_phi3_fused_projections_lose_the_rows_of_every_part(calib_ids):
    dense = tiny_model("phi3")
    pruned, report = prune(copy.deepcopy(dense), method="element2", ratio=0.3, calib=calib_ids, scope="layer")
    for layer, (old, new) in enumerate(zip(layers_of(dense), layers_of(pruned))):
        kv = torch.tensor(report.kept[f"{layer}.attention"])  # KV heads kept, each with its 2 query heads
        q, k, v = old.self_attn.qkv_proj.weight.split([64, 32, 32])
        heads = (kv[:, None] * 2 + torch.arange(2)).flatten()
        expected = torch.cat([q.view(8, HEAD_DIM, -1)[heads].flatten(0, 1), k.view(4, HEAD_DIM, -1)[kv].flatten(0, 1),
                              v.view(4, HEAD_DIM, -1)[kv].flatten(0, 1)])
        assert torch.equal(new.self_attn.qkv_proj.weight, expected)
        channels = torch.tensor(report.kept[f"{layer}.mlp"])
        gate, up = old.mlp.gate_up_proj.weight.split(48)
        assert torch.equal(new.mlp.gate_up_proj.weight, torch.cat([gate[channels], up[channels]]))
        assert torch.equal(new.mlp.down_proj.weight, old.mlp.down_proj.weight[:, channels])


def test_bloom_fused_heads_and_alibi_slopes_follow_the_kept_heads(calib_ids):
    dense = tiny_model("bloom")
    pruned, report = prune(copy.deepcopy(dense), method="element2", ratio=0.4, calib=calib_ids, scope="global", target="attention")
    for layer, (old, new) in enumerate(zip(layers_of(dense), layers_of(pruned))):
        heads = torch.tensor(report.kept[f"{layer}.attention"])
        qkv = old.self_attention.query_key_value
        assert torch.equal(new.self_attention.query_key_value.weight, qkv.weight.view(8, 3 * HEAD_DIM, -1)[heads].flatten(0, 1))
        assert torch.equal(new.self_attention.query_key_value.bias, qkv.bias.view(8, -1)[heads].flatten())
        assert new.self_attention.num_heads == len(heads)
    assert pruned.config.hywia_kept_heads == [report.kept[f"{layer}.attention"] for layer in range(3)]
    # a second pruning composes with the first: the heads kept are named by their original index
    again, second = prune(pruned, method="l2", ratio=0.3, target="attention", scope="layer")
    assert all(set(again.config.hywia_kept_heads[layer]) < set(report.kept[f"{layer}.attention"]) for layer in range(3))


def test_phi3_query_heads_are_balanced_and_equal_the_masked_model(calib_ids):
    dense = tiny_model("phi3")
    pruned, report = prune(copy.deepcopy(dense), method="element2", ratio=0.3, calib=calib_ids, attention_unit="query")
    for layer, block in enumerate(layers_of(pruned)):
        heads = report.kept[f"{layer}.query"]
        counts = [sum(1 for h in heads if h // 2 == kv) for kv in range(4)]
        assert len(set(counts)) == 1 and block.self_attn.qkv_proj.out_features == (len(heads) + 8) * HEAD_DIM
    diff = (logits(pruned) - logits(masked_reference(dense, report.kept, "query"))).abs().max().item()
    assert diff < 1e-4, diff


@pytest.mark.parametrize("family", ["opt", "bloom"])
def test_query_heads_of_multi_head_attention_are_a_clear_error(family):
    with pytest.raises(HywiaError, match="grouped-query attention.*--attention-unit kv"):
        find_groups(tiny_model(family), attention_unit="query")


@pytest.mark.parametrize("family", list(OTHER_FAMILIES))
@pytest.mark.parametrize("method", list(SPARSIFIERS))
def test_every_sparsifier_prunes_every_family(family, method, calib_ids):
    model, report = sparsify(tiny_model(family), method=method, sparsity=0.5, calib=calib_ids)
    assert abs(report.achieved_sparsity - 0.5) < 0.02
    assert torch.isfinite(logits(model)).all()


def test_unsupported_family_names_the_supported_ones_and_the_fix():
    import transformers
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=260))
    with pytest.raises(HywiaError, match=r"unsupported architecture 'gpt2'.*bloom.*opt.*phi3.*docs/families.md"):
        prune(model, method="l2", ratio=0.2)


def test_baichuan_7b_checkpoint_loads_as_llama_and_prunes(tmp_path, tokenizer, calib_ids):
    """Baichuan-7B's remote-code checkpoint (W_pack = q | k | v, MHA) read as the LLaMA it is: same logits as the
    LLaMA it was made from, then pruned and reloaded like any LLaMA."""
    import json
    import transformers
    from safetensors.torch import save_file
    from hywia import load_model
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=260, hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=8, max_position_embeddings=256, tie_word_embeddings=False)).eval()
    state = {k: v.clone() for k, v in llama.state_dict().items()}
    for layer in range(2):
        prefix = f"model.layers.{layer}.self_attn."
        state[prefix + "W_pack.weight"] = torch.cat([state.pop(prefix + f"{n}_proj.weight") for n in "qkv"])
    folder = tmp_path / "baichuan-7b"
    folder.mkdir()
    save_file(state, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({
        "model_type": "baichuan", "architectures": ["BaiChuanForCausalLM"], "auto_map": {"AutoModelForCausalLM": "modeling_baichuan.BaiChuanForCausalLM"},
        "vocab_size": 260, "hidden_size": 64, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 8,
        "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "hidden_act": "silu", "tie_word_embeddings": False}))
    tokenizer.save_pretrained(folder)
    model, _ = load_model(str(folder))
    assert model.config.model_type == "llama"
    torch.testing.assert_close(logits(model), logits(llama))
    pruned, report = prune(model, method="element2", ratio=0.3, calib=calib_ids)
    assert report.params_after < report.params_before
    assert_reloads_and_generates(pruned, tokenizer, tmp_path)
