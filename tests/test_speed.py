"""`hywia bench speed`: every figure present and consistent, the first model the reference, bad input one line."""
from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import tiny_model
from hywia import prune, save_model
from hywia.errors import HywiaError
from hywia.speed import compare, markdown


def _clock(prefill_s: float, generate_s: float):
    """A stand-in for `_timed` that runs the call and reports fixed durations, so the figures are checked exactly and
    a busy machine (a prefill slower than a whole generate, as one CI run saw) cannot fail the test."""
    calls = []

    def timed(fn, device):
        fn()
        calls.append(fn)
        return prefill_s if len(calls) % 2 else generate_s  # measure() times a prefill, then a generate, in turn
    return timed


def test_compare_dense_and_pruned(tmp_path, tokenizer, calib_ids, monkeypatch):
    monkeypatch.setattr("hywia.speed._timed", _clock(prefill_s=0.01, generate_s=0.03))
    dense = save_model(tiny_model(), tokenizer, tmp_path / "dense", {})
    pruned = save_model(prune(tiny_model(), method="l2", ratio=0.5)[0], tokenizer, tmp_path / "pruned", {})
    rows = compare([str(dense), str(pruned)], [1, 2], prompt_len=8, new_tokens=3, repeats=1)
    assert [(r["model"], r["batch_size"]) for r in rows] == [(str(dense), 1), (str(dense), 2), (str(pruned), 1), (str(pruned), 2)]
    for r in rows:
        assert r["prefill_tokens_per_s"] == pytest.approx(r["batch_size"] * 8 / 0.01)
        assert r["decode_tokens_per_s"] == pytest.approx(r["batch_size"] * 2 / 0.02)  # two decode steps in 0.03 - 0.01 s
        assert r["ms_per_token"] == pytest.approx(1000 * r["batch_size"] / r["decode_tokens_per_s"])
        assert r["peak_memory_mb"] > 0
    dense_row, pruned_row = rows[0], rows[2]
    assert dense_row["prefill_speedup"] == 1.0 and dense_row["ideal_speedup"] == 1.0
    assert pruned_row["ideal_speedup"] == pytest.approx(dense_row["params"] / pruned_row["params"]) and pruned_row["ideal_speedup"] > 1
    assert pruned_row["file_mb"] < dense_row["file_mb"]
    assert markdown(rows).count("\n") == len(rows) + 1


def test_a_decode_that_takes_no_time_beyond_the_prefill_is_refused(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr("hywia.speed._timed", _clock(prefill_s=0.0234, generate_s=0.0188))
    dense = save_model(tiny_model(), tokenizer, tmp_path / "dense", {})
    with pytest.raises(HywiaError, match="measure more --new-tokens"):
        compare([str(dense)], [1], prompt_len=8, new_tokens=3, repeats=1)


def test_compare_times_the_real_model(tmp_path, tokenizer):
    """One unpatched run: the timer reads a real clock and the rows carry positive figures."""
    dense = save_model(tiny_model(), tokenizer, tmp_path / "dense", {})
    row = compare([str(dense)], [1], prompt_len=8, new_tokens=32, repeats=3)[0]
    assert row["prefill_tokens_per_s"] > 0 and row["decode_tokens_per_s"] > 0


def test_cli_rejects_bad_batch_sizes(tmp_path):
    done = subprocess.run([sys.executable, "-m", "hywia.cli", "bench", "speed", "--model", "x", "--batch-sizes", "one"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.startswith("hywia: error: --batch-sizes") and done.stderr.count("\n") == 1
