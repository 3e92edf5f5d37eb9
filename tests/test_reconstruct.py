"""Reconstruction (hywia.reconstruct) and SlimGPT (methods/slimgpt.py): the refit is the closed-form least-squares
optimum and beats removal alone and bias compensation on correlated inputs; OBS group errors are what removing the
group and refitting costs; the greedy OBS updates end at the refit; SlimGPT's layer ratios average the request;
a pruned and reconstructed tiny model of every family reloads in a fresh process with identical logits."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import FAMILIES, OTHER_FAMILIES, tiny_model
from hywia import HywiaError, find_groups, prune
from hywia.methods.slimgpt import incremental_ratios
from hywia.importance import Moments
from hywia.reconstruct import (_refit_reader, damped_inverse, dampened, group_errors, kept_columns, obs_refit, obs_remove,
                               obs_select, output_error, refit)
from test_io import assert_reloads_and_generates


def correlated_layer(out: int = 12, features: int = 20, tokens: int = 400, seed: int = 0):
    """W [out, features] and inputs X [features, tokens] whose features share a few latent factors and have means."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(5, tokens, generator=g, dtype=torch.float64)
    mix = torch.randn(features, 5, generator=g, dtype=torch.float64)
    x = mix @ latent + 0.3 * torch.randn(features, tokens, generator=g, dtype=torch.float64) + torch.randn(features, 1, generator=g, dtype=torch.float64)
    return torch.randn(out, features, generator=g, dtype=torch.float64), x


def direct_error(w, x, w_kept, keep, shift=None):
    approx = w_kept @ x[keep] + (0 if shift is None else shift[:, None])
    return (w @ x - approx).square().sum().item()


def test_refit_is_the_least_squares_optimum_and_beats_removal_and_compensation():
    w, x = correlated_layer()
    keep = torch.arange(20)[torch.arange(20) % 3 != 0]
    gone = torch.arange(20)[torch.arange(20) % 3 == 0]
    h = x @ x.T
    removal = direct_error(w, x, w[:, keep], keep)
    compensation = direct_error(w, x, w[:, keep], keep, w[:, gone] @ x[gone].mean(1))
    new, none = refit(w, h, keep, damp=0)
    assert none is None
    optimum = torch.linalg.lstsq(x[keep].T, (w @ x).T).solution.T
    torch.testing.assert_close(new, optimum, rtol=1e-8, atol=1e-8)
    new_b, shift = refit(w, h, keep, x.sum(1), x.shape[1], damp=0)
    design = torch.cat([x[keep], torch.ones(1, x.shape[1], dtype=torch.float64)])
    optimum_b = torch.linalg.lstsq(design.T, (w @ x).T).solution.T
    torch.testing.assert_close(torch.cat([new_b, shift[:, None]], 1), optimum_b, rtol=1e-8, atol=1e-8)
    least, least_b = direct_error(w, x, new, keep), direct_error(w, x, new_b, keep, shift)
    assert least_b <= least < removal and least_b < compensation < removal, (least_b, least, compensation, removal)
    # the error the report gives is read off H alone
    placed = torch.zeros_like(w)
    placed[:, keep] = new_b
    assert output_error(w, h, placed, shift, x.sum(1), x.shape[1]) == pytest.approx(least_b, rel=1e-6)


def test_dampening_pulls_the_refit_towards_removal_alone():
    w, x = correlated_layer()
    keep = torch.arange(14)
    h = x @ x.T
    errors = [direct_error(w, x, refit(w, h, keep, damp=d)[0], keep) for d in (0, 0.01, 1, 1e6)]
    assert errors == sorted(errors)
    assert errors[-1] == pytest.approx(direct_error(w, x, w[:, keep], keep), rel=1e-3)


@pytest.mark.parametrize("damp", [0.01, 1e-6])
def test_the_refit_from_the_inverse_is_the_solved_refit_with_and_without_an_intercept(damp):
    """`obs_refit` (the OBS update from the dampened inverse a selection made) and `refit` (the solve on the kept
    columns) are one matrix; with an intercept the bias shift too, also where a feature is nearly constant (the
    constant feature then nearly lies in X's span, the hard case for the block inverse)."""
    w, x = correlated_layer(features=24, tokens=400)
    x[5] = 3 + 1e-3 * x[5]
    h = x @ x.T
    inverse = damped_inverse(h, damp)
    for keep in (torch.arange(24)[torch.arange(24) % 4 != 1], torch.arange(1, 24), torch.arange(24)):
        solved, none = refit(w, h, keep, damp=damp)
        from_inverse, also_none = obs_refit(w, inverse, keep)
        assert none is None and also_none is None
        torch.testing.assert_close(from_inverse, solved, rtol=1e-7, atol=1e-9)
        solved_b, shift = refit(w, h, keep, x.sum(1), x.shape[1], damp=damp)
        from_inverse_b, shift_b = obs_refit(w, inverse, keep, x.sum(1), x.shape[1])
        torch.testing.assert_close(torch.cat([from_inverse_b, shift_b[:, None]], 1), torch.cat([solved_b, shift[:, None]], 1),
                                   rtol=1e-7, atol=1e-7)


def test_obs_group_error_is_the_cost_of_removing_the_group_and_refitting():
    w, x = correlated_layer(features=24)
    h = x @ x.T
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(dampened(h)))
    columns = torch.arange(24).view(6, 4)  # six "heads" of four columns
    errors = group_errors(w, inverse, columns)
    hd = dampened(h)
    for g in range(6):
        keep = torch.tensor([c for c in range(24) if c // 4 != g])
        new, _ = refit(w, h, keep)
        placed = torch.zeros_like(w)
        placed[:, keep] = new
        # the dampened objective: output error on H + lambda I
        assert errors[g].item() == pytest.approx(output_error(w, hd, placed), rel=1e-6)


def test_greedy_obs_updates_end_at_the_refit_of_what_they_removed():
    w, x = correlated_layer(features=24)
    h = x @ x.T
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(dampened(h)))
    updated, live = w.clone(), torch.arange(24)  # live: the original column of each of updated's columns
    for batch in (torch.tensor([3, 7, 11]), torch.tensor([0]), torch.tensor([20, 21])):
        dropped = torch.isin(live, batch)
        updated, inverse = obs_remove(updated, inverse, dropped.nonzero().flatten(), (~dropped).nonzero().flatten())
        live = live[~dropped]
    keep = torch.tensor([c for c in range(24) if c not in (0, 3, 7, 11, 20, 21)])
    assert torch.equal(live, keep) and inverse.shape == (18, 18)
    torch.testing.assert_close(updated, refit(w, h, keep)[0], rtol=1e-7, atol=1e-9)
    # the carried block is the inverse of the kept columns' dampened Hessian: what a fresh start would use
    full = dampened(h)
    torch.testing.assert_close(inverse, torch.linalg.inv(full[keep][:, keep]), rtol=1e-6, atol=1e-9)


def test_slimgpt_removes_a_duplicated_channel_before_a_cheap_looking_one():
    """Channel 0 is a copy of channel 1 (the refit moves its weight over at no cost); channel 2 has the smallest
    weights. Removal by magnitude would take 2; OBS takes 0 or 1 (with little dampening: SparseGPT's 1% of the mean
    diagonal would charge the duplicate for the ridge it adds)."""
    model = tiny_model("llama", layers=1)
    s = next(s for s in find_groups(model, "mlp"))
    weight = s.reader.module.weight.data.double()
    weight[:, 2] *= 0.05
    _, x = correlated_layer(features=weight.shape[1], tokens=600)
    x[0] = x[1]
    assert set(obs_select(s, weight, damped_inverse(x @ x.T, 1e-8), 1).tolist()) <= {0, 1}


def test_balanced_selection_takes_the_same_number_from_every_kv_group():
    model = tiny_model("llama", layers=1)
    s = next(s for s in find_groups(model, "both", attention_unit="query") if s.kind == "query")
    _, x = correlated_layer(features=s.reader.module.in_features, tokens=600)
    gone = obs_select(s, s.reader.module.weight.data, damped_inverse(x @ x.T), 4)  # 8 query heads over 4 KV groups: one from each
    assert sorted((gone // 2).tolist()) == [0, 1, 2, 3]


@pytest.mark.parametrize("ratio", [0.2, 0.5, 0.8])
def test_incremental_ratios_rise_with_depth_and_average_the_request(ratio):
    ratios = incremental_ratios(list(range(30)), ratio)
    values = list(ratios.values())
    assert values == sorted(values) and values[0] < values[-1]
    assert sum(values) / 30 == pytest.approx(ratio)
    assert values[-1] <= (1 + ratio) / 2 + 1e-12
    assert values[0] == (0 if ratio < 0.5 else pytest.approx(values[0]))
    assert incremental_ratios([4], ratio) == {4: ratio}


def test_reconstruction_lowers_every_readers_calibration_error(calib_ids):
    for kwargs in ({"method": "element2", "reconstruct": True}, {"method": "l2", "reconstruct": True, "compensate": True},
                   {"method": "slimgpt"}):
        _, report = prune(tiny_model("qwen2"), ratio=0.3, calib=calib_ids, **kwargs)
        errors = [e for layer in report.extra["reconstruction_error"].values() for e in layer.values()]
        assert errors and all(e["refit"] < e["removed"] for e in errors), errors
        assert report.extra["reconstruct"] is True


@pytest.mark.parametrize("intercept", [False, True])
def test_a_refit_readers_reported_errors_are_its_output_errors_on_the_inputs(intercept):
    """`_refit_reader` reads both errors off the moments (removal alone from the removed columns' block of H); they
    equal the squared output errors computed on the inputs themselves, relative to the dense output's."""
    model = tiny_model("llama").double()
    s = next(s for s in find_groups(model) if s.kind == "mlp")
    weight = s.reader.module.weight.data
    x = torch.randn(300, weight.shape[1], generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.5
    m = Moments(count=len(x), total=x.sum(0), cross=x.T @ x)
    removed = torch.tensor([1, 5, 6, 30])
    original, keep = weight.clone(), kept_columns(s, removed, weight.shape[1])
    dense = x @ original.T
    errors, shift = _refit_reader(s, removed, m, intercept, damp=0.01)
    removal_alone = x[:, keep] @ original[:, keep].T
    refit_out = x[:, keep] @ weight[:, keep].T + (0 if shift is None else shift)  # weight: refit in place
    scale = dense.square().sum()
    assert errors["removed"] == pytest.approx(((dense - removal_alone).square().sum() / scale).item(), rel=1e-9)
    assert errors["refit"] == pytest.approx(((dense - refit_out).square().sum() / scale).item(), rel=1e-9)
    assert errors["refit"] < errors["removed"]
    assert (shift is not None) == intercept


def test_obs_selection_keeps_the_criterions_counts_and_chooses_what_refits_best(calib_ids):
    """`--reconstruct obs`: every set loses as many groups as the criterion's allocation says, but which ones OBS
    chooses; in the first layer (both runs see the dense model's inputs there) its choice refits to a lower error."""
    _, scored = prune(tiny_model("qwen2"), method="element2", ratio=0.3, calib=calib_ids, reconstruct=True)
    _, chosen = prune(tiny_model("qwen2"), method="element2", ratio=0.3, calib=calib_ids, reconstruct="obs")
    assert {k: len(v) for k, v in chosen.kept.items()} == {k: len(v) for k, v in scored.kept.items()}
    assert chosen.kept != scored.kept and chosen.extra["reconstruct"] == "obs"
    first = [run.extra["reconstruction_error"][0] for run in (chosen, scored)]
    assert sum(e["refit"] for e in first[0].values()) < sum(e["refit"] for e in first[1].values())


def test_slimgpt_meets_the_ratio_with_layer_ratios_rising(calib_ids):
    model, report = prune(tiny_model("llama", layers=6), method="slimgpt", ratio=0.3, calib=calib_ids)
    assert abs(report.achieved_ratio - 0.3) < 0.05
    kept = [sum(p["params_after"] for p in report.per_layer if p["layer"] == layer) for layer in range(6)]
    assert kept[0] >= kept[-1] and kept[0] == max(kept)


def test_slimgpt_refuses_to_run_without_its_reconstruction(calib_ids):
    with pytest.raises(HywiaError, match="--reconstruct no"):
        prune(tiny_model(), method="slimgpt", ratio=0.3, calib=calib_ids, reconstruct=False)


@pytest.mark.parametrize("family", [*FAMILIES, *OTHER_FAMILIES])
def test_reconstructed_model_of_every_family_reloads_in_a_fresh_process(family, tmp_path, tokenizer, calib_ids):
    dense = tiny_model(family)
    model, report = prune(copy.deepcopy(dense), method="slimgpt", ratio=0.4, calib=calib_ids)
    assert report.params_after < report.params_before
    assert_reloads_and_generates(model, tokenizer, tmp_path)


def test_reconstruction_with_compensation_adds_biases_that_reload(tmp_path, tokenizer, calib_ids):
    model, _ = prune(tiny_model("mistral"), method="element2", ratio=0.4, calib=calib_ids, reconstruct=True, compensate=True)
    assert model.model.layers[0].mlp.down_proj.bias is not None
    assert_reloads_and_generates(model, tokenizer, tmp_path)


def test_prefix_select_answers_each_count_from_one_run(monkeypatch):
    """The evidence screen's selection: one greedy run per set to the largest count asked so far. Heads (one step at a
    time) get exactly their own greedy selection; channels a subset of the longer run's, of the asked size; a larger
    count than any asked before runs again."""
    import hywia.reconstruct as reconstruct
    runs = []
    order = reconstruct.obs_order
    monkeypatch.setattr(reconstruct, "obs_order", lambda *a, **k: runs.append(a[3]) or order(*a, **k))
    model = tiny_model("llama", layers=1)
    for kind, counts in (("attention", [3, 1, 2]), ("mlp", [30, 9, 17, 30])):  # four KV groups, one at a time; 48 channels
        s = next(s for s in find_groups(model, "both") if s.kind == kind)
        weight = s.reader.module.weight.data
        _, x = correlated_layer(features=s.reader.module.in_features, tokens=600, seed=3)
        h = damped_inverse((x @ x.T).float())
        select, made = reconstruct.PrefixSelect(), []
        answers = []
        for count in counts:
            before = len(runs)
            answers.append(select(s, weight, h, count))
            made += runs[before:]
        assert made == [counts[0]]  # the first request was the largest: one run answered them all
        for count, got in zip(counts, answers):
            assert len(got) == count and got.tolist() == sorted(set(got.tolist()))
            assert set(got.tolist()) <= set(answers[0].tolist())
            if kind == "attention":  # a shorter greedy run of heads is the longer one's beginning
                assert torch.equal(got, obs_select(s, weight, h, count))
        assert torch.equal(answers[0], obs_select(s, weight, h, counts[0]))
    before = len(runs)
    assert select(s, weight, h, 40).tolist() == obs_select(s, weight, h, 40).tolist() and runs[before] == 40  # more: runs again
