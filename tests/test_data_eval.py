"""Data resolution, calibration sampling and the perplexity protocol."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import bos_tokenizer, real_data_dir, tiny_model
from hywia import HywiaError, perplexity
from hywia.data import bos_id, calibration_samples, consecutive_windows, load_text, random_windows, tokenize


def test_perplexity_matches_an_independent_computation(tokenizer, text_dir):
    model = tiny_model()
    result = perplexity(model, tokenizer, "wikitext2", seq_len=32, max_windows=5, data_dir=text_dir, batch_size=2)
    ids = tokenize(tokenizer, load_text("wikitext2", "test", text_dir).text)
    losses = [model(input_ids=ids[i * 32:(i + 1) * 32][None], labels=ids[i * 32:(i + 1) * 32][None]).loss.item() for i in range(5)]
    assert result.windows == 5 and result.tokens == 5 * 31
    assert result.ppl == pytest.approx(math.exp(sum(losses) / 5), rel=1e-5)


def test_perplexity_uses_every_full_window_by_default(tokenizer, text_dir):
    result = perplexity(tiny_model(), tokenizer, "ptb", seq_len=64, data_dir=text_dir)
    n_tokens = len(tokenize(tokenizer, load_text("ptb", "test", text_dir).text))
    assert result.windows == n_tokens // 64


def test_joins_follow_the_literature(text_dir):
    wiki = load_text("wikitext2", "test", text_dir).text
    ptb = load_text("ptb", "test", text_dir).text
    assert "\n\n" in wiki  # rows joined by a blank line, as "\n\n".join(test["text"])
    assert "\n" not in ptb  # sentences joined by spaces


def test_offline_calibration_falls_back_to_validation_and_says_so(tokenizer, text_dir):
    ids, record = calibration_samples(tiny_model(), tokenizer, "wikitext2", 4, 16, seed=0, data_dir_path=text_dir)
    assert ids.shape == (4, 16)
    assert record["split"] == "validation" and record["source"].endswith("wiki.valid.raw")


def test_random_windows_are_seeded():
    ids = torch.arange(1000)
    a, b, c = (random_windows(ids, 3, 10, s) for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(3, 9, dtype=torch.long))  # contiguous windows


def test_missing_split_in_data_dir_names_the_file(tmp_path, tokenizer):
    with pytest.raises(HywiaError, match="wiki.test.raw"):
        perplexity(tiny_model(), tokenizer, "wikitext2", data_dir=tmp_path)


def test_eval_refuses_without_data(tokenizer, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HYWIA_DATA_DIR", raising=False)
    with pytest.raises(HywiaError, match="--data-dir"):
        perplexity(tiny_model(), tokenizer, "wikitext2")


def test_prune_falls_back_to_generated_text_loudly(tokenizer, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HYWIA_DATA_DIR", raising=False)
    with pytest.warns(UserWarning, match="NO CALIBRATION DATA"):
        ids, record = calibration_samples(tiny_model(), tokenizer, "wikitext2", 2, 12, seed=0)
    assert ids.shape == (2, 12) and record["source"] == "generated-by-model"


def test_self_sampled_calibration_comes_in_batches_whose_cache_fits_the_budget(tokenizer, monkeypatch):
    """Sampling every window at once held 1.6 GB of KV cache at 135M; batches bounded by GENERATION_CACHE_BYTES give
    the same number of windows, reproducibly."""
    from hywia import data
    model, sizes = tiny_model(), []
    generate = model.generate
    monkeypatch.setattr(model, "generate", lambda prompt, **kw: sizes.append(len(prompt)) or generate(prompt, **kw))
    config = model.config
    per_sequence = 2 * config.num_hidden_layers * config.hidden_size * 12 * 4
    monkeypatch.setattr(data, "GENERATION_CACHE_BYTES", 3 * per_sequence)
    ids = data.generated_samples(model, tokenizer, 7, 12, seed=5)
    assert ids.shape == (7, 12) and max(sizes) <= 3 and sum(sizes) == 7
    assert sizes == [3, 2, 2]  # as few batches as fit, of even size
    assert torch.equal(ids, data.generated_samples(model, tokenizer, 7, 12, seed=5))
    monkeypatch.setattr(data, "GENERATION_CACHE_BYTES", 2**40)
    sizes.clear()
    assert data.generated_samples(model, tokenizer, 7, 12, seed=5).shape == (7, 12) and sizes == [7]


@pytest.mark.parametrize("name, body", [("c.txt", "a b c\n" * 200), ("c.jsonl", '{"text": "a b c"}\n' * 200), ("c.parquet", None)])
def test_calibration_from_a_file(tmp_path, tokenizer, name, body):
    if body is None:
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.table({"text": ["a b c"] * 200}), tmp_path / name)
    else:
        (tmp_path / name).write_text(body)
    ids, record = calibration_samples(tiny_model(), tokenizer, str(tmp_path / name), 3, 8, seed=0)
    assert ids.shape == (3, 8) and record["source"] == str(tmp_path / name)


def test_user_text_file_is_read_verbatim(tmp_path):
    (tmp_path / "t.txt").write_text("line one\nline two\n")
    (tmp_path / "t.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n')
    assert load_text(str(tmp_path / "t.txt"), "test").text == "line one\nline two\n"
    assert load_text(str(tmp_path / "t.jsonl"), "test").text == "a\n\nb"


def test_malformed_jsonl_is_a_one_line_error(tmp_path, tokenizer):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(HywiaError, match="not valid JSON"):
        load_text(str(tmp_path / "bad.jsonl"), "train")


def test_wikitext_raw_rows_join_like_the_hf_text_column(text_dir):
    """A release line " " is an empty HF row; other lines are rows as they are, so the text is "\n\n".join(rows)."""
    lines = (text_dir / "wikitext2" / "wiki.test.raw").read_text().split("\n")[:-1]
    rows = ["" if not l.strip() else l + "\n" for l in lines]
    assert load_text("wikitext2", "test", text_dir).text == "\n\n".join(rows)
    assert load_text("wikitext2-tokens", "test", text_dir).source.endswith("wiki.test.tokens")


def test_real_wikitext2_raw_test_split_has_the_published_length():
    data = real_data_dir()
    if data is None or not (data / "wikitext2" / "wiki.test.raw").is_file():
        pytest.skip("needs ../shared/data (or HYWIA_DATA_DIR) with wikitext2/wiki.test.raw")
    assert len(load_text("wikitext2", "test", data).text) == 1_294_336  # = len("\n\n".join(HF test["text"]))


def test_bos_starts_every_window_when_the_tokenizer_adds_it(text_dir):
    plain, with_bos = bos_tokenizer(), bos_tokenizer()
    plain._tokenizer.post_processor = None
    assert bos_id(plain) is None and bos_id(with_bos) == with_bos.bos_token_id
    ids = tokenize(with_bos, load_text("ptb", "test", text_dir).text)
    assert with_bos.bos_token_id not in ids.tolist()  # the text itself carries no special token
    windows = consecutive_windows(ids, 16, with_bos.bos_token_id)
    assert windows.shape[1] == 16 and (windows[:, 0] == with_bos.bos_token_id).all()
    assert torch.equal(windows[:, 1:].flatten(), ids[: len(windows) * 15])  # 15 text tokens each, in order
    calib, record = calibration_samples(tiny_model(), with_bos, "wikitext2", 3, 16, seed=0, data_dir_path=text_dir)
    assert (calib[:, 0] == with_bos.bos_token_id).all() and record["bos"] is True


def test_perplexity_with_bos_matches_an_independent_computation(text_dir):
    tok, model = bos_tokenizer(), tiny_model()
    result = perplexity(model, tok, "ptb", seq_len=24, max_windows=4, data_dir=text_dir)
    ids = tok(load_text("ptb", "test", text_dir).text)["input_ids"][1:]  # the text without its one leading BOS
    windows = [[tok.bos_token_id] + ids[i * 23:(i + 1) * 23] for i in range(4)]
    losses = [model(input_ids=torch.tensor([w]), labels=torch.tensor([w])).loss.item() for w in windows]
    assert result.bos and result.tokens == 4 * 23
    assert result.ppl == pytest.approx(math.exp(sum(losses) / 4), rel=1e-5)


def test_protocols_set_the_window_and_are_reported(tokenizer, text_dir):
    model = tiny_model()  # a 256-token context: the sparsegpt protocol falls back to it
    short = perplexity(model, tokenizer, "ptb", data_dir=text_dir, max_windows=2)
    long = perplexity(model, tokenizer, "ptb", data_dir=text_dir, protocol="sparsegpt", max_windows=2)
    custom = perplexity(model, tokenizer, "ptb", seq_len=40, data_dir=text_dir, max_windows=2)
    assert (short.seq_len, short.protocol) == (128, "llm-pruner")
    assert (long.seq_len, long.protocol) == (256, "sparsegpt")
    assert (custom.seq_len, custom.protocol) == (40, "custom")
    assert "first 2 windows of 256 tokens" in long.describe() and "sparsegpt" in long.describe()
    with pytest.raises(HywiaError, match="unknown protocol"):
        perplexity(model, tokenizer, "ptb", data_dir=text_dir, protocol="wanda")


def test_calibrating_on_an_evaluation_split_warns(tokenizer, text_dir):
    with pytest.warns(UserWarning, match="evaluation \\(test\\) split"):
        calibration_samples(tiny_model(), tokenizer, str(text_dir / "wikitext2" / "wiki.test.raw"), 2, 16, 0, text_dir)


def test_bos_can_be_forced_either_way(text_dir):
    tok, model = bos_tokenizer(), tiny_model()
    auto = perplexity(model, tok, "ptb", seq_len=24, max_windows=3, data_dir=text_dir)
    off = perplexity(model, tok, "ptb", seq_len=24, max_windows=3, data_dir=text_dir, bos="no")
    assert auto.bos and not off.bos and auto.ppl != off.ppl
    with pytest.raises(HywiaError, match="unknown --bos"):
        perplexity(model, tok, "ptb", data_dir=text_dir, bos="maybe")
