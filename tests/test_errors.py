"""Every bad input is one line before any work, nothing wrong is reported as a result, and nothing a user owns is
lost (docs/errors.md). A table of ordinary mistakes, each asserting exit code 2, one `hywia: error:` line, no
traceback, and a world (model, data, existing outputs) unchanged; then what the table cannot say: random option
values, unexpected errors, non-finite results, signals, stale temporary folders, concurrent writers."""
from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import redirect_stderr
from pathlib import Path

import pytest
import torch

from conftest import byte_tokenizer, tiny_model
from hywia import cli, save_model
from hywia.errors import HywiaError

INSTRUCTIONS = [{"instruction": f"Say {w}.", "input": "", "output": f"{w} {w}."} for w in ("yes", "no", "maybe", "again") * 3]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A folder of inputs a user owns: a tiny model, broken models, data files, an existing output."""
    root = tmp_path_factory.mktemp("world")
    tok = byte_tokenizer()
    model = save_model(tiny_model(), tok, root / "model", {"model": "tiny"})
    broken = tiny_model()
    with torch.no_grad():
        broken.model.layers[1].mlp.down_proj.weight[3, 5] = float("nan")
    _save_unchecked(broken, tok, root / "nan_model")
    overflowing = tiny_model()
    with torch.no_grad():
        overflowing.lm_head.weight.fill_(3e38)  # finite, but every logit overflows to inf
    _save_unchecked(overflowing, tok, root / "overflow_model")
    save_model(tiny_model(layers=2), tok, root / "two_layers", {"model": "tiny"})
    (root / "noweights").mkdir()
    (root / "noweights" / "config.json").write_text((model / "config.json").read_text())
    (root / "truncated").mkdir()
    for f in model.iterdir():
        data = f.read_bytes()
        (root / "truncated" / f.name).write_bytes(data[: len(data) // 2] if f.name == "model.safetensors" else data)
    (root / "text.gguf").write_text("this is not a GGUF file\n")
    (root / "notes.txt").write_text("a model is not a text file\n")
    (root / "binary.bin").write_bytes(bytes(range(256)) * 64)
    (root / "notext.jsonl").write_text("\n".join(json.dumps({"body": f"line {i}"}) for i in range(20)) + "\n")
    (root / "instructions.jsonl").write_text("\n".join(json.dumps(r) for r in INSTRUCTIONS) + "\n")
    (root / "badrecords.jsonl").write_text("\n".join(json.dumps({"prompt": "x"}) for _ in range(3)) + "\n")
    (root / "existing").mkdir()
    (root / "existing" / "user-file.txt").write_text("the user's work")
    (root / "afile").write_text("a file where a folder should be")
    (root / "adir").mkdir()
    (root / "link").symlink_to(root / "existing", target_is_directory=True)
    (root / "fake.parquet").write_text("PAR1 a text file named .parquet\n")
    small = tiny_model()
    small.resize_token_embeddings(200)  # the byte tokenizer has 256 bytes and its specials: more ids than rows
    save_model(small, tok, root / "small_vocab", {"model": "tiny"})
    _deci_gguf(root)
    for name, options in RECIPES.items():
        (root / "recipes" / name).mkdir(parents=True)
        options = {k: str(root / "model") if v == "{model}" else v for k, v in options.items()}
        (root / "recipes" / name / "hywia.json").write_text(json.dumps({"model": "tiny", "options": options, "extra": {}}))
    data = root / "data"
    words = ("the model prunes heads and channels while perplexity measures what was lost " * 60).split()
    lines = [" ".join(words[i:i + 12]) for i in range(0, len(words), 12)]
    (data / "wikitext2").mkdir(parents=True)
    (data / "ptb").mkdir()
    for name in ("wiki.valid.raw", "wiki.test.raw"):
        (data / "wikitext2" / name).write_text("".join(f" {line} \n" for line in lines))
    for name in ("ptb.valid.txt", "ptb.test.txt"):
        (data / "ptb" / name).write_text("\n".join(lines) + "\n")
    return root


RECIPE = {"model": "{model}", "method": "l2", "ratio": 0.2, "samples": 2, "seq_len": 16}
RECIPES = {"ratio out of range": {**RECIPE, "ratio": 1.5}, "ratio a word": {**RECIPE, "ratio": "abc"},
           "unknown field": {**RECIPE, "colour": "blue"}, "structured": RECIPE}


def _deci_gguf(root: Path) -> None:
    """A model with per-layer widths exported as llama.cpp's deci architecture, which transformers cannot read."""
    from hywia import prune
    from hywia.export import export_gguf
    tok = byte_tokenizer()
    folder = save_model(tiny_model(), tok, root / "deci_source", {"model": "tiny"})
    pruned, _ = prune(tiny_model(), method="l2", ratio=0.3, scope="global")
    export_gguf(pruned, root / "deci.gguf", "f32", source=str(folder))


def _save_unchecked(model, tokenizer, out: Path) -> None:
    """Save as a broken checkpoint would arrive: straight through transformers, past hywia's finiteness check."""
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("HYWIA_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))  # locks and logs, outside the world
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HYWIA_DATA_DIR", raising=False)


def run(argv: list[str]) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of `hywia ARGV` in this process (argparse's own exits included)."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stderr(err):
        from contextlib import redirect_stdout
        with redirect_stdout(out):
            try:
                code = cli.main(argv)
            except SystemExit as e:
                code = e.code
    return code, out.getvalue(), err.getvalue()


def assert_one_line_error(code: int, err: str, message: str, exit_code: int = 2) -> str:
    lines = [l for l in err.replace("\r", "\n").splitlines() if l.strip()]
    errors = [l for l in lines if l.startswith("hywia: error:")]
    assert "Traceback" not in err, err
    assert code == exit_code, err
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert message in errors[0], errors[0]
    return errors[0]


P = ["prune", "--model", "{model}", "--out", "{new}", "--data-dir", "{data}", "--samples", "2", "--seq-len", "16"]
E = ["eval", "ppl", "--model", "{model}", "--data-dir", "{data}", "--seq-len", "16", "--max-windows", "2"]
Z = ["eval", "zeroshot", "--model", "{model}", "--data-dir", "{data}"]
F = ["finetune", "--model", "{model}", "--out", "{new}", "--data", "{world}/instructions.jsonl", "--max-steps", "1",
     "--batch-size", "4", "--micro-batch-size", "2", "--cutoff-len", "32"]
B = ["bench", "speed", "--model", "{model}"]
R = ["--ratio", "0.2"]


def _recipe(name: str) -> list[str]:
    return ["prune", "--recipe", f"{{world}}/recipes/{name}/hywia.json", "--out", "{new}", "--data-dir", "{data}"]


CASES = {
    # ranges: nothing is loaded, 0 is a value, not "unset"
    "ratio above 1": (P + ["--ratio", "1.5"], "--ratio 1.5 is out of range"),
    "ratio 0": (P + ["--ratio", "0"], "--ratio 0.0 is out of range"),
    "ratio nan": (P + ["--ratio", "nan"], "--ratio nan is out of range"),
    "ratio not a number": (P + ["--ratio", "abc"], "argument --ratio: invalid float value: 'abc'"),
    "samples 0": (P + R + ["--samples", "0"], "--samples 0 is out of range"),
    "samples negative": (P + R + ["--samples", "-3"], "--samples -3 is out of range"),
    "seq-len 0": (P + R + ["--seq-len", "0"], "--seq-len 0 is out of range"),
    "seq-len 1": (P + R + ["--seq-len", "1"], "--seq-len 1 is out of range"),
    "prune batch-size 0": (P + R + ["--batch-size", "0"], "--batch-size 0 is out of range"),
    "seed negative": (P + R + ["--seed", "-1"], "--seed -1 is out of range"),
    "min-keep negative": (P + R + ["--min-keep", "-1"], "--min-keep -1 is out of range"),
    "round-to 0": (P + R + ["--round-to", "0"], "--round-to 0 is out of range"),
    "layers-per-pass 0": (P + R + ["--layers-per-pass", "0"], "--layers-per-pass 0 is out of range"),
    "alpha above 1": (P + R + ["--method", "hywia", "--fusion", "fixed", "--alpha", "2"], "--alpha 2.0 is out of range"),
    "fusion-dim 0": (P + R + ["--method", "hywia", "--fusion-dim", "0"], "--fusion-dim 0 is out of range"),
    "spread negative": (P + R + ["--method", "saap", "--spread", "-1"], "--spread -1.0 is out of range"),
    "wbits 1": (P + ["--method", "sparsegpt", "--sparsity", "0.5", "--wbits", "1"], "--wbits 1 is out of range"),
    # choices and method options
    "unknown method names both kinds": (P + R + ["--method", "taylor"], "unstructured: magnitude, sparsegpt"),
    "ratio with an unstructured method": (P + R + ["--method", "wanda", "--sparsity", "0.5"], "--ratio does not apply to --method wanda"),
    "sparsity missing": (P + ["--method", "sparsegpt"], "needs --sparsity"),
    "ratio missing": (P + ["--method", "element2"], "needs --ratio"),
    "attention unit": (P + R + ["--attention-unit", "heads"], "unknown --attention-unit 'heads'"),
    "kind split": (P + R + ["--kind-split", "half"], "unknown --kind-split 'half'"),
    "scope": (P + R + ["--scope", "everywhere"], "unknown scope 'everywhere'"),
    "target": (P + R + ["--target", "heads"], "unknown target 'heads'"),
    "stats dtype": (P + R + ["--stats-dtype", "int8"], "unknown --stats-dtype 'int8'"),
    "compensate": (P + R + ["--compensate", "maybe"], "argument --compensate: invalid choice: 'maybe'"),
    "reconstruct": (P + R + ["--reconstruct", "maybe"], "argument --reconstruct: invalid choice: 'maybe'"),
    "a newline in a value": (P + R + ["--calib", "wiki\ntext"], "unknown dataset 'wiki\\ntext'"),
    "a newline in a choice": (P + R + ["--compensate", "ye\ns"], "invalid choice: 'ye\\ns'"),
    "slimgpt without its reconstruction": (P + R + ["--method", "slimgpt", "--reconstruct", "no"], "leave out --reconstruct no"),
    "reconstruct samples": (P + R + ["--reconstruct", "obs", "--reconstruct-samples", "0"], "--reconstruct-samples 0"),
    "judge samples": (P + R + ["--kind-split", "evidence-best", "--judge-samples", "0"], "--judge-samples 0"),
    "one judge window": (P + R + ["--kind-split", "evidence-best", "--judge-samples", "1"], "a paired standard error needs two"),
    "judge samples without evidence-best": (P + R + ["--kind-split", "evidence", "--judge-samples", "50"], "add --kind-split evidence-best, or leave --judge-samples out"),
    "reconstruct samples without a reconstruction": (P + R + ["--method", "element2", "--reconstruct-samples", "64"],
                                                     "--method element2 does not reconstruct here: add --reconstruct obs"),
    "judge samples with an unstructured method": (P + ["--method", "wanda", "--sparsity", "0.5", "--judge-samples", "10"],
                                                  "--judge-samples does not apply to --method wanda"),
    "reconstruct with an unstructured method": (P + ["--method", "wanda", "--sparsity", "0.5", "--reconstruct", "yes"],
                                                "--reconstruct does not apply to --method wanda"),
    "dtype": (P + R + ["--dtype", "float8"], "unknown --dtype 'float8'"),
    "layers syntax": (P + R + ["--layers", "abc"], "--layers 'abc' is not START:END"),
    "device unknown": (P + R + ["--device", "banana"], "unknown --device 'banana'"),
    "out missing": (["prune", "--model", "{model}", "--ratio", "0.2"], "the following arguments are required: --out"),
    "command unknown": (["frobnicate"], "invalid choice: 'frobnicate'"),
    # paths: the model, data and output, before anything is loaded
    "model path missing": (["prune", "--model", "/no/such/model", "--out", "{new}"] + R, "cannot load model '/no/such/model': not found"),
    "model without weights": (P + R + ["--model", "{world}/noweights"], "has a config.json but no weights"),
    "model truncated": (P + R + ["--model", "{world}/truncated"], "model.safetensors is truncated or corrupt"),
    "text file named .gguf": (P + R + ["--model", "{world}/text.gguf"], "text.gguf is not a GGUF file"),
    "text file as model": (P + R + ["--model", "{world}/notes.txt"], "a model file must be a .gguf file"),
    "model NUL byte": (P + R + ["--model", "a\x00b"], "holds a NUL character"),
    "calib file missing": (P + R + ["--calib", "/no/such/file.txt"], "unknown dataset '/no/such/file.txt'"),
    "calib folder": (P + R + ["--calib", "{world}/adir"], "is a folder"),
    "data dir missing": (P + R + ["--data-dir", "/no/such/dir"], "data dir /no/such/dir does not exist"),
    "data dir is a file": (P + R + ["--data-dir", "{world}/afile"], "afile is a file, not a folder"),
    "calib split not in the data dir": (P + R + ["--calib", "c4"], "--calib c4: its train or validation split is not in data dir"),
    "judge text not in the data dir": (P + R + ["--judge-calib", "c4"], "--judge-calib c4: its train or validation split is not in data dir"),
    "out exists": (P + R + ["--out", "{world}/existing"], "already exists; pass --overwrite"),
    "out under a file": (P + R + ["--out", "{world}/afile/pruned"], "is a file, not a folder"),
    "out not writable": (P + R + ["--out", "/proc/hywia-out"], "cannot write in /proc"),
    "out is the input": (P + R + ["--out", "{model}", "--overwrite"], "would replace or write into the input"),
    "out inside the input": (P + R + ["--out", "{model}/pruned"], "would replace or write into the input"),
    # what needs the config, before the weights
    "seq-len beyond the context": (P + R + ["--seq-len", "100000"], "--seq-len 100000 is longer than the model's context (256 tokens)"),
    "layers select nothing": (P + R + ["--layers", "5:1"], "--layers '5:1' selects no layer of this 3-layer model"),
    # what needs the weights or the data, before any result
    "NaN weights, prune": (P + R + ["--model", "{world}/nan_model"], "tensor model.layers.1.mlp.down_proj.weight holds 1 non-finite"),
    "binary calibration file": (P + R + ["--calib", "{world}/binary.bin"], "binary.bin is not UTF-8 text"),
    "jsonl without text": (P + R + ["--calib", "{world}/notext.jsonl"], "has no 'text' field (it has: body)"),
    # eval ppl and zeroshot
    "max-windows negative": (E + ["--max-windows", "-1"], "--max-windows -1 is out of range"),
    "max-windows 0": (E + ["--max-windows", "0"], "--max-windows 0 is out of range"),
    "eval batch-size 0": (E + ["--batch-size", "0"], "--batch-size 0 is out of range"),
    "protocol": (E + ["--protocol", "wanda"], "unknown --protocol 'wanda'"),
    "bos": (E + ["--bos", "maybe"], "unknown --bos 'maybe'"),
    "eval data unknown": (E + ["--data", "nosuchset"], "unknown dataset 'nosuchset'"),
    "eval split not in the data dir": (E + ["--data", "wikitext2", "c4"], "--data c4: its test split is not in data dir"),
    "eval seq-len beyond the context": (E + ["--seq-len", "100000"], "longer than the model's context"),
    "NaN weights, eval": (E + ["--model", "{world}/nan_model"], "tensor model.layers.1.mlp.down_proj.weight"),
    "logits overflow, eval": (E + ["--model", "{world}/overflow_model"], "wikitext2: the loss of window 0"),
    "zeroshot limit 0": (Z + ["--limit", "0"], "--limit 0 is out of range"),
    "zeroshot task": (Z + ["--tasks", "mmlu"], "unknown task 'mmlu'"),
    "zeroshot no task": (Z + ["--tasks", ","], "--tasks is empty"),
    "hellaswag case": (Z + ["--hellaswag-case", "lower"], "unknown --hellaswag-case 'lower'"),
    # finetune
    "finetune batch-size 0": (F + ["--batch-size", "0"], "--batch-size 0 is out of range"),
    "finetune micro-batch-size 0": (F + ["--micro-batch-size", "0"], "--micro-batch-size 0 is out of range"),
    "finetune rank 0": (F + ["--rank", "0"], "--rank 0 is out of range"),
    "finetune epochs 0": (F + ["--epochs", "0"], "--epochs 0 is out of range"),
    "finetune lr 0": (F + ["--lr", "0"], "--lr 0.0 is out of range"),
    "finetune dropout 1": (F + ["--lora-dropout", "1"], "--lora-dropout 1.0 is out of range"),
    "finetune max-records 0": (F + ["--max-records", "0"], "--max-records 0 is out of range"),
    "finetune save-steps 0": (F + ["--save-steps", "0"], "--save-steps 0 is out of range"),
    "finetune cutoff beyond the context": (F + ["--cutoff-len", "100000"], "--cutoff-len 100000 is longer than the model's context"),
    "finetune groups beyond the layers": (F + ["--groups", "9"], "--groups 9 is more than the model's 3 decoder layers"),
    "finetune malformed records": (F[:5] + ["--data", "{world}/badrecords.jsonl"], "record 0 of"),
    "finetune data folder": (F[:5] + ["--data", "{world}/adir"], "adir is a folder"),
    "finetune binary data": (F[:5] + ["--data", "{world}/binary.bin"], "binary.bin is not UTF-8 text"),
    "finetune checkpoint dir is a file": (F + ["--checkpoint-dir", "{world}/afile"], "--checkpoint-dir"),
    "finetune NaN weights": (F + ["--model", "{world}/nan_model"], "non-finite"),
    "finetune trainables": (F + ["--train", "everything"], "unknown --train 'everything'"),
    "finetune tokens 0": (F[:-8] + ["--tokens", "0"], "--tokens 0 is out of range"),
    "finetune tokens and max-steps": (F + ["--tokens", "100"], "--tokens and --max-steps both set the run's length"),
    "finetune fsdp in one process": (F + ["--fsdp"], "--fsdp shards the weights over the processes accelerate starts"),
    "finetune fsdp trains everything": (F + ["--fsdp", "--train", "full"], "--fsdp shards the frozen weights, and --train full freezes none"),
    "finetune fsdp on a device map": (F + ["--fsdp", "--device", "auto"], "--fsdp puts each process's part of the weights on one device"),
    "finetune temperature 0": (F + ["--kd-temperature", "0"], "--kd-temperature 0.0 is out of range"),
    "finetune teacher missing": (F + ["--teacher", "/no/such/teacher"], "cannot load model '/no/such/teacher': not found"),
    "finetune teacher of another shape": (F + ["--teacher", "{world}/two_layers"], "the teacher's num_hidden_layers is 2"),
    "finetune eval-every without validation text": (F + ["--eval-every", "1", "--data-dir", "{world}/adir"],
                                                     "--eval-every wikitext2: its validation split is not in data dir"),
    "finetune kd-temperature without a teacher": (F + ["--kd-temperature", "2"], "--kd-temperature sets distillation from a "
                                                  "teacher, and this run has none: add --teacher"),
    "finetune kd-hidden without a teacher": (F + ["--kd-hidden", "1"], "--kd-hidden sets distillation from a teacher"),
    # what a message must not get wrong, and what must not wait for the work
    "out is a symbolic link": (P + R + ["--out", "{world}/link", "--overwrite"], "is a symbolic link (to "),
    "stats-device unknown": (P + R + ["--stats-device", "gpu0"], "unknown --stats-device 'gpu0'"),
    "calib named .parquet, not Parquet": (P + R + ["--calib", "{world}/fake.parquet"], "fake.parquet is not a Parquet file"),
    "recipe value out of range": (_recipe("ratio out of range"), "ratio out of range/hywia.json sets --ratio 1.5: --ratio 1.5 is out of range"),
    "recipe value of the wrong type": (_recipe("ratio a word"), "ratio a word/hywia.json: field 'ratio' is \"abc\", not a number"),
    "recipe unknown field": (_recipe("unknown field"), "unknown field 'colour' in options"),
    "structured recipe, unstructured method": (_recipe("structured") + ["--method", "sparsegpt", "--sparsity", "0.5"],
                                               "replays a structured prune (--method l2), and --method sparsegpt is an unstructured one"),
    "eval a deci GGUF in transformers": (E[:3] + ["{world}/deci.gguf"] + E[4:], "llama.cpp's 'deci' architecture, which transformers cannot load"),
    "eval llama.cpp backend on a folder": (E + ["--backend", "llama.cpp"], "--backend llama.cpp runs a .gguf file"),
    "eval llama.cpp backend with a dtype": (E[:3] + ["{world}/deci.gguf"] + E[4:] + ["--backend", "llama.cpp", "--dtype", "bfloat16"],
                                            "--dtype bfloat16 does not apply to --backend llama.cpp"),
    "eval backend unknown": (E + ["--backend", "onnx"], "unknown --backend 'onnx'"),
    "export tokenizer beyond the embedding": (["export", "--model", "{world}/small_vocab", "--out", "{new}.gguf"],
                                              "beyond the model's 200 embedding rows"),
    "export pad-to 0": (["export", "--model", "{world}/deci_source", "--out", "{new}.gguf", "--pad-to", "0"], "--pad-to 0 must be at least 1"),
    "bench new-tokens 1": (B + ["--new-tokens", "1"], "--new-tokens 1 is out of range: give an integer with x >= 2"),
    # bench
    "bench batch sizes 0": (B + ["--batch-sizes", "0"], "--batch-sizes '0'"),
    "bench batch sizes words": (B + ["--batch-sizes", "a,b"], "--batch-sizes 'a,b'"),
    "bench repeats 0": (B + ["--repeats", "0"], "--repeats 0 is out of range"),
}
if torch.cuda.is_available():
    del CASES["device unknown"]
else:
    CASES["device cuda without CUDA"] = (P + R + ["--device", "cuda"], "no CUDA device is available here")
    CASES["stats-device cuda without CUDA"] = (P + R + ["--stats-device", "cuda"], "--stats-device cuda: no CUDA device is available here")


def _argv(template: list[str], world: Path, new: Path) -> list[str]:
    values = {"model": str(world / "model"), "data": str(world / "data"), "world": str(world), "new": str(new)}
    return [a.format(**values) if "{" in a else a for a in template]



@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_line_and_changes_nothing(world, tmp_path, name):
    template, message = CASES[name]
    before = snapshot(world)
    code, stdout, err = run(_argv(template, world, world / "new-output"))
    assert_one_line_error(code, err, message)
    assert stdout == ""
    assert snapshot(world) == before  # inputs untouched, the existing output unchanged, no new output


def test_the_table_is_large():
    assert len(CASES) >= 40


def test_help_renders(capsys):
    """Help text with a literal % (argparse formats help with %) prints instead of raising."""
    for command in (["prune"], ["finetune"], ["eval", "ppl"], ["eval", "zeroshot"], ["bench", "speed"]):
        code, stdout, err = run(command + ["--help"])
        assert code == 0 and "usage:" in stdout and "Traceback" not in err


# random option values at the argument layer: accepted, or refused in one line

def _values():
    from hypothesis import strategies as st
    return st.one_of(st.integers(-3, 10**7).map(str), st.floats(allow_nan=True, allow_infinity=True).map(str),
                     st.text(max_size=12), st.sampled_from(["", "0", "-1", "1", "0.5", "nan", "inf", "1e309", "2:4", "query", "evidence",
                                                            "layer", "global", "joint", "yes", "cpu", "wikitext2", "4:8", "1:0"]))


PRUNE_OPTIONS = ("--method", "--ratio", "--sparsity", "--pattern", "--calib", "--samples", "--seq-len", "--scope", "--target",
                 "--layers", "--attention-unit", "--kind-split", "--compensate", "--reconstruct", "--reconstruct-samples", "--judge-samples", "--min-keep", "--seed", "--round-to",
                 "--batch-size", "--fusion", "--alpha", "--fusion-dim", "--normalize", "--spread", "--granularity",
                 "--sensitivity-samples", "--wbits", "--layers-per-pass", "--stats-dtype", "--stats-device", "--dtype", "--device")
FINETUNE_OPTIONS = ("--rank", "--lora-alpha", "--lora-dropout", "--lr", "--batch-size", "--micro-batch-size", "--epochs", "--max-steps",
                    "--max-records", "--warmup-steps", "--cutoff-len", "--save-steps", "--seed", "--groups", "--data")
EVAL_OPTIONS = ("--protocol", "--seq-len", "--bos", "--max-windows", "--batch-size", "--data")


def parsed_or_one_line(argv: list[str], context=None) -> None:
    """`cli.parse(argv)` accepts the arguments, or refuses them in one `hywia: error:` line (exit code 2)."""
    context = argv if context is None else context
    err = io.StringIO()
    with redirect_stderr(err):
        try:
            cli.parse(argv)
        except HywiaError as e:
            assert "\n" not in str(e) and str(e), context
        except SystemExit as e:
            assert e.code == 2, context
            lines = err.getvalue().strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("hywia: error:"), (context, lines)


def test_random_option_values_are_accepted_or_one_line(world):
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import strategies as st

    commands = {"prune": (["prune", "--model", str(world / "model"), "--out", str(world / "hyp-out")], PRUNE_OPTIONS),
                "finetune": (["finetune", "--model", str(world / "model"), "--out", str(world / "hyp-out")], FINETUNE_OPTIONS),
                "eval": (["eval", "ppl", "--model", str(world / "model")], EVAL_OPTIONS)}
    before = snapshot(world)

    @hypothesis.settings(max_examples=300, deadline=None, suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(st.sampled_from(sorted(commands)), st.data())
    def check(command: str, data) -> None:
        base, options = commands[command]
        chosen = data.draw(st.lists(st.tuples(st.sampled_from(options), _values()), max_size=5))
        parsed_or_one_line(base + [item for option, value in chosen for item in (option, value)])

    check()
    assert snapshot(world) == before


def test_random_recipe_files_are_accepted_or_one_line(world, tmp_path):
    """A hywia.json edited by hand (or by another tool) is an input like a command line: any field, any JSON value."""
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import strategies as st

    names = [o.removeprefix("--").replace("-", "_") for o in PRUNE_OPTIONS] + ["model", "colour", "out", "recipe"]
    json_values = st.one_of(st.none(), st.booleans(), st.integers(-3, 10**6), st.floats(allow_nan=False), st.text(max_size=8),
                            st.sampled_from(["l2", "element2", "sparsegpt", "0.2", "layer", "evidence", "yes", "obs"]),
                            st.lists(st.integers(), max_size=2))
    recipe = tmp_path / "hywia.json"
    before = snapshot(world)

    @hypothesis.settings(max_examples=200, deadline=None, suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(st.dictionaries(st.sampled_from(names), json_values, max_size=6), st.booleans())
    def check(options: dict, with_method: bool) -> None:
        recipe.write_text(json.dumps({"model": "tiny", "options": {"model": str(world / "model"), **options}, "extra": {}}))
        parsed_or_one_line(["prune", "--recipe", str(recipe), "--out", str(world / "hyp-out")] + (["--method", "wanda"] if with_method else []),
                           options)

    check()
    assert snapshot(world) == before


# what the table cannot say

def test_unexpected_errors_are_one_line_with_the_traceback_in_a_log(world, tmp_path, monkeypatch):
    def broken(args):
        raise ZeroDivisionError("a bug somewhere deep")
    monkeypatch.setattr(cli, "_eval", broken)
    code, _, err = run(_argv(E, world, tmp_path / "x"))
    line = assert_one_line_error(code, err, "unexpected ZeroDivisionError: a bug somewhere deep", exit_code=1)
    log = Path(line.split("the traceback is in ")[1].split(";")[0])
    assert "Traceback" in log.read_text() and "a bug somewhere deep" in log.read_text()
    code, _, err = run(_argv(E, world, tmp_path / "x") + ["--debug"])
    assert code == 1 and "Traceback" in err and err.strip().splitlines()[-1].startswith("hywia: error: unexpected ZeroDivisionError")


def test_json_never_carries_a_non_finite_number():
    with pytest.raises(HywiaError, match=r"result.ppl.wikitext2.ppl is not a finite number"):
        cli._json({"ppl": {"wikitext2": {"ppl": float("nan")}}})
    assert json.loads(cli._json({"ppl": [1.5, {"x": 2}]})) == {"ppl": [1.5, {"x": 2}]}


def test_save_refuses_non_finite_weights(tmp_path, tokenizer):
    model = tiny_model()
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("inf")
    with pytest.raises(HywiaError, match="tensor lm_head.weight holds 1 non-finite"):
        save_model(model, tokenizer, tmp_path / "out", {})
    assert list(tmp_path.iterdir()) == []


def test_the_finite_check_counts_and_places_bad_values_across_its_chunks(monkeypatch):
    """The check reads a tensor a chunk at a time (no whole-tensor copies); every bad value still counts and the
    first one is placed by its flat index, in whichever chunk it falls."""
    from hywia import finite
    monkeypatch.setattr(finite, "CHUNK", 7)
    weight = torch.zeros(6, 5)
    finite.check_tensor(weight, "w", "fix")
    weight.view(-1)[[9, 16, 29]] = torch.tensor([float("nan"), float("inf"), float("-inf")])
    with pytest.raises(HywiaError, match=r"^w holds 3 non-finite value\(s\) \(NaN or inf\), the first at flat index 9: fix$"):
        finite.check_tensor(weight, "w", "fix")
    with pytest.raises(HywiaError, match="holds 2 non-finite value.*index 1:"):
        finite.check_tensor(weight[:, 4], "w", "fix")  # a strided view: column 4 holds flat 9 and 29 as its rows 1 and 5


def test_prune_refuses_non_finite_scores(tiny, tokenizer, calib_ids, monkeypatch):
    """A criterion whose statistics overflow stops the run naming the layer, instead of ranking NaN."""
    import dataclasses

    import hywia
    from hywia.importance import CRITERIA
    original = CRITERIA["l2"].score

    def poisoned(sets, stats, options):
        scores = original(sets, stats, options)
        scores.per_set[2][0] = float("nan")
        return scores
    monkeypatch.setitem(CRITERIA, "l2", dataclasses.replace(CRITERIA["l2"], score=poisoned))
    with pytest.raises(HywiaError, match=r"the l2 scores of layer 1 \(\w+\) holds 1 non-finite"):
        hywia.prune(tiny, tokenizer, method="l2", ratio=0.2, calib=calib_ids)


def test_api_refuses_zero_instead_of_defaulting(tiny, tokenizer, calib_ids):
    import hywia
    with pytest.raises(HywiaError, match="--samples 0 is out of range"):
        hywia.prune(tiny, tokenizer, method="element2", ratio=0.2, calib="wikitext2", samples=0)
    with pytest.raises(HywiaError, match="--max-windows 0 is out of range"):
        hywia.perplexity(tiny, tokenizer, "wikitext2", max_windows=0)


def test_checkpoint_dir_keeps_the_users_files(world, tmp_path):
    """hywia removes the checkpoints it wrote after a finished run, never a folder's other contents, and removes
    the folder only when it created it."""
    mine = tmp_path / "mywork"
    mine.mkdir()
    (mine / "notes.md").write_text("my notes")
    code, _, err = run(_argv(F, world, tmp_path / "tuned") + ["--checkpoint-dir", str(mine), "--save-steps", "1"])
    assert code == 0, err
    assert sorted(p.name for p in mine.iterdir()) == ["notes.md"] and (mine / "notes.md").read_text() == "my notes"
    code, _, err = run(_argv(F, world, tmp_path / "tuned2") + ["--save-steps", "1"])
    assert code == 0, err
    assert not (tmp_path / "tuned2.checkpoints").exists() and (tmp_path / "tuned2" / "model.safetensors").is_file()


@pytest.mark.parametrize("method, checkpoint", [("element2", False), ("slimgpt", True)])
def test_sigterm_while_saving_leaves_no_output_and_names_what_a_rerun_can_use(method, checkpoint, world, tmp_path, monkeypatch):
    """A `kill` during saving: one line, exit 143, no output and no temporary folder beside it; a reconstructing
    prune keeps its stages before the build in OUT.checkpoints (hywia's marker and split.pt, nothing half-written),
    and the line says so and names --resume."""
    import hywia.figures

    def killed(tmp, report):
        (tmp / "half-written").write_text("x")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises here, at the next bytecode
    monkeypatch.setattr(hywia.figures, "write_artifacts", killed)
    out = tmp_path / "out"
    code, _, err = run(_argv(P + R, world, out) + ["--method", method])
    line = "hywia: interrupted (SIGTERM); no output was written"
    if checkpoint:
        line += f"; the prune's calibration, scores and split are in {out}.checkpoints: run the same command with --resume to continue from its build"
    assert code == 128 + signal.SIGTERM and err.strip().splitlines()[-1] == line
    assert [p.name for p in tmp_path.iterdir()] == (["out.checkpoints"] if checkpoint else [])
    if checkpoint:
        assert sorted(p.name for p in (tmp_path / "out.checkpoints").iterdir()) == [".hywia-checkpoints", "split.pt"]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored for whoever called main()


def test_signals_during_the_swap_wait_for_it(tmp_path):
    """The rename pair that replaces an existing output is never cut in half: a signal in it acts after it."""
    from hywia.outputs import atomic_dir
    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("old")
    previous = signal.signal(signal.SIGTERM, lambda s, f: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        import hywia.outputs as hio
        original = hio.shutil.rmtree

        def rmtree_with_signal(path, *a, **k):
            if ".hywia-" in str(path) and str(path).endswith("old"):
                os.kill(os.getpid(), signal.SIGTERM)  # arrives between the two renames' completion and the cleanup
            return original(path, *a, **k)
        hio.shutil.rmtree = rmtree_with_signal
        with pytest.raises(KeyboardInterrupt):
            with atomic_dir(out, overwrite=True) as tmp:
                (tmp / "new").write_text("new")
    finally:
        hio.shutil.rmtree = original
        signal.signal(signal.SIGTERM, previous)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and sorted(p.name for p in out.iterdir()) == ["new"]


def test_kill_at_any_time_leaves_a_whole_output_or_none(world, tmp_path):
    """`hywia prune` in a child process, sent SIGTERM at several moments: afterwards the output is absent or
    complete, nothing else is beside it, and stderr ends in one line (or is empty if Python had not started hywia)."""
    env = {**os.environ, "HYWIA_CACHE_DIR": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    for i, delay in enumerate((1.0, 4.0, 6.0, 8.0)):
        folder = tmp_path / f"run{i}"
        folder.mkdir()
        argv = _argv(P + R, world, folder / "out")
        child = subprocess.Popen([sys.executable, "-m", "hywia.cli", *argv], env=env, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        time.sleep(delay)
        child.send_signal(signal.SIGTERM)
        _, err = child.communicate(timeout=120)
        names = sorted(p.name for p in folder.iterdir())
        assert names in ([], ["out"], ["out.checkpoints"]), names  # the last: killed in its walks, resumable
        if "out" in names:
            assert {"config.json", "model.safetensors", "hywia.json"} <= {p.name for p in (folder / "out").iterdir()}
        if "out.checkpoints" in names:
            assert sorted(p.name for p in (folder / "out.checkpoints").iterdir()) == [".hywia-checkpoints", "split.pt"]
            assert "--resume" in err.strip().splitlines()[-1]
        assert "Traceback" not in err, err
        if child.returncode == 128 + signal.SIGTERM:
            assert err.strip().splitlines()[-1].startswith("hywia: interrupted (SIGTERM)")
        else:
            assert child.returncode in (0, -signal.SIGTERM), (child.returncode, err)


def test_stale_temporary_folders_are_named_and_removed(tmp_path, tokenizer, recwarn):
    out = tmp_path / "out"
    dead = tmp_path / ".out.hywia-999999999-abc123.tmp"  # no such pid
    alive = tmp_path / f".out.hywia-{os.getppid()}-xyz.tmp"  # a live process's: maybe writing right now
    for folder in (dead, alive):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half")
    save_model(tiny_model(), tokenizer, out, {})
    assert not dead.exists() and alive.exists() and (out / "model.safetensors").is_file()
    assert any(str(dead) in str(w.message) and "killed" in str(w.message) for w in recwarn)


def test_a_second_writer_of_the_same_output_is_refused(world, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "HYWIA_CACHE_DIR": str(tmp_path / "cache")}
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom hywia.outputs import claim_output\n"
                               f"with claim_output({str(out)!r}):\n    print('held', flush=True)\n    time.sleep(60)"],
                              env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        os.environ["HYWIA_CACHE_DIR"] = env["HYWIA_CACHE_DIR"]  # the fixture's monkeypatch restores it
        code, _, err = run(_argv(P + R, world, out))
        assert_one_line_error(code, err, f"another hywia process (pid {holder.pid}) is writing {out}")
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    code, _, err = run(_argv(P + R, world, out))  # the lock dies with its process
    assert code == 0, err


def test_a_signal_that_lands_in_a_finalizer_is_not_lost():
    """Python drops an exception raised in `__del__`; a SIGTERM arriving there is sent again a moment later."""
    from hywia.errors import Interrupted

    class Finalized:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # the handler runs here, inside __del__
                pass

    err = io.StringIO()
    with redirect_stderr(err), pytest.raises(Interrupted), cli._signals_interrupt():
        thing = Finalized()
        del thing
        time.sleep(2)  # the re-sent signal arrives here
    assert "Exception ignored" not in err.getvalue()
