"""Saved models reload in a process that never imports hywia, with identical logits; saving is atomic."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import tiny_model
from hywia import HywiaError, load_model, prune, save_model
from hywia.outputs import atomic_dir

IDS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(11))

# Both sides of a cross-process comparison run their matrix products on one thread: MKL may split a product's sums
# differently between two processes on several threads (a bloom model's logits once differed in the last bit in CI).
RELOAD = """
import sys, torch
from transformers import AutoModelForCausalLM
assert "hywia" not in sys.modules
torch.set_num_threads(1)
kwargs = {"trust_remote_code": True} if sys.argv[2] == "remote" else {}
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32, **kwargs).eval()
ids = torch.load(sys.argv[3])
with torch.no_grad():
    torch.save(model(input_ids=ids).logits, sys.argv[4])
assert "hywia" not in sys.modules
"""


def fresh_process_logits(path, mode, tmp_path, ids=IDS):
    """Logits of `ids` from the model at `path`, loaded by a python that never imports hywia."""
    torch.save(ids, tmp_path / "ids.pt")
    subprocess.run([sys.executable, "-c", RELOAD, str(path), mode, str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")],
                   check=True, cwd=tmp_path, capture_output=True)
    return torch.load(tmp_path / "out.pt")


def logits(model, ids=IDS):
    """`model`'s logits of `ids`, on one thread as the fresh process computes them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            return model(input_ids=ids).logits
    finally:
        torch.set_num_threads(threads)


def assert_reloads_and_generates(model, tokenizer, tmp_path):
    """Saved, `model` reloads in a fresh process (as a stock model or through modeling_hywia.py, as its config says)
    and through hywia with identical logits, and generates; returns hywia's reload."""
    out = save_model(model, tokenizer, tmp_path / "p", {})
    mode = "plain" if model.config.hywia_pruned_shapes is None else "remote"
    assert torch.equal(fresh_process_logits(out, mode, tmp_path), logits(model))
    again, _ = load_model(str(out))
    assert torch.equal(logits(again), logits(model))
    assert again.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False).shape == (1, 7)
    return again


@pytest.mark.parametrize("scope, mode", [("global", "remote"), ("layer", "plain")])
def test_reload_in_fresh_process_gives_identical_logits(scope, mode, tmp_path, tokenizer, calib_ids):
    model, report = prune(tiny_model("qwen2"), method="element1", ratio=0.4, calib=calib_ids, scope=scope)
    out = save_model(model, tokenizer, tmp_path / "pruned", {"method": "element1"})
    config = json.loads((out / "config.json").read_text())
    # global scope gives layers different widths: that needs modeling_hywia.py; a uniform cut is a stock config
    assert ("auto_map" in config) == (mode == "remote")
    assert (out / "modeling_hywia.py").exists() == (mode == "remote")
    assert (out / "model.safetensors").exists() and (out / "hywia.json").exists()
    assert torch.equal(fresh_process_logits(out, mode, tmp_path), logits(model))
    reloaded, _ = load_model(str(out))  # hywia's own loader runs no code from the directory
    assert torch.equal(logits(reloaded), logits(model))


def test_layer_scope_with_layer_range_is_heterogeneous(tmp_path, tokenizer, calib_ids):
    model, _ = prune(tiny_model(), method="l2", ratio=0.4, calib=calib_ids, layers="1:")
    out = save_model(model, tokenizer, tmp_path / "p", {})
    assert torch.equal(fresh_process_logits(out, "remote", tmp_path), logits(model))


def test_uniform_cut_that_stock_config_rejects_uses_shapes(tmp_path, tokenizer, calib_ids):
    # 8 -> 6 query heads in every layer: uniform, but LLaMA's config wants hidden_size % heads == 0 (64 % 6 != 0)
    model, _ = prune(tiny_model(), method="l2", ratio=0.25, calib=calib_ids, target="attention")
    assert {w["num_attention_heads"] for w in model.config.hywia_layer_widths} == {6}
    out = save_model(model, tokenizer, tmp_path / "p", {})
    assert torch.equal(fresh_process_logits(out, "remote", tmp_path), logits(model))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_bias_compensated_model_reloads_with_its_new_biases(family, tmp_path, tokenizer, calib_ids):
    # FLAP folds removed inputs into o_proj / down_proj biases the stock layers lack; pruned again, they stay
    model, _ = prune(tiny_model(family), method="flap", ratio=0.2, calib=calib_ids, scope="layer")
    assert all(block.self_attn.o_proj.bias is not None for block in model.model.layers)
    out = save_model(model, tokenizer, tmp_path / "once", {})
    assert torch.equal(fresh_process_logits(out, "remote", tmp_path), logits(model))
    again, _ = load_model(str(out))
    again, _ = prune(again, method="l2", ratio=0.2, calib=calib_ids)
    assert all(block.mlp.down_proj.bias is not None for block in again.model.layers)
    out = save_model(again, tokenizer, tmp_path / "twice", {})
    assert torch.equal(fresh_process_logits(out, "remote", tmp_path), logits(again))


def test_pruning_a_pruned_model_again(tmp_path, tokenizer, calib_ids):
    model, _ = prune(tiny_model(), method="l2", ratio=0.3, calib=calib_ids, scope="global")
    first = save_model(model, tokenizer, tmp_path / "once", {})
    again, _ = load_model(str(first))
    again, report = prune(again, method="l1", ratio=0.3, calib=calib_ids, scope="global")
    out = save_model(again, tokenizer, tmp_path / "twice", {})
    assert report.params_after < report.params_before
    assert torch.equal(fresh_process_logits(out, "remote", tmp_path), logits(again))


def test_existing_output_is_refused_and_kept(tmp_path, tokenizer):
    out = tmp_path / "pruned"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(HywiaError, match="--overwrite"):
        save_model(tiny_model(), tokenizer, out, {})
    assert (out / "precious.txt").read_text() == "keep me"
    save_model(tiny_model(), tokenizer, out, {}, overwrite=True)
    assert not (out / "precious.txt").exists() and (out / "config.json").exists()


def test_interrupted_write_leaves_nothing(tmp_path):
    out = tmp_path / "pruned"
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_a_half_precision_load_warns_only_where_the_cpu_emulates_that_type(tmp_path, tokenizer, monkeypatch):
    import warnings

    from hywia import io
    out = save_model(tiny_model(), tokenizer, tmp_path / "m", {})
    for native, dtype, warned in [(False, "bfloat16", True), (False, "float16", True), (True, "bfloat16", False),
                                  (None, "bfloat16", False), (False, "float32", False)]:
        monkeypatch.setattr(io, "native_half", lambda _, native=native: native)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model, _ = load_model(str(out), dtype=dtype)
        assert next(model.parameters()).dtype == getattr(torch, dtype)
        said = [str(w.message) for w in caught if "native" in str(w.message)]
        assert (len(said) == 1 and "--dtype float32" in said[0] and dtype in said[0]) == warned, (native, dtype, said)


def test_unknown_model_paths_are_one_line_errors(tmp_path):
    with pytest.raises(HywiaError, match="not found"):
        load_model(str(tmp_path / "missing.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(HywiaError, match="no config.json"):
        load_model(str(tmp_path / "empty"))


@pytest.mark.parametrize("mask", [0o022, 0o002])
def test_outputs_get_the_modes_the_users_umask_gives(mask, tmp_path, tokenizer):
    """A saved model, its files and a GGUF export are as readable as any file the user makes: temporary names are
    made 0700 / 0600 by tempfile, and the rename into place must not carry that over."""
    import os

    from hywia.export import export_gguf
    previous = os.umask(mask)
    try:
        folder = save_model(tiny_model(), tokenizer, tmp_path / "m", {"model": "tiny"})
        gguf_file = tmp_path / "m.gguf"
        export_gguf(tiny_model(), gguf_file, "f16", source=str(folder))
    finally:
        os.umask(previous)
    assert folder.stat().st_mode & 0o777 == 0o777 & ~mask
    assert all(f.stat().st_mode & 0o777 == 0o666 & ~mask for f in folder.iterdir() if f.is_file())
    assert gguf_file.stat().st_mode & 0o777 == 0o666 & ~mask
