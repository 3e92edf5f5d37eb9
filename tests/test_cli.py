"""The command line: the issue's commands on a tiny saved model, JSON output, and one-line errors."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_model
from hywia import HywiaError, save_model
from hywia.cli import main


@pytest.fixture
def model_dir(tmp_path, tokenizer):
    return save_model(tiny_model(), tokenizer, tmp_path / "dense", {"model": "tiny"})


def run(capsys, *argv):
    """Exit code, stdout, and the last stderr line (progress bars may precede it); no traceback allowed."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, (err.strip().splitlines() or [""])[-1]


def test_prune_then_eval(model_dir, text_dir, tmp_path, capsys):
    out = tmp_path / "pruned"
    code, stdout, _ = run(capsys, "prune", "--model", str(model_dir), "--method", "element2", "--ratio", "0.3", "--calib", "wikitext2",
                          "--samples", "4", "--seq-len", "32", "--data-dir", str(text_dir), "--out", str(out), "--json")
    assert code == 0
    result = json.loads(stdout)
    assert result["params_after"] < result["params_before"]
    assert result["calibration"]["split"] == "validation"
    recipe = json.loads((out / "hywia.json").read_text())
    assert recipe["method"] == "element2" and recipe["kept"] == result["kept"] and "transformers" in recipe["versions"]
    code, stdout, _ = run(capsys, "eval", "ppl", "--model", str(out), "--data", "wikitext2", "ptb", "--seq-len", "32",
                          "--data-dir", str(text_dir), "--json")
    assert code == 0
    ppl = json.loads(stdout)
    assert ppl["params"] == result["params_after"]
    assert set(ppl["ppl"]) == {"wikitext2", "ptb"} and all(r["ppl"] > 1 for r in ppl["ppl"].values())


@pytest.mark.parametrize("extra, message", [
    (["--ratio", "1.5"], "out of range"),
    (["--ratio", "0.2", "--method", "taylor"], "unknown method"),
    (["--ratio", "0.2", "--calib", "/no/such/file.txt"], "unknown dataset"),
    (["--ratio", "0.2", "--data-dir", "/no/such/dir"], "data dir /no/such/dir does not exist"),
    (["--ratio", "0.2", "--attention-unit", "heads"], "unknown --attention-unit 'heads'"),
    (["--ratio", "0.2", "--kind-split", "half"], "unknown --kind-split 'half'"),
    (["--ratio", "0.2", "--method", "flap", "--kind-split", "evidence"], "does not apply to --scope joint"),
    (["--sparsity", "0.5", "--method", "wanda", "--kind-split", "evidence"], "--kind-split does not apply to --method wanda"),
])
def test_bad_prune_inputs_are_one_line(model_dir, tmp_path, capsys, extra, message):
    code, _, err = run(capsys, "prune", "--model", str(model_dir), "--out", str(tmp_path / "o"), *extra)
    assert code == 2 and err.startswith("hywia: error:") and message in err
    assert not (tmp_path / "o").exists()


def test_existing_output_refused_before_any_work(model_dir, tmp_path, capsys):
    (tmp_path / "o").mkdir()
    code, _, err = run(capsys, "prune", "--model", "/no/such/model", "--ratio", "0.2", "--out", str(tmp_path / "o"))
    assert code == 2 and "--overwrite" in err
    code, _, err = run(capsys, "prune", "--model", "/no/such/model", "--ratio", "0.2", "--out", str(tmp_path / "new"))
    assert code == 2 and "cannot load model '/no/such/model'" in err


def test_eval_without_data_refuses(model_dir, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HYWIA_DATA_DIR", raising=False)
    code, _, err = run(capsys, "eval", "ppl", "--model", str(model_dir))
    assert code == 2 and err.startswith("hywia: error:") and "--data-dir" in err


def test_hywia_writes_scores_and_figures(model_dir, text_dir, tmp_path, capsys):
    from safetensors.torch import load_file
    out = tmp_path / "hy"
    code, stdout, _ = run(capsys, "prune", "--model", str(model_dir), "--method", "hywia", "--ratio", "0.3", "--samples", "3",
                          "--seq-len", "32", "--data-dir", str(text_dir), "--seed", "2", "--out", str(out), "--json")
    assert code == 0
    scores = load_file(out / "scores.safetensors")
    assert set(scores) == {f"{n}/{l}.{k}" for n in ("fine", "coarse", "alpha", "fused") for l in range(3) for k in ("attention", "mlp")}
    assert scores["alpha/1.mlp"].shape == (48,)
    for figure in ("alpha.png", "kept_params.png"):
        assert (out / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    kept = json.loads(stdout)["extra"]["kept_params_by_score"]
    assert set(kept["global"]) <= {"fine", "coarse", "fused"} and "fused" in kept["layer"]
    code, _, err = run(capsys, "prune", "--model", str(model_dir), "--method", "element2", "--fusion", "fixed", "--ratio", "0.3",
                       "--out", str(tmp_path / "x"))
    assert code == 2 and "--fusion does not apply" in err


def test_eval_zeroshot_table(model_dir, text_dir, capsys):
    pytest.importorskip("lm_eval")
    from zeroshot_items import write_release_files
    write_release_files(text_dir)
    code, stdout, _ = run(capsys, "eval", "zeroshot", "--model", str(model_dir), "--tasks", "boolq,arc_challenge", "--ppl",
                          "--seq-len", "32", "--max-windows", "3", "--limit", "2", "--data-dir", str(text_dir), "--json")
    assert code == 0
    result = json.loads(stdout)
    assert set(result["zeroshot"]) == {"boolq", "arc_challenge"} and result["zeroshot"]["boolq"]["documents"] == 2
    assert result["average"] == pytest.approx((result["zeroshot"]["boolq"]["acc"] + result["zeroshot"]["arc_challenge"]["acc_norm"]) / 2)
    assert set(result["ppl"]) == {"wikitext2", "ptb"}
    code, _, err = run(capsys, "eval", "zeroshot", "--model", str(model_dir), "--tasks", "mmlu", "--data-dir", str(text_dir))
    assert code == 2 and "unknown task 'mmlu'" in err


def test_recipe_rebuilds_the_same_model_and_the_card_explains_it(model_dir, text_dir, tmp_path, capsys):
    """hywia.json records every option; `prune --recipe` makes identical weights; README.md is a model card."""
    from safetensors.torch import load_file
    first = tmp_path / "first"
    code, _, err = run(capsys, "prune", "--model", str(model_dir), "--method", "hywia-adaptive", "--ratio", "0.3", "--samples", "3",
                       "--seq-len", "32", "--seed", "4", "--data-dir", str(text_dir), "--out", str(first))
    assert code == 0, err
    recipe = json.loads((first / "hywia.json").read_text())
    assert recipe["recipe"]["seed"] == 4 and recipe["recipe"]["samples"] == 3 and "out" not in recipe["recipe"]
    again = tmp_path / "again"
    code, _, err = run(capsys, "prune", "--recipe", str(first / "hywia.json"), "--out", str(again))
    assert code == 0, err
    a, b = load_file(first / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    code, _, err = run(capsys, "prune", "--recipe", str(first / "hywia.json"), "--seed", "5", "--out", str(tmp_path / "other"))
    assert code == 0 and json.loads((tmp_path / "other" / "hywia.json").read_text())["seed"] == 5  # the command line wins
    card = (first / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers") and "`hywia-adaptive`" in card and "hywia prune --recipe" in card
    assert f"{recipe['params_before']:,} → {recipe['params_after']:,}" in card
    code, _, err = run(capsys, "prune", "--recipe", str(tmp_path / "missing.json"), "--out", str(tmp_path / "x"))
    assert code == 2 and "--recipe" in err and "not found" in err


def test_recipe_pins_the_defaults_it_ran_with(model_dir, text_dir, tmp_path, capsys):
    """A recipe records what each method default resolved to, and one recorded before a default changed (options left
    None) replays with what its run resolved: hywia-adaptive's --reconstruct was off before it became obs."""
    from safetensors.torch import load_file
    flags = ["--model", str(model_dir), "--ratio", "0.3", "--samples", "3", "--seq-len", "32", "--data-dir", str(text_dir)]
    old = tmp_path / "old"
    code, _, err = run(capsys, "prune", *flags, "--reconstruct", "no", "--out", str(old))
    assert code == 0, err
    recipe = json.loads((old / "hywia.json").read_text())
    assert {k: recipe["recipe"][k] for k in ("reconstruct", "compensate", "scope", "attention_unit", "kind_split")} == \
        {"reconstruct": False, "compensate": True, "scope": "global", "attention_unit": "query", "kind_split": "evidence"}
    # as hywia.json was written before recipes had their own field: the command line's options, defaults left None
    options = {**recipe.pop("recipe"), "model": str(model_dir), "data_dir": str(text_dir)}
    options.update(dict.fromkeys(("reconstruct", "compensate", "scope", "attention_unit", "kind_split")))
    (old / "hywia.json").write_text(json.dumps({**recipe, "options": options}))
    again = tmp_path / "again"
    code, _, err = run(capsys, "prune", "--recipe", str(old / "hywia.json"), "--out", str(again))
    assert code == 0, err
    assert json.loads((again / "hywia.json").read_text())["extra"]["reconstruct"] is False
    a, b = load_file(old / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    code, _, err = run(capsys, "prune", *flags, "--out", str(tmp_path / "new"))  # and the default today is obs
    assert code == 0 and json.loads((tmp_path / "new" / "hywia.json").read_text())["recipe"]["reconstruct"] == "obs"


def test_a_prune_interrupted_in_its_build_resumes_there_and_makes_the_same_model(model_dir, text_dir, tmp_path, capsys, monkeypatch):
    """Ctrl-C during the walks leaves the stages before them in OUT.checkpoints and says how to go on; the same
    command with --resume makes the uninterrupted prune's weights and removes the checkpoint once the model is saved."""
    import importlib
    from safetensors.torch import load_file
    stages = importlib.import_module("hywia.prune")
    command = ["prune", "--model", str(model_dir), "--method", "hywia-adaptive", "--ratio", "0.5", "--samples", "3",
               "--seq-len", "32", "--data-dir", str(text_dir)]
    code, _, err = run(capsys, *command, "--out", str(tmp_path / "whole"))
    assert code == 0, err
    build = stages.build

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(stages, "build", interrupted)
    out = tmp_path / "killed"
    code, _, err = run(capsys, *command, "--out", str(out))
    assert code == 130 and f"are in {out}.checkpoints: run the same command with --resume" in err and not out.exists()

    def full(*args, **kwargs):
        raise HywiaError("no space left for the layers built aside")
    monkeypatch.setattr(stages, "build", full)  # a failure in the build says the same, after its own line
    code, _, err = run(capsys, *command, "--out", str(out), "--resume")
    assert code == 2 and "no space left for the layers built aside; the prune's calibration, scores and split are in" in err
    monkeypatch.setattr(stages, "build", build)
    code, _, err = run(capsys, *command, "--out", str(out))
    assert code == 2 and "pass --resume to continue it" in err
    code, _, err = run(capsys, *command, "--out", str(out), "--resume")
    assert code == 0, err
    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((out / "hywia.json").read_text())["extra"]["resumed"]["from"] == "split"
    assert not (tmp_path / "killed.checkpoints").exists() and not (tmp_path / "whole.checkpoints").exists()
