"""hywia.Recipe: one object for every option of a prune, the same from CLI flags, keywords and a saved hywia.json."""
import json

import pytest
import torch
from safetensors.torch import load_file

import hywia.methods  # noqa: F401  (registers every method)
from conftest import tiny_model
from hywia import Recipe, prune, sparsify
from hywia.errors import HywiaError
from hywia.importance import CRITERIA
from hywia.io import load_model
from hywia.sparsify import SPARSIFIERS
from test_cli import model_dir, run  # noqa: F401  (model_dir: a fixture)

FLAGS = ["--method", "hywia", "--fusion", "fixed", "--alpha", "0.3", "--ratio", "0.3", "--scope", "global",
         "--kind-split", "evidence", "--compensate", "yes", "--round-to", "2", "--samples", "3", "--seq-len", "32", "--seed", "4"]
KEYWORDS = dict(method="hywia", fusion="fixed", alpha=0.3, ratio=0.3, scope="global", kind_split="evidence", compensate=True,
                round_to=2, samples=3, seq_len=32, seed=4)


def test_flags_keywords_and_a_saved_recipe_prune_to_the_same_weights(model_dir, text_dir, tmp_path, capsys):  # noqa: F811
    code, _, err = run(capsys, "prune", "--model", str(model_dir), *FLAGS, "--data-dir", str(text_dir), "--out", str(tmp_path / "cli"))
    assert code == 0, err
    by_flags = load_file(tmp_path / "cli" / "model.safetensors")
    saved, settings = Recipe.load(tmp_path / "cli" / "hywia.json")
    assert settings == {"model": str(model_dir), "dtype": "float32", "device": "cpu", "data_dir": str(text_dir)}
    assert saved == Recipe(**KEYWORDS).resolved() and saved.check() is saved  # resolved: every default the run used
    for how in ("keywords", "recipe"):
        model, tokenizer = load_model(str(model_dir), "float32", "cpu")
        if how == "keywords":
            prune(model, tokenizer, data_dir=str(text_dir), **KEYWORDS)
        else:
            prune(model, tokenizer, saved, data_dir=str(text_dir))
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        assert by_flags.keys() == state.keys() and all(torch.equal(by_flags[k], state[k]) for k in by_flags), how


def test_every_methods_resolved_recipe_checks_and_round_trips_through_json():
    for recipe in [Recipe(method=m, ratio=0.2) for m in CRITERIA] + [Recipe(method=m, sparsity=0.5) for m in SPARSIFIERS]:
        resolved = recipe.check().resolved()
        again = Recipe.from_dict(json.loads(json.dumps(resolved.as_dict())))
        assert again == resolved and again.check() is again
        assert resolved.resolved() == resolved  # nothing left to resolve


@pytest.mark.parametrize("recipe, message", [
    ({"method": "element2", "ratio": 0.2, "colour": "red"}, "unknown field 'colour'"),
    ({"method": "element2", "ratio": "a fifth"}, "field 'ratio' is \"a fifth\", not a number"),
    ({"method": "element2", "ratio": 1.5}, "--ratio 1.5 is out of range"),
    ({"method": "element2", "ratio": 0.2, "samples": 0}, "--samples 0 is out of range"),
    ({"method": "element2", "ratio": 0.2, "seed": 1.5}, "field 'seed' is 1.5, not an integer"),
    ({"method": "element2", "ratio": 0.2, "checkpointing": "yes"}, "field 'checkpointing' is \"yes\", not true or false"),
    ({"method": "sparsegpt", "ratio": 0.2}, "--ratio does not apply to --method sparsegpt"),
])
def test_a_bad_recipe_file_is_one_line_naming_the_field(recipe, message, tmp_path):
    path = tmp_path / "hywia.json"
    path.write_text(json.dumps({"model": "tiny", "recipe": recipe}))
    with pytest.raises(HywiaError, match=message) as caught:
        Recipe.load(path)[0].check()
    assert "\n" not in str(caught.value)


def test_keywords_outside_the_recipe_are_refused_by_name(calib_ids):
    with pytest.raises(HywiaError, match="unknown prune option 'colour'"):
        prune(tiny_model(), method="element2", ratio=0.2, calib=calib_ids, colour="red")


def test_unstructured_pruning_takes_the_same_recipe(model_dir, text_dir, tmp_path, capsys):  # noqa: F811
    flags = ["--method", "sparsegpt", "--pattern", "2:4", "--calib", "wikitext2", "--samples", "2", "--seq-len", "32", "--seed", "3"]
    code, _, err = run(capsys, "prune", "--model", str(model_dir), *flags, "--data-dir", str(text_dir), "--out", str(tmp_path / "cli"))
    assert code == 0, err
    by_flags = load_file(tmp_path / "cli" / "model.safetensors")
    saved, _ = Recipe.load(tmp_path / "cli" / "hywia.json")
    assert saved == Recipe(method="sparsegpt", pattern="2:4", calib="wikitext2", samples=2, seq_len=32, seed=3).resolved()
    for how in ("keywords", "recipe"):
        model, tokenizer = load_model(str(model_dir), "float32", "cpu")
        if how == "keywords":
            _, report = sparsify(model, tokenizer, method="sparsegpt", pattern="2:4", calib="wikitext2", samples=2, seq_len=32, seed=3,
                                 data_dir=str(text_dir))
        else:
            _, report = sparsify(model, tokenizer, saved, data_dir=str(text_dir))
        assert report.recipe == saved and report.achieved_sparsity == pytest.approx(0.5, abs=1e-3)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        assert by_flags.keys() == state.keys() and all(torch.equal(by_flags[k], state[k]) for k in by_flags), how
    with pytest.raises(HywiaError, match="use hywia.prune"):
        sparsify(tiny_model(), method="element2", ratio=0.2)


def test_a_fine_tuning_replays_from_its_saved_recipe(text_dir, tokenizer, tmp_path, capsys):
    """`finetune --recipe FILE` takes the settings, data and teacher a recovered model recorded: the same weights;
    a flag given on the command line wins, and a bad field is one line naming it."""
    from hywia import save_model
    pruned, _ = prune(tiny_model(), method="l2", ratio=0.3)
    pruned_dir = save_model(pruned, tokenizer, tmp_path / "pruned", {})
    flags = ["--data", "wikitext2", "--data-dir", str(text_dir), "--tokens", "100", "--batch-size", "4",
             "--micro-batch-size", "2", "--cutoff-len", "24", "--lr", "1e-3", "--seed", "3"]
    code, _, err = run(capsys, "finetune", "--model", str(pruned_dir), *flags, "--out", str(tmp_path / "tuned"))
    assert code == 0, err
    recorded = json.loads((tmp_path / "tuned" / "hywia.json").read_text())["finetune"]["recipe"]
    assert recorded["seed"] == 3 and recorded["data"] == "wikitext2" and recorded["lr"] == 1e-3
    code, _, err = run(capsys, "finetune", "--model", str(pruned_dir), "--data-dir", str(text_dir),
                       "--recipe", str(tmp_path / "tuned" / "hywia.json"), "--out", str(tmp_path / "again"))
    assert code == 0, err
    a, b = load_file(tmp_path / "tuned" / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    code, _, err = run(capsys, "finetune", "--model", str(pruned_dir), "--data-dir", str(text_dir), "--recipe",
                       str(tmp_path / "tuned" / "hywia.json"), "--seed", "4", "--out", str(tmp_path / "other"))
    assert code == 0 and json.loads((tmp_path / "other" / "hywia.json").read_text())["finetune"]["recipe"]["seed"] == 4
    bad = json.loads((tmp_path / "tuned" / "hywia.json").read_text())
    bad["finetune"]["recipe"]["rank"] = "eight"
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    code, _, err = run(capsys, "finetune", "--model", str(pruned_dir), "--recipe", str(tmp_path / "bad.json"), "--out", str(tmp_path / "x"))
    assert code == 2 and "field 'rank' is \"eight\", not an integer" in err
