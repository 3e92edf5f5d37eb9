"""The harness adapter: a tiny model scored end to end on local release-format items of every task."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import real_data_dir, tiny_model
from hywia import HywiaError, prune
from hywia.zeroshot import TASKS, _find, hellaswag_docs, read_task_file, split_hellaswag_context, zeroshot
from zeroshot_items import HELLASWAG, write_mirror_files, write_release_files

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


def _harness_query(doc: dict) -> str:
    from lm_eval.tasks.hellaswag.utils import preprocess  # the harness's own HellaSwag preprocessing
    return preprocess(doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize())


def test_mirror_layouts_give_the_release_documents(tmp_path):
    """Every task read from the shared data dir's layouts yields the documents of the official release layout."""
    release, mirror = write_release_files(tmp_path / "r") / "zeroshot", write_mirror_files(tmp_path / "m") / "zeroshot"
    for name, task in TASKS.items():
        a, b = read_task_file(_find(release, task), task), read_task_file(_find(mirror, task), task)
        if name == "hellaswag":  # the mirror lost the ctx_a/ctx_b split: compare what the harness builds from them
            assert [_harness_query(d) for d in a] == [_harness_query(d) for d in b]
            assert [(d["endings"], int(d["label"])) for d in a] == [(d["endings"], int(d["label"])) for d in b]
        elif name == "winogrande":
            assert [{k: v for k, v in d.items() if k != "qID"} for d in a] == b
        else:
            assert a == b, name


def test_hellaswag_context_split_rebuilds_the_capitalised_fragment(tmp_path):
    assert split_hellaswag_context("A man is sitting on a roof. he") == ("A man is sitting on a roof.", "he")
    assert split_hellaswag_context("A lady walks. She bends down. the lady") == ("A lady walks. She bends down.", "the lady")
    assert split_hellaswag_context("How to do x. Choose a base color.") == ("How to do x. Choose a base color.", "")
    path = write_mirror_files(tmp_path) / "zeroshot/hellaswag/hellaswag_val_full.txt"
    restored, as_file = hellaswag_docs(path, "restore"), hellaswag_docs(path, "as-file")
    assert _harness_query(restored[0]).endswith("into a bowl. He") and _harness_query(as_file[0]).endswith("into a bowl. he")
    assert _harness_query(restored[0]) == _harness_query(HELLASWAG[0])
    path.write_text(path.read_text() + "extra line\n")
    with pytest.raises(HywiaError, match="not 6 per item"):
        hellaswag_docs(path)


def test_boolq_label_strings_and_bad_labels(tmp_path):
    task = TASKS["boolq"]
    docs = read_task_file(_find(write_mirror_files(tmp_path) / "zeroshot", task), task)
    assert [d["label"] for d in docs] == [1, 0, 1] and docs[0]["passage"].startswith("Water -- ")
    (tmp_path / "zeroshot/boolq/val.jsonl").write_text('{"question": "q", "passage": "p", "label": "maybe"}\n')
    with pytest.raises(HywiaError, match="boolq's release format"):
        read_task_file(tmp_path / "zeroshot/boolq/val.jsonl", task)


def test_mirror_layouts_end_to_end(tmp_path, tokenizer):
    results = zeroshot(tiny_model(), tokenizer, data_dir=str(write_mirror_files(tmp_path)), batch_size=4)
    assert all(r["documents"] == 3 for r in results.values())
    assert results["hellaswag"]["source"].endswith("hellaswag_val_full.txt")


REAL_COUNTS = {"boolq": 3270, "piqa": 1838, "hellaswag": 10042, "winogrande": 1267, "arc_easy": 2376, "arc_challenge": 1172, "openbookqa": 500}


def test_real_task_files_read_whole_and_score_a_few_items(tokenizer):
    data = real_data_dir()
    if data is None or not (data / "zeroshot").is_dir():
        pytest.skip("needs ../shared/data (or HYWIA_DATA_DIR) with zeroshot/")
    for name, task in TASKS.items():
        docs = read_task_file(_find(data / "zeroshot", task), task)
        assert len(docs) == REAL_COUNTS[name], name
    results = zeroshot(tiny_model(), tokenizer, limit=2, data_dir=str(data), batch_size=4)
    assert all(r["documents"] == 2 and 0 <= r["score"] <= 1 for r in results.values())


def test_no_git_noise_outside_a_checkout(tmp_path):
    """lm-eval probes `git describe` in the working directory; outside a checkout that must print nothing."""
    import subprocess
    import sys
    data = write_mirror_files(tmp_path / "d")
    code = ("import sys; sys.path.insert(0, %r); from conftest import tiny_model, byte_tokenizer; from hywia.zeroshot import zeroshot; "
            "zeroshot(tiny_model(), byte_tokenizer(), ['piqa'], data_dir=%r)") % (str(Path(__file__).parent), str(data))
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "not a git repository" not in done.stderr + done.stdout
