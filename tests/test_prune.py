"""A pruned model must compute exactly what the dense model computes with the removed groups zeroed."""
from __future__ import annotations

import copy
import importlib

import pytest
import torch
from conftest import FAMILIES, tiny_model

from hywia import CRITERIA, HywiaError, find_groups, prune
from hywia.allocate import allocate
from hywia.removal import remove_groups

IDS = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(7))


def masked_reference(dense, kept: dict[str, list[int]], unit: str = "kv"):
    """The dense model with every group that `kept` leaves out set to zero (weights and owned biases)."""
    ref = copy.deepcopy(dense)
    with torch.no_grad():
        for s in find_groups(ref, "both", attention_unit=unit):
            key = f"{s.layer}.{s.kind}"
            if key not in kept:
                continue
            gone = [g for g in range(s.count) if g not in kept[key]]
            for slot in s.slots:
                view = slot.param.data.movedim(slot.dim, 0).narrow(0, slot.offset, s.count * slot.size).view(s.count, slot.size, -1)
                view[gone] = 0
    return ref


def with_readers_of(reference, pruned, kept: dict[str, list[int]], unit: str = "kv"):
    """`reference` (a masked dense model) with each output projection's kept columns and bias taken from `pruned`:
    what a reconstructing method promises (it refits exactly those weights, hywia.reconstruct)."""
    ref = copy.deepcopy(reference)
    with torch.no_grad():
        for s in find_groups(ref, "both", attention_unit=unit):
            kept_ids = torch.tensor(kept.get(f"{s.layer}.{s.kind}", range(s.count)), dtype=torch.long)
            reader, new = s.reader.module, pruned.get_submodule(s.reader.name)
            reader.weight.data[:, s.reader.indices(kept_ids)] = new.weight.data
            if new.bias is not None:
                if reader.bias is None:
                    reader.bias = torch.nn.Parameter(torch.zeros_like(new.bias))
                reader.bias.data.copy_(new.bias.data)
    return ref


def mean_substituted_reference(dense, kept: dict[str, list[int]], calib_ids: torch.Tensor, unit: str = "kv"):
    """The dense model in which every removed input of o_proj / down_proj (a removed head's output, a removed
    channel's activation) is replaced by its mean over the calibration tokens: what bias compensation promises."""
    ref = copy.deepcopy(dense)
    inputs: dict[str, list[torch.Tensor]] = {}
    handles = [ref.get_submodule(name).register_forward_pre_hook(
        lambda m, args, name=name: inputs.setdefault(name, []).append(args[0].reshape(-1, args[0].shape[-1])))
        for s in find_groups(ref, "both", attention_unit=unit) for name in [s.reader.name]]
    with torch.no_grad():
        ref(input_ids=calib_ids)
    for h in handles:
        h.remove()

    def substitute(name, columns):
        mean = torch.cat(inputs[name]).double().mean(0).float()

        def hook(module, args):
            x = args[0].clone()
            x[..., columns] = mean[columns]
            return (x,)
        return hook

    for s in find_groups(ref, "both", attention_unit=unit):
        gone = [g for g in range(s.count) if g not in kept.get(f"{s.layer}.{s.kind}", range(s.count))]
        name, size = s.reader.name, s.reader.size
        columns = [g * size + i for g in gone for i in range(size)]
        if columns:
            ref.get_submodule(name).register_forward_pre_hook(substitute(name, columns))
    return ref


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("method", list(CRITERIA))
def test_every_criterion_equals_masked_dense(method, calib_ids):
    dense = tiny_model("llama")
    pruned, report = prune(copy.deepcopy(dense), method=method, ratio=0.3, calib=calib_ids, seed=3)
    assert report.params_after < report.params_before
    unit = report.extra["attention_unit"]  # the method's own: query heads for hywia-adaptive
    if CRITERIA[method].reconstructs:  # the refit readers (and biases) replace what compensation would have done
        reference = with_readers_of(masked_reference(dense, report.kept, unit), pruned, report.kept, unit)
    elif CRITERIA[method].compensates:
        reference = mean_substituted_reference(dense, report.kept, calib_ids, unit)
    else:
        reference = masked_reference(dense, report.kept, unit)
    diff = (logits(pruned) - logits(reference)).abs().max().item()
    assert diff < 1e-4, diff


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_families_and_scopes_equal_masked_dense(family, scope, calib_ids):
    dense = tiny_model(family)
    pruned, report = prune(copy.deepcopy(dense), method="element2", ratio=0.4, calib=calib_ids, scope=scope)
    diff = (logits(pruned) - logits(masked_reference(dense, report.kept))).abs().max().item()
    assert diff < 1e-4, diff


def test_shapes_of_pruned_layers_follow_kept_groups(calib_ids):
    model, report = prune(tiny_model(), method="l2", ratio=0.5, calib=calib_ids, scope="global")
    for layer, block in enumerate(model.model.layers):
        kv = len(report.kept[f"{layer}.attention"])
        ch = len(report.kept[f"{layer}.mlp"])
        attn = block.self_attn
        assert attn.q_proj.weight.shape == (kv * 2 * 8, 64)  # 2 query heads per KV head, head_dim 8
        assert attn.k_proj.weight.shape == attn.v_proj.weight.shape == (kv * 8, 64)
        assert attn.o_proj.weight.shape == (64, kv * 2 * 8)
        assert block.mlp.gate_proj.weight.shape == block.mlp.up_proj.weight.shape == (ch, 64)
        assert block.mlp.down_proj.weight.shape == (64, ch)
        assert model.config.hywia_layer_widths[layer]["intermediate_size"] == ch


def test_achieved_ratio_is_close_to_request(calib_ids):
    for ratio in (0.2, 0.5):
        _, report = prune(tiny_model(), method="l1", ratio=ratio, calib=calib_ids)
        # within one attention group's worth of parameters per layer and rounding of the MLP channels
        assert abs(report.achieved_ratio - ratio) < 0.05, report.achieved_ratio


def test_layer_range_and_target_restrict_pruning(calib_ids):
    model, report = prune(tiny_model(), method="l2", ratio=0.5, calib=calib_ids, layers="1:2", target="mlp")
    assert report.layers == [1]
    assert set(report.kept) == {"1.mlp"}
    assert model.model.layers[0].mlp.up_proj.out_features == 48
    assert model.model.layers[1].mlp.up_proj.out_features == 24
    assert model.model.layers[1].self_attn.q_proj.out_features == 64


def test_random_is_seeded(calib_ids):
    _, a = prune(tiny_model(), method="random", ratio=0.3, seed=5)
    _, b = prune(tiny_model(), method="random", ratio=0.3, seed=5)
    _, c = prune(tiny_model(), method="random", ratio=0.3, seed=6)
    assert a.kept == b.kept and a.kept != c.kept


def test_allocation_picks_lowest_scores_and_respects_floor():
    sets = [s for s in find_groups(tiny_model(), "attention")]
    scores = [torch.tensor([3.0, 0.1, 2.0, 0.2]), torch.tensor([0.0, 0.0, 0.0, 0.0]), torch.tensor([5.0, 6.0, 7.0, 8.0])]
    removed = allocate(sets, scores, ratio=0.5, scope="global")
    # 6 of 12 go, lowest first; layer 1's last KV group survives its zero score (floor of one per layer)
    assert [r.tolist() for r in removed] == [[1, 2, 3], [0, 1, 2], []]
    removed_layer = allocate(sets, scores, ratio=0.5, scope="layer")
    assert removed_layer[0].tolist() == [1, 3]


@pytest.mark.parametrize("kwargs, message", [
    ({"ratio": 0.0}, "out of range"),
    ({"ratio": 1.5}, "out of range"),
    ({"ratio": 0.9}, "would leave layer"),
    ({"ratio": 0.99, "scope": "global"}, "impossible"),
    ({"ratio": 0.001}, "too small"),
    ({"ratio": 0.2, "method": "taylor"}, "unknown method"),
    ({"ratio": 0.2, "scope": "row"}, "unknown scope"),
    ({"ratio": 0.2, "target": "heads"}, "unknown target"),
    ({"ratio": 0.2, "layers": "7:9"}, "selects no layer"),
])
def test_bad_inputs_raise_one_line_errors(kwargs, message, calib_ids):
    model = tiny_model()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(HywiaError, match=message) as info:
        prune(model, calib=calib_ids, **{"method": "l1", **kwargs})
    assert "\n" not in str(info.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # input untouched


def test_unsupported_architecture_is_named():
    import transformers
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)
    with pytest.raises(HywiaError, match="unsupported architecture 'gpt2'"):
        prune(transformers.GPT2LMHeadModel(config), method="l1", ratio=0.2)


def test_mlp_may_be_emptied_only_when_asked():
    dense = tiny_model()
    model = copy.deepcopy(dense)
    sets = find_groups(model, "mlp")
    scores = [torch.rand(48), torch.zeros(48), torch.rand(48) + 1]
    with pytest.raises(HywiaError, match="impossible"):
        allocate(sets, scores, ratio=0.9, scope="global", min_keep=48)
    removed = allocate(sets, scores, ratio=0.5, scope="global", min_keep=0)
    assert len(removed[1]) == 48  # layer 1 loses every channel
    remove_groups(model, sets, removed)
    assert model.model.layers[1].mlp.up_proj.out_features == 0
    assert [s.params_per_group for s in find_groups(model, "mlp")] == [3 * 64] * 3
    assert model.config.hywia_layer_widths[1]["intermediate_size"] == 0
    kept = {f"{s.layer}.mlp": [g for g in range(48) if g not in r.tolist()] for s, r in zip(sets, removed)}
    assert (logits(model) - logits(masked_reference(dense, kept))).abs().max() < 1e-4


def test_wanda_sp_weighs_down_proj_columns_by_channel_activation_norms(calib_ids):
    """Wanda-sp's MLP score from an independent computation: the MLP input captured at the block, the channel
    activations silu(gate x) * up x recomputed by hand, then sum_i |W_down[i, c]| * ||a_c||_2."""
    from hywia.calibrate import score_groups
    from hywia.importance import get_criterion

    model = tiny_model("llama")
    mlp = model.model.layers[1].mlp
    inputs = []
    handle = mlp.register_forward_pre_hook(lambda module, args: inputs.append(args[0].detach()))
    sets = find_groups(model, "mlp")
    scores = score_groups(model, sets, get_criterion("wanda_sp"), calib_ids, seed=0, batch_size=4)
    handle.remove()
    x = torch.cat([i.reshape(-1, i.shape[-1]) for i in inputs])
    with torch.no_grad():
        a = torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x)
        expected = (mlp.down_proj.weight.abs() * a.square().sum(0).sqrt()).sum(0)
    torch.testing.assert_close(scores.per_set[1], expected, rtol=1e-4, atol=1e-6)


def test_wanda_sp_needs_no_gradient(calib_ids):
    model = tiny_model("llama")
    pruned, report = prune(model, method="wanda_sp", ratio=0.3, calib=calib_ids)
    assert all(p.grad is None for p in pruned.parameters())
    assert report.calibration["samples"] == len(calib_ids)


def test_flap_scores_standardised_weighted_input_variance(calib_ids):
    """FLAP's MLP scores from an independent computation: each layer's channel activations captured at down_proj,
    their unbiased variance over tokens times the squared down_proj column norms, standardised over all layers."""
    from hywia.calibrate import score_groups
    from hywia.importance import get_criterion

    model = tiny_model("llama")
    captured = {}
    handles = [block.mlp.down_proj.register_forward_pre_hook(
        lambda m, args, layer=layer: captured.setdefault(layer, []).append(args[0].reshape(-1, args[0].shape[-1])))
        for layer, block in enumerate(model.model.layers)]
    scores = score_groups(model, find_groups(model, "mlp"), get_criterion("flap"), calib_ids, seed=0, batch_size=4)
    for h in handles:
        h.remove()
    raw = torch.stack([torch.cat(captured[layer]).double().var(0) * block.mlp.down_proj.weight.detach().double().square().sum(0)
                       for layer, block in enumerate(model.model.layers)])
    expected = (raw - raw.mean()) / raw.std()
    torch.testing.assert_close(torch.stack(scores.per_set).double(), expected, rtol=1e-4, atol=1e-5)


def test_joint_scope_ranks_kinds_together_by_parameter_cost():
    """With every attention group scored below every MLP channel, joint allocation spends the budget on attention
    groups (3,072 parameters each here) until the next would overshoot, then fills the rest with MLP channels (192)."""
    model = tiny_model()
    sets = find_groups(model, "both")
    scores = [torch.arange(s.count, dtype=torch.float) - (100 if s.kind == "attention" else 0) for s in sets]
    removed = allocate(sets, scores, ratio=0.3, scope="joint")
    budget = 0.3 * sum(s.count * s.params_per_group for s in sets)
    taken = sum(len(r) * s.params_per_group for s, r in zip(sets, removed))
    assert abs(taken - budget) <= 192 / 2
    attention = [r.tolist() for s, r in zip(sets, removed) if s.kind == "attention"]
    mlp = [r.tolist() for s, r in zip(sets, removed) if s.kind == "mlp"]
    assert sum(map(len, attention)) == int(budget // 3072)  # 6 of the 9 removable (each layer keeps one)
    assert attention == [[0, 1], [0, 1], [0, 1]]  # the lowest scores, ties across layers broken by layer order
    assert sum(map(len, mlp)) == round((budget - 6 * 3072) / 192) and all(r == list(range(len(r))) for r in mlp)


def test_flap_picks_joint_scope_and_its_allocation_is_adaptive(calib_ids):
    _, report = prune(tiny_model(), method="flap", ratio=0.3, calib=calib_ids)
    assert report.scope == "joint" and abs(report.achieved_ratio - 0.3) < 0.01
    _, layered = prune(tiny_model(), method="flap", ratio=0.3, calib=calib_ids, scope="layer")
    assert layered.scope == "layer"


@pytest.mark.parametrize("multiple", [8, 16])
def test_round_to_keeps_a_multiple_of_mlp_channels_and_the_best_of_them(multiple, calib_ids):
    dense = tiny_model("llama")
    plain, plain_report = prune(copy.deepcopy(dense), method="element2", ratio=0.3, calib=calib_ids)
    rounded, report = prune(copy.deepcopy(dense), method="element2", ratio=0.3, calib=calib_ids, round_to=multiple)
    for layer in range(3):
        kept, before = report.kept[f"{layer}.mlp"], plain_report.kept[f"{layer}.mlp"]
        assert len(kept) % multiple == 0 and abs(len(kept) - len(before)) <= multiple / 2
        assert set(kept) <= set(before) or set(before) <= set(kept)  # rounding moves along the same ranking
        assert report.kept[f"{layer}.attention"] == plain_report.kept[f"{layer}.attention"]
        assert rounded.model.layers[layer].mlp.down_proj.in_features == len(kept)
    assert report.extra["round_to"] == multiple
    assert (logits(rounded) - logits(masked_reference(dense, report.kept))).abs().max().item() < 1e-4


def test_round_to_must_be_positive(calib_ids):
    with pytest.raises(HywiaError, match="--round-to 0"):
        prune(tiny_model(), method="element2", ratio=0.3, calib=calib_ids, round_to=0)


def test_reused_statistics_give_the_same_pruning(calib_ids):
    from hywia.importance import Stats
    shared = Stats(seed=2)
    _, first = prune(tiny_model(), method="hywia", ratio=0.3, calib=calib_ids, seed=2, stats=shared, fusion="fixed")
    grads = dict(shared.grad)
    _, again = prune(tiny_model(), method="hywia", ratio=0.3, calib=calib_ids, seed=2, stats=shared, fusion="fixed")
    _, element2 = prune(tiny_model(), method="element2", ratio=0.3, calib=calib_ids, seed=2, stats=shared)
    _, fresh = prune(tiny_model(), method="element2", ratio=0.3, calib=calib_ids, seed=2)
    assert all(shared.grad[name] is grads[name] for name in grads)  # collected once
    assert again.kept == first.kept and element2.kept == fresh.kept
    with pytest.raises(HywiaError, match="seed 2 cannot be reused for seed 3"):
        prune(tiny_model(), method="element2", ratio=0.3, calib=calib_ids, seed=3, stats=shared)


def test_a_prune_resumed_at_its_build_makes_the_uninterrupted_prunes_model(calib_ids, tmp_path, monkeypatch):
    """A reconstructing prune keeps its stages before the build (calibration draws, scores, the judged split's
    shares and evidence) in its checkpoint folder; resumed from there, it runs none of them again and builds the same
    weights, with the same recorded recipe and evidence, the earlier stages' costs and the whole prune's seconds.
    A checkpoint is refused for another recipe or other weights, and is neither ignored nor asked for by accident."""
    stages = importlib.import_module("hywia.prune")  # the module: `hywia.prune` names the function
    dense = tiny_model("llama", seed=3)
    folder = tmp_path / "checkpoints"
    whole, first = prune(copy.deepcopy(dense), method="hywia-adaptive", ratio=0.5, calib=calib_ids, checkpoint_dir=folder)
    assert (folder / "split.pt").is_file() and len(first.extra["kind_split_evidence"]["screened"]) == 2  # judged: two walks
    with pytest.raises(HywiaError, match="pass --resume to continue it"):
        prune(copy.deepcopy(dense), method="hywia-adaptive", ratio=0.5, calib=calib_ids, checkpoint_dir=folder)
    with pytest.raises(HywiaError, match="another recipe or from other weights"):
        prune(copy.deepcopy(dense), method="hywia-adaptive", ratio=0.3, calib=calib_ids, checkpoint_dir=folder, resume=True)
    with pytest.raises(HywiaError, match="another recipe or from other weights"):
        prune(tiny_model("llama", seed=4), method="hywia-adaptive", ratio=0.5, calib=calib_ids, checkpoint_dir=folder, resume=True)
    with pytest.raises(HywiaError, match="found no prune checkpoint"):
        prune(copy.deepcopy(dense), method="hywia-adaptive", ratio=0.5, calib=calib_ids, checkpoint_dir=tmp_path / "none", resume=True)

    def never(*args, **kwargs):
        raise AssertionError("a resumed prune ran a stage before its build")
    for stage in ("calibrate", "score", "screen_shares"):
        monkeypatch.setattr(stages, stage, never)
    resumed, again = prune(copy.deepcopy(dense), method="hywia-adaptive", ratio=0.5, calib=calib_ids, checkpoint_dir=folder, resume=True)
    assert resumed.state_dict().keys() == whole.state_dict().keys()
    assert all(torch.equal(p, whole.state_dict()[n]) for n, p in resumed.state_dict().items())
    assert again.recipe == first.recipe and again.recipe.judge_calib == "none"  # token ids: the judge read them alone
    assert again.extra["kind_split_evidence"] == first.extra["kind_split_evidence"] and again.kept == first.kept
    assert {name: first.extra["stages"][name] for name in ("calibrate", "score", "split")} == \
        {name: again.extra["stages"][name] for name in ("calibrate", "score", "split")}
    assert again.extra["resumed"]["from"] == "split" and again.seconds > again.extra["resumed"]["seconds_before"] > 0


def test_a_choose_only_prune_keeps_no_checkpoint(calib_ids, tmp_path):
    """Without reconstruction the build is a removal: nothing worth resuming, so nothing is written."""
    prune(tiny_model(), method="element2", ratio=0.3, calib=calib_ids, checkpoint_dir=tmp_path / "checkpoints")
    assert not (tmp_path / "checkpoints").exists()
