"""LoRA recovery: exact resume after a kill, merged model reload in a fresh process, malformed data named."""
from __future__ import annotations

import copy
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import tiny_model
from hywia import HywiaError, prune, save_model
from hywia.finetune import FinetuneSettings, finetune, load_instructions, merge
from test_io import IDS, fresh_process_logits

RECORDS = [{"instruction": f"Repeat the number {i}.", "input": "" if i % 2 else f"n={i}", "output": f"{i} {i} {i}"} for i in range(24)]
SETTINGS = FinetuneSettings(batch_size=8, micro_batch_size=3, max_steps=6, save_steps=1, warmup_steps=2, cutoff_len=64, lr=1e-3)


@pytest.fixture
def alpaca_file(tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(RECORDS))
    return path


def lora_state(peft_model):
    return {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_" in n}


def test_resume_after_interruption_equals_uninterrupted(alpaca_file, tokenizer, tmp_path):
    base, _ = prune(tiny_model(), method="l2", ratio=0.3, scope="global")  # heterogeneous widths, as recovery sees them
    whole, report = finetune(copy.deepcopy(base), tokenizer, str(alpaca_file), SETTINGS)
    assert report.steps == 6 and report.resumed_from == 0
    ckpt = tmp_path / "ckpt"
    finetune(copy.deepcopy(base), tokenizer, str(alpaca_file), SETTINGS, ckpt, stop_after=4)
    with pytest.raises(HywiaError, match="--resume"):
        finetune(copy.deepcopy(base), tokenizer, str(alpaca_file), SETTINGS, ckpt)
    resumed, report = finetune(copy.deepcopy(base), tokenizer, str(alpaca_file), SETTINGS, ckpt, resume=True)
    assert report.resumed_from == 4 and report.steps == 6
    a, b = lora_state(whole), lora_state(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in a.items() if "lora_B" in k)  # it did train


def test_resume_refuses_other_settings(alpaca_file, tokenizer, tmp_path):
    finetune(tiny_model(), tokenizer, str(alpaca_file), SETTINGS, tmp_path / "c", stop_after=1)
    other = FinetuneSettings(**{**SETTINGS.__dict__, "lr": 5e-4})
    with pytest.raises(HywiaError, match="other settings"):
        finetune(tiny_model(), tokenizer, str(alpaca_file), other, tmp_path / "c", resume=True)


@pytest.mark.parametrize("method, scope", [("l2", "global"), ("flap", "joint")])  # flap: o_proj/down_proj gained biases
def test_merged_model_reloads_in_fresh_process(method, scope, alpaca_file, tokenizer, tmp_path, calib_ids):
    base, _ = prune(tiny_model(), method=method, ratio=0.3, scope=scope, calib=calib_ids)
    peft_model, _ = finetune(base, tokenizer, str(alpaca_file), FinetuneSettings(**{**SETTINGS.__dict__, "max_steps": 2}))
    with torch.no_grad():
        adapted = peft_model(input_ids=IDS).logits
    merged = merge(peft_model)
    with torch.no_grad():
        in_memory = merged(input_ids=IDS).logits
    assert torch.allclose(adapted, in_memory, atol=1e-5)
    out = save_model(merged, tokenizer, tmp_path / "tuned", {})
    assert torch.allclose(fresh_process_logits(out, "remote", tmp_path), in_memory, atol=1e-6)


@pytest.mark.parametrize("body, message", [
    ('[{"instruction": "a", "output": "b"}, {"instruction": "c"}]', "record 1 of"),
    ('[{"instruction": "a", "output": 3}]', "record 0 of"),
    ('{"instruction": "a", "output": "b"}\n{broken', "not valid JSON"),
    ('[]', "no records"),
])
def test_malformed_instruction_files_are_named(tmp_path, body, message):
    path = tmp_path / "d.jsonl"
    path.write_text(body)
    with pytest.raises(HywiaError, match=message):
        load_instructions(str(path))


def test_cli_killed_run_resumes_to_the_same_model(alpaca_file, tokenizer, tmp_path):
    """A real SIGKILL mid-run, then --resume: the merged model equals an uninterrupted run's."""
    model_dir = save_model(tiny_model(), tokenizer, tmp_path / "base", {})
    common = [sys.executable, "-m", "hywia.cli", "finetune", "--model", str(model_dir), "--data", str(alpaca_file),
              "--batch-size", "8", "--micro-batch-size", "3", "--max-steps", "40", "--save-steps", "1", "--warmup-steps", "2",
              "--cutoff-len", "64", "--lr", "1e-3"]
    subprocess.run(common + ["--out", str(tmp_path / "whole")], check=True, capture_output=True)
    ckpt = tmp_path / "ckpt"
    proc = subprocess.Popen(common + ["--out", str(tmp_path / "killed"), "--checkpoint-dir", str(ckpt)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while not any(int(p.stem.split("-")[1]) >= 3 for p in ckpt.glob("step-*.pt")) and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed").exists()  # nothing half-written
    step = max(int(p.stem.split("-")[1]) for p in ckpt.glob("step-*.pt"))
    assert 3 <= step < 40, step
    done = subprocess.run(common + ["--out", str(tmp_path / "killed"), "--checkpoint-dir", str(ckpt), "--resume", "--json"],
                          check=True, capture_output=True, text=True)
    assert json.loads(done.stdout.splitlines()[-1])["resumed_from"] == step
    from safetensors.torch import load_file
    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "killed" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "killed" / "adapter" / "adapter_config.json").exists()


def _cli_finetune(model_dir, alpaca_file, out, *extra):
    return subprocess.run([sys.executable, "-m", "hywia.cli", "finetune", "--model", str(model_dir), "--data", str(alpaca_file),
                           "--batch-size", "8", "--micro-batch-size", "4", "--max-steps", "6", "--warmup-steps", "1",
                           "--cutoff-len", "64", "--out", str(out), "--json", *extra], capture_output=True, text=True)


def test_bfloat16_recovery_merges_into_the_stored_float32_and_lowers_the_loss(alpaca_file, tokenizer, tmp_path):
    model_dir = save_model(prune(tiny_model(), method="l2", ratio=0.3)[0], tokenizer, tmp_path / "base", {})
    done = _cli_finetune(model_dir, alpaca_file, tmp_path / "tuned", "--dtype", "bfloat16", "--lr", "3e-3", "--max-records", "16")
    assert done.returncode == 0, done.stderr[-1500:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["compute_dtype"] == "bfloat16" and result["data"]["records"] == 16
    assert result["guard"]["after"] < result["guard"]["before"]
    from safetensors.torch import load_file
    weights = load_file(tmp_path / "tuned" / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in weights.values())  # merged at the checkpoint's dtype, not bf16
    assert (tmp_path / "tuned" / "loss.png").stat().st_size > 1000


def test_float16_trains_in_bfloat16_and_a_diverging_run_saves_nothing(alpaca_file, tokenizer, tmp_path):
    with pytest.warns(UserWarning, match="bfloat16 instead"):
        _, report = finetune(tiny_model().half(), tokenizer, str(alpaca_file), FinetuneSettings(**{**SETTINGS.__dict__, "max_steps": 2}))
    assert report.compute_dtype == "bfloat16" and all(math.isfinite(l) for l in report.losses)
    model_dir = save_model(tiny_model(), tokenizer, tmp_path / "base", {})
    done = _cli_finetune(model_dir, alpaca_file, tmp_path / "tuned", "--lr", "50")
    assert done.returncode == 2 and not (tmp_path / "tuned").exists()
    errors = [l for l in done.stderr.splitlines() if l.startswith("hywia: error:")]
    assert len(errors) == 1 and ("worse" in errors[0] or "loss became" in errors[0]) and "Traceback" not in done.stderr
