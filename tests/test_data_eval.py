"""Data resolution, calibration sampling and the perplexity protocol."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import tiny_model
from hywia import HywiaError, perplexity
from hywia.data import calibration_samples, load_text, random_windows, tokenize


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
    assert record["split"] == "validation" and record["source"].endswith("wiki.valid.tokens")


def test_random_windows_are_seeded():
    ids = torch.arange(1000)
    a, b, c = (random_windows(ids, 3, 10, s) for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(3, 9, dtype=torch.long))  # contiguous windows


def test_missing_split_in_data_dir_names_the_file(tmp_path, tokenizer):
    with pytest.raises(HywiaError, match="wiki.test.tokens"):
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
