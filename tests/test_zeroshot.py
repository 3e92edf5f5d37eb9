"""The harness adapter: a tiny model scored end to end on local release-format items of every task."""
from __future__ import annotations

import json

import pytest

from conftest import tiny_model
from hywia import HywiaError, prune
from hywia.zeroshot import TASKS, zeroshot
from zeroshot_items import write_release_files

pytest.importorskip("lm_eval")


def test_all_seven_tasks_end_to_end_on_dense_and_pruned(tmp_path, tokenizer):
    data = write_release_files(tmp_path)
    for model in (tiny_model(), prune(tiny_model(), method="l2", ratio=0.3, scope="global")[0]):
        results = zeroshot(model, tokenizer, data_dir=str(data), batch_size=4)
        assert set(results) == set(TASKS)
        for name, r in results.items():
            assert 0.0 <= r["score"] <= 1.0 and r["metric"] == TASKS[name].metric
            assert r["documents"] == 3
        assert "acc_norm" in results["hellaswag"] and "acc_norm" not in results["boolq"]


def test_converted_release_format_scores_like_harness_schema(tmp_path, tokenizer):
    """ARC in its release layout and the same items in the harness's own schema give identical accuracies."""
    from zeroshot_items import ARC
    release = write_release_files(tmp_path / "release")
    flat = tmp_path / "flat" / "zeroshot" / "arc"
    flat.mkdir(parents=True)
    rows = [{"id": r["id"], "question": r["question"]["stem"], "answerKey": r["answerKey"],
             "choices": {"text": [c["text"] for c in r["question"]["choices"]], "label": [c["label"] for c in r["question"]["choices"]]}}
            for r in ARC]
    import hywia.zeroshot as z
    original = z.TASKS["arc_easy"]
    z.TASKS["arc_easy"] = z.ZeroShotTask("arc_easy", "acc", ("arc/ARC-Easy-Test.jsonl",), z._same)
    try:
        (flat / "ARC-Easy-Test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        direct = zeroshot(tiny_model(), tokenizer, ["arc_easy"], data_dir=str(tmp_path / "flat"))
    finally:
        z.TASKS["arc_easy"] = original
    converted = zeroshot(tiny_model(), tokenizer, ["arc_easy"], data_dir=str(release))
    assert converted["arc_easy"]["acc"] == direct["arc_easy"]["acc"]
    assert converted["arc_easy"]["acc_norm"] == direct["arc_easy"]["acc_norm"]


def test_missing_task_file_is_named(tmp_path, tokenizer):
    (tmp_path / "zeroshot").mkdir()
    with pytest.raises(HywiaError, match="boolq/dev.jsonl"):
        zeroshot(tiny_model(), tokenizer, ["boolq"], data_dir=str(tmp_path))


def test_piqa_labels_must_match(tmp_path, tokenizer):
    data = write_release_files(tmp_path)
    (data / "zeroshot/piqa/valid-labels.lst").write_text("0\n1\n")
    with pytest.raises(HywiaError, match="2 labels for 3 records"):
        zeroshot(tiny_model(), tokenizer, ["piqa"], data_dir=str(data))


def test_unknown_task(tmp_path, tokenizer):
    with pytest.raises(HywiaError, match="unknown task 'mmlu'"):
        zeroshot(tiny_model(), tokenizer, ["mmlu"], data_dir=str(tmp_path))
