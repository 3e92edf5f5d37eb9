"""Models larger than one device: the memory options change how statistics are gathered, not what they
are. Gradient sweeps over a few layers, a bfloat16 store, activation checkpointing and the sequential forward walk
each give the scores of the one-pass run; accelerate's device maps load and prune (on CPU here: CI has no GPU)."""
from __future__ import annotations

import copy
import gc
import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import FAMILIES, OTHER_FAMILIES, tiny_model
from hywia import HywiaError, load_model, prune, save_model
from hywia.importance import Memory, Stats, collect_inputs, get_criterion, taylor_sums
from hywia.grouping import find_groups
from hywia.calibrate import calibration_stats
from hywia.costs import file_backed_ranges, mapped, own_weights, trim_heap
from test_cli import run


def grads(model, calib_ids, memory: Memory, method: str = "element2") -> Stats:
    sets = find_groups(model)
    return calibration_stats(model, sets, get_criterion(method), calib_ids, 0, 2, memory=memory)


@pytest.mark.parametrize("memory", [Memory(layers_per_pass=1), Memory(layers_per_pass=2, checkpointing=True),
                                    Memory(checkpointing=True)])
def test_gradient_sweeps_and_checkpointing_give_the_one_pass_statistics(memory, calib_ids, monkeypatch):
    module = sys.modules["hywia.calibrate"]
    model = tiny_model("qwen2")
    one = grads(model, calib_ids, Memory())
    sweeps, recomputed = [], []
    collect = module.collect_stats
    monkeypatch.setattr(module, "collect_stats", lambda *a, **k: sweeps.append(len(a[2])) or collect(*a, **k))
    checkpoint = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: recomputed.append(1) or checkpoint(*a, **k))
    other = grads(model, calib_ids, memory)
    layers = memory.layers_per_pass or 3
    assert len(sweeps) == -(-3 // layers) and sum(sweeps) == len(one.grad)  # each sweep its own layers' weights
    assert bool(recomputed) == memory.checkpointing
    assert set(one.grad) == set(other.grad) and set(one.fisher) == set(other.fisher)
    for name in one.grad:
        torch.testing.assert_close(other.grad[name], one.grad[name], rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(other.fisher[name], one.fisher[name], rtol=1e-5, atol=1e-10)


@pytest.mark.parametrize("method", ["element2", "hywia", "vector"])
def test_memory_options_prune_the_same_groups(method, calib_ids):
    dense = tiny_model("llama")
    _, plain = prune(copy.deepcopy(dense), method=method, ratio=0.3, calib=calib_ids)
    _, lean = prune(copy.deepcopy(dense), method=method, ratio=0.3, calib=calib_ids,
                    memory=Memory(layers_per_pass=1, checkpointing=True, store_device="cpu"))
    assert lean.kept == plain.kept
    assert lean.extra["memory"]["layers_per_pass"] == 1


@pytest.mark.parametrize("family", ["qwen2", "phi3", "bloom"])  # separate q/k/v, fused qkv and gate_up, fused per-head qkv
@pytest.mark.parametrize("method, options", [("element2", {}), ("vector", {}), ("hywia", {}),
                                             ("hywia-adaptive", {"reconstruct": False, "kind_split": "ratio"})])
def test_per_group_totals_give_the_per_weight_stores_scores(family, method, options, calib_ids):
    """--stats-store groups sums w*g and w^2*F per group as each gradient arrives, keeping no per-weight store: the
    same scores to float rounding, in one pass and in sweeps, and the same groups removed."""
    dense = tiny_model(family)
    sets = find_groups(dense)
    criterion = get_criterion(method)
    weights = calibration_stats(dense, sets, criterion, calib_ids, 0, 2)
    for memory in (Memory(store="groups"), Memory(store="groups", layers_per_pass=2)):
        groups = calibration_stats(dense, sets, criterion, calib_ids, 0, 2, memory=memory)
        assert not groups.grad and not groups.fisher and groups.group_sums
        assert sum(t.numel() for t in groups.group_sums.values()) < sum(t.numel() for t in weights.grad.values()) / 4
        for order in (1, 2) if criterion.needs_fisher else (1,):
            for s in sets:
                torch.testing.assert_close(taylor_sums(s, groups, order), taylor_sums(s, weights, order), rtol=1e-5, atol=1e-9)
    _, plain = prune(copy.deepcopy(dense), method=method, ratio=0.3, calib=calib_ids, stats_store="weights", **options)
    _, lean = prune(copy.deepcopy(dense), method=method, ratio=0.3, calib=calib_ids, memory=Memory(store="groups"), **options)
    assert lean.kept == plain.kept and lean.extra["memory"]["store"] == "groups"
    assert lean.extra["stats_mb"] < plain.extra["stats_mb"] / 4


@pytest.mark.parametrize("method, memory, message", [
    ("element1", Memory(store="groups"), "--stats-store groups .* --method element1 reads per-weight statistics"),
    ("saap", Memory(store="groups"), "--method saap reads per-weight statistics"),
    ("element2", Memory(store="groups", store_dtype="bfloat16"), "--stats-dtype .* leave --stats-dtype out"),
    ("element2", Memory(store="heads"), "unknown --stats-store 'heads'")])
def test_per_group_totals_are_refused_where_they_cannot_serve(method, memory, message):
    with pytest.raises(HywiaError, match=message):
        prune(tiny_model(), method=method, ratio=0.2, memory=memory)


@pytest.mark.parametrize("method, options, store", [
    ("hywia-adaptive", {"reconstruct_samples": 4}, "groups"),  # the default sums per group: no per-weight store
    ("hywia-adaptive", {"reconstruct_samples": 4, "stats_dtype": "bfloat16"}, "weights"),  # a dtype for the per-weight store
    ("hywia-adaptive", {"reconstruct_samples": 4, "stats_store": "weights"}, "weights"),
    ("element2", {}, "weights"), ("hywia", {}, "weights"), ("slimgpt", {"reconstruct_samples": 4}, "weights")])
def test_the_default_method_keeps_per_group_totals_and_the_others_the_per_weight_store(method, options, store, calib_ids,
                                                                                     monkeypatch):
    module, seen = sys.modules["hywia.calibrate"], []
    real = module.collect_stats

    def spy(*args, memory, **kwargs):
        seen.append(memory.store)
        return real(*args, memory=memory, **kwargs)

    monkeypatch.setattr(module, "collect_stats", spy)
    _, report = prune(tiny_model(), method=method, ratio=0.3, calib=calib_ids, **options)
    assert report.recipe.stats_store == store and report.extra["memory"]["store"] == store
    assert seen == ([] if method == "slimgpt" else [store])  # what the gradient passes were given


def test_bfloat16_store_halves_the_buffers_and_reads_back_float32(calib_ids):
    model = tiny_model()
    full, half = grads(model, calib_ids, Memory()), grads(model, calib_ids, Memory(store_dtype="bfloat16"))
    name = next(iter(full.fisher))
    assert dict.__getitem__(half.fisher, name).dtype == torch.bfloat16
    assert half.fisher[name].dtype == torch.float32  # what criteria see
    torch.testing.assert_close(half.fisher[name], full.fisher[name], rtol=1e-2, atol=1e-12)


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "bloom", "opt"])
def test_sequential_walk_gives_the_one_pass_input_moments(family, calib_ids):
    """Gemma 3 gives its local and global layers different masks, BLOOM gives every layer ALiBi: the walk replays
    each layer's own arguments."""
    model = tiny_model(family)
    readers = {s.reader.name for s in find_groups(model)}
    one = collect_inputs(model, calib_ids, readers, batch_size=2)
    layers = model.get_submodule({"opt": "model.decoder.layers", "bloom": "transformer.h"}.get(family, "model.layers"))
    runs = []
    handle = layers[1].register_forward_hook(lambda *args: runs.append(1))
    walked = collect_inputs(model, calib_ids, readers, batch_size=2, sequential=True)
    handle.remove()
    assert len(runs) == 1 + 3  # the capture pass runs layer 1 for the first batch of 2 only, the walk once per batch
    for name in readers:
        assert walked[name].count == one[name].count
        torch.testing.assert_close(walked[name].total, one[name].total, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(walked[name].squares, one[name].squares, rtol=1e-6, atol=1e-6)


def test_sequential_flap_prunes_the_same_model(calib_ids):
    dense = tiny_model("qwen3")
    plain, a = prune(copy.deepcopy(dense), method="flap", ratio=0.3, calib=calib_ids)
    walked, b = prune(copy.deepcopy(dense), method="flap", ratio=0.3, calib=calib_ids, memory=Memory(sequential=True, device="cpu"))
    assert a.kept == b.kept
    ids = calib_ids[:2]
    with torch.no_grad():
        torch.testing.assert_close(walked(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_saap_refuses_layer_sweeps(calib_ids):
    with pytest.raises(HywiaError, match="--layers-per-pass.*SAAP"):
        prune(tiny_model(), method="saap", ratio=0.2, calib=calib_ids, memory=Memory(layers_per_pass=1))


@pytest.mark.parametrize("memory, message", [(Memory(layers_per_pass=0), "--layers-per-pass 0"),
                                             (Memory(store_dtype="int8"), "--stats-dtype 'int8'")])
def test_bad_memory_options_are_one_line_errors(memory, message):
    with pytest.raises(HywiaError, match=message):
        prune(tiny_model(), method="element2", ratio=0.2, memory=memory)


def test_accelerate_device_map_loads_and_prunes(tmp_path, tokenizer, calib_ids):
    out = save_model(tiny_model(), tokenizer, tmp_path / "dense", {})
    model, _ = load_model(str(out), device="auto")
    assert set(getattr(model, "hf_device_map", {"": "cpu"}).values()) <= {"cpu", 0, 1, 2, 3, 4, 5, 6, 7}
    pruned, report = prune(model, method="element2", ratio=0.3, calib=calib_ids)
    assert report.params_after < report.params_before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_a_prune_owns_the_weights_a_checkpoint_mapped_and_prunes_what_it_would_in_memory(tmp_path, tokenizer, calib_ids):
    dense = tiny_model("llama")
    dense.config.tie_word_embeddings = True
    dense.lm_head.weight = dense.model.embed_tokens.weight
    out = save_model(dense, tokenizer, tmp_path / "dense", {})
    model, _ = load_model(str(out))
    ranges = file_backed_ranges()
    assert sum(mapped(p, ranges) for p in model.parameters()) > 0  # transformers maps safetensors
    values = {name: p.detach().clone() for name, p in model.named_parameters()}
    assert own_weights(model) > 0
    ranges = file_backed_ranges()
    assert not any(mapped(t, ranges) for t in [*model.parameters(), *model.buffers()])
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, values[name], rtol=0, atol=0)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert own_weights(model) == 0

    shared, _ = load_model(str(out))  # two Parameters viewing the same mapped memory get one copy between them
    shared.lm_head.weight = torch.nn.Parameter(shared.model.embed_tokens.weight.data)
    own_weights(shared)
    assert shared.lm_head.weight.data_ptr() == shared.model.embed_tokens.weight.data_ptr()
    assert not mapped(shared.lm_head.weight, file_backed_ranges())

    mapped_model, _ = load_model(str(out))  # prune() owns them itself
    pruned, report = prune(mapped_model, method="element2", ratio=0.3, calib=calib_ids)
    _, reference = prune(model, method="element2", ratio=0.3, calib=calib_ids)
    assert report.kept == reference.kept
    for (name, a), (_, b) in zip(pruned.state_dict().items(), model.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_cli_memory_flags_reach_the_recipe(tmp_path, tokenizer, text_dir, capsys):
    dense = save_model(tiny_model(), tokenizer, tmp_path / "dense", {})
    code, _, err = run(capsys, "prune", "--model", str(dense), "--method", "element2", "--ratio", "0.3", "--samples", "4",
                       "--seq-len", "16", "--layers-per-pass", "2", "--stats-dtype", "bfloat16", "--checkpointing",
                       "--data-dir", str(text_dir), "--out", str(tmp_path / "p"))
    assert code == 0, err
    memory = json.loads((tmp_path / "p" / "hywia.json").read_text())["extra"]["memory"]
    assert memory["layers_per_pass"] == 2 and memory["store_dtype"] == "bfloat16" and memory["checkpointing"] is True
    code, _, err = run(capsys, "prune", "--model", str(dense), "--method", "element2", "--ratio", "0.3", "--samples", "4",
                       "--seq-len", "16", "--stats-store", "groups", "--data-dir", str(text_dir), "--out", str(tmp_path / "g"))
    assert code == 0, err
    record = json.loads((tmp_path / "g" / "hywia.json").read_text())
    assert record["extra"]["memory"]["store"] == "groups" and record["recipe"]["stats_store"] == "groups"
    code, _, err = run(capsys, "prune", "--model", str(dense), "--method", "sparsegpt", "--sparsity", "0.5",
                       "--layers-per-pass", "2", "--out", str(tmp_path / "q"))
    assert code != 0 and "--layers-per-pass does not apply to --method sparsegpt" in err


def test_offloaded_weights_are_refused_with_the_fix():
    model = tiny_model()
    model.model.layers[1].mlp.up_proj.to("meta")
    with pytest.raises(HywiaError, match="offloaded.*--device auto"):
        prune(model, method="l2", ratio=0.2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (run there whenever one is lent)")
def test_gpu_prunes_the_groups_the_cpu_prunes(calib_ids):
    dense = tiny_model("qwen2")
    _, on_cpu = prune(copy.deepcopy(dense), method="element2", ratio=0.3, calib=calib_ids)
    _, on_gpu = prune(copy.deepcopy(dense).cuda(), method="element2", ratio=0.3, calib=calib_ids,
                      memory=Memory(layers_per_pass=1, store_device="cpu", store_dtype="bfloat16", checkpointing=True))
    overlap = sum(len(set(on_cpu.kept[k]) & set(on_gpu.kept[k])) for k in on_cpu.kept) / sum(len(v) for v in on_cpu.kept.values())
    assert overlap > 0.95  # bfloat16 storage and GPU arithmetic may swap near-ties


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_device_map_over_two_gpus_prunes_and_runs(tmp_path, tokenizer, calib_ids):
    out = save_model(tiny_model(), tokenizer, tmp_path / "dense", {})
    model, _ = load_model(str(out), device="balanced")
    assert len({d for d in model.hf_device_map.values()}) >= 2
    pruned, _ = prune(model, method="element2", ratio=0.3, calib=calib_ids)
    with torch.no_grad():
        assert torch.isfinite(pruned(input_ids=calib_ids[:1].to(pruned.device)).logits).all()


def test_spilled_second_moments_equal_the_ones_kept_in_memory(calib_ids, tmp_path):
    """Full input second moments (the evidence fusion's held-out draw, the refit screen's readers) grow as layers x
    width^2; spilled, each layer's go to disk as the walk leaves it, and read back they are the same numbers."""
    from hywia.reconstruct import dampened, reader_inverses
    model = tiny_model("llama")
    readers = {s.reader.name for s in find_groups(model)}
    kept = collect_inputs(model, calib_ids, readers, 2, outer=True)
    spilled = collect_inputs(model, calib_ids, readers, 2, outer=True, spill=tmp_path)
    assert all(isinstance(m.cross, type(tmp_path)) for m in spilled.values()) and len(list(tmp_path.iterdir())) == len(readers)
    for name in readers:
        assert torch.allclose(spilled[name].full(), kept[name].cross, rtol=1e-12)
        assert torch.allclose(spilled[name].full(), kept[name].full(), rtol=1e-12)
    sets = find_groups(model)
    (tmp_path / "walk").mkdir()
    walked = reader_inverses(model, sets, calib_ids, 2, spill=tmp_path / "walk")
    in_memory = reader_inverses(model, sets, calib_ids, 2)
    assert all(torch.equal(walked[n].full(), in_memory[n].matrix) for n in readers)
    for n in readers:  # the inverse of the same dampened moments (summed from float32 products: to 1e-4)
        identity = torch.eye(len(kept[n].cross), dtype=torch.float64)
        assert (in_memory[n].full() @ dampened(kept[n].cross) - identity).abs().max() < 1e-3
    for inverse in walked.values():
        inverse.discard()
    assert not list((tmp_path / "walk").iterdir())
    stats = Stats()
    folder = stats.spill
    assert folder.is_dir()
    del stats
    import gc
    gc.collect()
    assert not folder.exists()  # the folder goes with the statistics that own it


def test_a_killed_prunes_scratch_folder_is_removed_by_the_next(tmp_path, monkeypatch):
    """Spill folders carry their process id; a new one removes those of processes that are gone, not the living's."""
    import os
    import subprocess
    import tempfile

    from hywia.scratch import scratch_dir
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.Popen(["true"])
    gone.wait()
    left = tmp_path / f"hywia-moments-{gone.pid}-abc123"
    alive = tmp_path / f"hywia-aside-{os.getpid()}-def456"
    mine = tmp_path / "hywia-notours"
    unmarked = tmp_path / f"hywia-results-{gone.pid}-abc123"  # named like ours, not written by hywia: kept
    for folder in (left, alive, mine, unmarked):
        folder.mkdir()
        (folder / "layer0.pt").write_bytes(b"x")
    for folder in (left, alive):
        (folder / ".hywia-scratch").touch()
    with scratch_dir("moments") as made:
        assert not left.exists() and alive.exists() and mine.exists() and unmarked.exists()
        assert Path(made).name.startswith(f"hywia-moments-{os.getpid()}-")



@pytest.mark.parametrize("family", [*FAMILIES, *OTHER_FAMILIES])
def test_a_walk_shares_layer_arguments_across_batches_of_one_size_and_still_computes_every_layer(family):
    """A walk runs each layer on the keyword arguments captured from the first batch of each size: they must be what
    every other batch of that size gets in the model's own pass, and the walked inputs of the last layer's MLP reader
    those of the model's own pass."""
    from hywia.walk import _capture, decoder_layers, walk_layers
    model = tiny_model(family)
    ids = torch.randint(0, 260, (7, 24), generator=torch.Generator().manual_seed(0))  # batches of 3, 3 and 1
    _, layers = decoder_layers(model)
    hidden, kwargs = _capture(model, layers, ids, batch_size=3)
    reader = find_groups(model, "mlp")[-1].reader.name
    own_inputs: list[torch.Tensor] = []
    for b, start in enumerate(range(0, len(ids), 3)):
        own: list[dict] = []
        handles = [layer.register_forward_pre_hook(lambda m, a, kw: own.append(kw), with_kwargs=True) for layer in layers]
        handles.append(layers[0].register_forward_pre_hook(lambda m, a, kw: own.append(a[0] if a else kw["hidden_states"]),
                                                           with_kwargs=True))
        handles.append(model.get_submodule(reader).register_forward_pre_hook(lambda m, a: own_inputs.append(a[0])))
        try:
            with torch.no_grad():
                model(input_ids=ids[start:start + 3], use_cache=False)
        finally:
            for h in handles:
                h.remove()
        torch.testing.assert_close(hidden[b], own[1], rtol=0, atol=0)  # what entered layer 0
        for index, kw in enumerate(own[:1] + own[2:]):
            assert kwargs[index][b].keys() == {k for k in kw if k != "hidden_states"}, (family, index)
            for key, value in kwargs[index][b].items():
                if isinstance(value, (torch.Tensor, tuple)):
                    torch.testing.assert_close(value, kw[key], rtol=0, atol=0)
                else:
                    assert value == kw[key], (family, index, key)
    walked: list[torch.Tensor] = []
    walk_layers(model, ids, {reader}, lambda name, x: walked.append(x), batch_size=3)
    torch.testing.assert_close(torch.cat(walked), torch.cat(own_inputs))


def test_spent_second_moments_leave_the_disk_before_the_build_walks(calib_ids, monkeypatch):
    """At 1.5B one set of spilled moments is 18 GB: the evidence fusion's set goes once scored and the refit screen's once
    the split is chosen, so the build walks (and the incumbent's layers kept aside) never find them still on disk."""
    import hywia.build
    from hywia.importance import Moments
    spilled, left_at_build = [], []
    spill, build_share = Moments.spill, hywia.build.build_share

    def recording_spill(self, path):
        spilled.append(path)
        spill(self, path)

    def checking_build_share(run, *args, **kwargs):
        left_at_build.append(sorted(p.name for p in run.stats.spill.glob("*.pt")))
        return build_share(run, *args, **kwargs)
    monkeypatch.setattr(Moments, "spill", recording_spill)
    monkeypatch.setattr(hywia.build, "build_share", checking_build_share)
    prune(tiny_model("llama"), method="hywia-adaptive", ratio=0.3, calib=calib_ids, samples=4)
    assert spilled and left_at_build and all(files == [] for files in left_at_build)


def test_a_prune_without_disk_for_its_scratch_files_is_refused_before_any_work(calib_ids, monkeypatch):
    """The default's scratch files (one set of float64 input second moments: layers x width^2) are counted before the
    calibration: a disk without room is one line naming TMPDIR, not an error hours in; a method that spills nothing runs."""
    import importlib
    import shutil as shutil_module
    from hywia.prune import begin, scratch_needed
    from hywia.recipe import Recipe
    model = tiny_model("llama")
    run = begin(model, None, Recipe(method="hywia-adaptive", ratio=0.3, calib=calib_ids), None, None, None)
    needed, what = scratch_needed(run)
    moments = sum(s.reader.module.weight.shape[1] ** 2 * 8 for s in run.sets)
    aside = sum(p.numel() * 4 for layer in model.model.layers for p in layer.parameters())  # float32 layers, all pruned
    assert needed == max(moments, aside) and ("second moments" if moments >= aside else "layers") in what
    assert scratch_needed(begin(model, None, Recipe(method="element2", ratio=0.3, calib=calib_ids), None, None, None))[0] == 0
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: shutil_module._ntuple_diskusage(10**12, 10**12 - 1000, 1000))
    monkeypatch.setattr(importlib.import_module("hywia.prune"), "calibration_stats", lambda *a, **k: pytest.fail("calibrated before the disk check"))
    with pytest.raises(HywiaError, match=r"keeps up to 0\.0 GB on disk .* 0\.0 GB free: set TMPDIR"):
        prune(tiny_model("llama"), method="hywia-adaptive", ratio=0.3, calib=calib_ids)
    monkeypatch.undo()
    prune(tiny_model("llama"), method="element2", ratio=0.3, calib=calib_ids)


def test_a_reconstruction_walk_leaves_no_memory_to_the_garbage_collector(calib_ids):
    """The walk hands freed memory back with a heap trim per layer and no full garbage collection (which costs a
    quarter of a second a layer in a process holding a model and its tokenizer): that holds only if neither the
    trim nor the walk leaves reference cycles, and none that hold tensors."""
    model = tiny_model("llama")
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        trim_heap()
        trim_heap()
        assert gc.collect() == 0
        prune(model, method="slimgpt", ratio=0.3, calib=calib_ids)
        gc.collect()
        held = [o for o in gc.garbage if isinstance(o, torch.Tensor)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert not held, [tuple(t.shape) for t in held]


def test_the_heap_is_trimmed_when_the_resident_set_has_grown_by_the_budget_and_not_before(monkeypatch):
    costs = sys.modules["hywia.costs"]
    resident, trims = iter([100, 150, 199, 260, 120, 200, 221, 130]), []
    monkeypatch.setattr(costs, "_rss_bytes", lambda: next(resident))
    monkeypatch.setattr(costs, "trim_heap", lambda: trims.append(True))
    trimmer = costs.HeapTrimmer(budget=100)  # reads 100
    for _ in range(3):  # 150, 199: within 100 of 100; 260: grown by 160, trimmed, then reads 120
        trimmer()
    assert len(trims) == 1 and trimmer.base == 120
    trimmer()  # 200: within 100 of 120
    trimmer()  # 221: grown by 101, trimmed, then reads 130
    assert len(trims) == 2 and trimmer.base == 130


def test_the_gradient_passes_trim_the_heap_and_gather_the_same_statistics(calib_ids, monkeypatch):
    costs = sys.modules["hywia.costs"]
    model = tiny_model()
    untrimmed = grads(model, calib_ids, Memory(store="groups"), method="hywia")
    trims = []
    monkeypatch.setattr(costs, "GRADIENT_TRIM_BUDGET", 0)  # every freed gradient trims
    monkeypatch.setattr(costs, "trim_heap", lambda: trims.append(True))
    trimmed = grads(model, calib_ids, Memory(store="groups"), method="hywia")
    assert trims and trimmed.group_sums.keys() == untrimmed.group_sums.keys()
    assert all(torch.equal(trimmed.group_sums[k], untrimmed.group_sums[k]) for k in untrimmed.group_sums)
