"""HyWIA's fusion: alpha per group in (0, 1), input-dependent, seeded; the fixed ablation's limits; scale handling."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import tiny_model
from hywia import HywiaError, find_groups, prune
from hywia.fusion import AttentionFusion, normalise
from hywia.methods.hywia import fuse
from hywia.importance import collect_stats
from hywia.recipe import Recipe


@pytest.fixture
def stats_and_sets(calib_ids):
    model = tiny_model()
    sets = find_groups(model, "both")
    names = {slot.name for s in sets for slot in s.slots}
    return model, sets, collect_stats(model, calib_ids, names, fisher=True, seed=0)


def test_alpha_shape_range_and_variation():
    x_fine, x_coarse = torch.rand(50, 4) * 3, torch.rand(50, 4) * 3
    alpha = AttentionFusion(4, 64, seed=0).alpha(x_fine, x_coarse)
    assert alpha.shape == (50,)
    assert ((alpha > 0) & (alpha < 1)).all()
    assert alpha.std() > 1e-3  # per-group, not one constant


def test_literal_algorithm_1_would_be_constant():
    """Averaging the row-softmax itself over dim 1 gives 1/n for every group: the reason for docs/method.md."""
    fusion = AttentionFusion(4, 64, seed=0)
    q, k = torch.rand(10, 4) @ fusion.w_q, torch.rand(10, 4) @ fusion.w_k
    literal = torch.softmax(q @ k.T / 8, dim=1).mean(dim=1)
    assert torch.allclose(literal, torch.full((10,), 0.1))


def test_alpha_depends_on_inputs_and_seed():
    x = torch.rand(20, 3)
    a = AttentionFusion(3, 64, seed=1).alpha(x, x.flip(0))
    assert torch.equal(a, AttentionFusion(3, 64, seed=1).alpha(x, x.flip(0)))
    assert not torch.allclose(a, AttentionFusion(3, 64, seed=2).alpha(x, x.flip(0)))
    assert not torch.allclose(a, AttentionFusion(3, 64, seed=1).alpha(x * 2, x.flip(0)))


def test_row_chunking_is_exact(monkeypatch):
    x_fine, x_coarse = torch.rand(40, 3), torch.rand(40, 3)
    whole = AttentionFusion(3, 16, seed=0).alpha(x_fine, x_coarse)
    monkeypatch.setattr("hywia.fusion.ROW_CHUNK", 7)
    assert torch.allclose(whole, AttentionFusion(3, 16, seed=0).alpha(x_fine, x_coarse), atol=1e-6)


@pytest.mark.parametrize("normalize", ["rank", "mean"])
def test_fused_scores_do_not_depend_on_either_granularity_scale(normalize, stats_and_sets):
    _, sets, stats = stats_and_sets
    base = fuse(sets, stats, {"normalize": normalize})
    scaled = copy.deepcopy(stats)
    scaled.fisher = {k: v * 1e6 for k, v in stats.fisher.items()}  # fine scores x 1e6
    scaled.grad = {k: v * 1e-3 for k, v in stats.grad.items()}  # coarse scores x 1e-3
    again = fuse(sets, scaled, {"normalize": normalize})
    for a, b in zip(base.per_set, again.per_set):
        assert torch.allclose(a, b, rtol=1e-4)
    for kind in ("attention", "mlp"):
        for name in ("fine", "coarse"):
            pooled = torch.cat([t for s, t in zip(sets, base.details[name]) if s.kind == kind])
            if normalize == "mean":  # mean 1 over the groups of a kind
                assert pooled.mean().item() == pytest.approx(1.0, rel=1e-5)
            else:  # ranks 1/n .. 1 over the groups of a kind
                assert torch.equal(pooled.sort().values, torch.arange(1, len(pooled) + 1) / len(pooled))


def test_rank_normalisation_lets_neither_granularity_dominate():
    """A heavy-tailed fine score (as Element^2 is) against a flat coarse one: under mean normalisation the coarse
    score decides most of the lowest quarter of the fused ranking; under rank normalisation both decide equally."""
    generator = torch.Generator().manual_seed(0)
    fine, coarse = torch.exp(3 * torch.randn(2000, generator=generator)), torch.rand(2000, generator=generator) + 0.5
    lowest = lambda x: set(torch.argsort(x)[:500].tolist())  # noqa: E731
    shared = {}
    for mode in ("mean", "rank"):
        fused = 0.5 * normalise(fine, mode) + 0.5 * normalise(coarse, mode)
        shared[mode] = [len(lowest(fused) & lowest(x)) / 500 for x in (fine, coarse)]
    assert shared["mean"][1] > shared["mean"][0] + 0.4
    assert abs(shared["rank"][0] - shared["rank"][1]) < 0.1


def test_alpha_is_reproducible_for_a_seed_and_varies_across_groups(stats_and_sets):
    _, sets, stats = stats_and_sets
    a = torch.cat(fuse(sets, stats, {}).details["alpha"])
    b = torch.cat(fuse(sets, stats, {}).details["alpha"])
    stats.seed = 1
    c = torch.cat(fuse(sets, stats, {}).details["alpha"])
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.std() > 1e-4 and ((a > 0) & (a < 1)).all()


@pytest.mark.parametrize("alpha, baseline", [(1.0, "element2"), (0.0, "vector")])
def test_fixed_alpha_limits_equal_single_granularity_rankings(alpha, baseline, calib_ids):
    for scope in ("layer", "global"):
        _, fused = prune(tiny_model(), method="hywia", ratio=0.4, calib=calib_ids, scope=scope, fusion="fixed", alpha=alpha)
        _, single = prune(tiny_model(), method=baseline, ratio=0.4, calib=calib_ids, scope=scope)
        assert fused.kept == single.kept


def test_attention_fusion_differs_from_fixed_half(calib_ids):
    _, adaptive = prune(tiny_model(), method="hywia", ratio=0.4, calib=calib_ids)
    alphas = torch.cat(list(adaptive.scores["alpha"].values()))
    assert alphas.std() > 0
    assert set(adaptive.scores) == {"fine", "coarse", "alpha", "fused"}


@pytest.mark.parametrize("options, message", [
    ({"alpha": 0.3}, "--fusion fixed"),
    ({"fusion": "fixed", "alpha": 1.5}, "out of range"),
    ({"fusion": "mean"}, "unknown fusion"),
    ({"normalize": "max"}, "unknown --normalize"),
])
def test_bad_fusion_options(options, message, calib_ids):
    with pytest.raises(HywiaError, match=message):  # refused before a model is even loaded
        Recipe(method="hywia", ratio=0.3, scope="layer", **options).check()
    with pytest.raises(HywiaError, match=message):
        prune(tiny_model(), method="hywia", ratio=0.3, calib=calib_ids, **options)


def test_fusion_options_refused_for_other_methods(calib_ids):
    with pytest.raises(HywiaError, match="--alpha does not apply to --method element2"):
        prune(tiny_model(), method="element2", ratio=0.3, calib=calib_ids, alpha=0.5)


def _mlp_set_and_moments(calib_ids):
    from hywia.importance import collect_inputs
    model = tiny_model()
    s = find_groups(model, "mlp")[1]
    reader = s.reader.name
    return s, collect_inputs(model, calib_ids, {reader}, outer=True)[reader]


def test_output_error_is_the_measured_error_of_dropping_columns(calib_ids):
    from hywia.methods.hywia import output_error
    s, moments = _mlp_set_and_moments(calib_ids)
    gone = torch.tensor([3, 7, 20])
    down = s.reader.module
    # measure it directly: the down_proj output with and without those input columns, over the calibration tokens
    x = torch.randn(500, down.in_features, dtype=torch.float64) + 0.3
    direct = (x[:, gone] @ down.weight.detach().double()[:, gone].T).square().sum(1).mean().item()
    empirical = type(moments)(outer=True)
    empirical.add(x)
    assert output_error(s, gone, empirical, centred=False) == pytest.approx(direct, rel=1e-9)
    assert output_error(s, gone, moments, centred=True) < output_error(s, gone, moments, centred=False)


@pytest.mark.parametrize("right", ["fine", "coarse"])
def test_evidence_alpha_follows_the_granularity_that_predicts_the_error(right, calib_ids):
    from hywia.methods.hywia import evidence_alpha, output_error
    s, moments = _mlp_set_and_moments(calib_ids)
    truth = torch.tensor([output_error(s, torch.tensor([g]), moments, centred=False) for g in range(s.count)], dtype=torch.float32)
    good, bad = normalise(truth, "rank"), normalise(-truth, "rank")
    fine, coarse = (good, bad) if right == "fine" else (bad, good)
    alpha = evidence_alpha(s, fine, coarse, moments, 0.3, centred=False)
    assert alpha > 0.5 if right == "fine" else alpha < 0.5  # (0.75 and 1 may cut the same set: the tie goes nearer 0.5)


@pytest.mark.parametrize("unit", ["kv", "query"])
def test_evidence_fusion_prunes_to_the_masked_dense_model(unit, calib_ids):
    from hywia.methods.hywia import ALPHAS
    from test_prune import logits, masked_reference
    dense = tiny_model()
    pruned, report = prune(copy.deepcopy(dense), method="hywia", ratio=0.4, calib=calib_ids, fusion="evidence", attention_unit=unit)
    for alpha in report.scores["alpha"].values():  # one alpha per layer and kind, from the candidates
        assert len(set(alpha.tolist())) == 1 and alpha[0].item() in ALPHAS
    assert report.calibration["heldout_seed"] != report.seed
    assert (logits(pruned) - logits(masked_reference(dense, report.kept, unit))).abs().max().item() < 1e-4
