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
from pathlib import Path

import pytest
import torch

from conftest import tiny_model
from hywia import HywiaError, prune, save_model
from hywia.finetune import FinetuneSettings, finetune, merge
from hywia.instructions import load_instructions
from test_io import IDS, fresh_process_logits, logits

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
    in_memory = logits(merged)  # on one thread, as the fresh process computes them
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
    assert result["compute_dtype"] == "bfloat16" and result["data"]["records"] == result["data"]["trained"] == 16
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


# distillation from the dense model

TEXT_SETTINGS = FinetuneSettings(batch_size=4, micro_batch_size=2, max_steps=8, save_steps=1, warmup_steps=1, cutoff_len=24, lr=5e-3)


def _kl_to_teacher(student, teacher, ids) -> float:
    from hywia.distill import Distillation, distillation_loss
    with torch.no_grad():
        return distillation_loss(student, teacher, ids, torch.ones_like(ids), Distillation()).item() / ids[:, 1:].numel()


def test_distillation_loss_is_zero_for_the_teacher_itself_and_grows_with_pruning(calib_ids):
    from hywia.distill import Distillation, distillation_loss
    teacher = tiny_model()
    mask = torch.ones_like(calib_ids)
    same = distillation_loss(copy.deepcopy(teacher), teacher, calib_ids, mask, Distillation(temperature=2.0, hidden=1.0))
    assert same.item() == pytest.approx(0.0, abs=1e-4)
    student, _ = prune(copy.deepcopy(teacher), method="l2", ratio=0.4)
    logits_only = distillation_loss(student, teacher, calib_ids, mask, Distillation()).item()
    with_hidden = distillation_loss(student, teacher, calib_ids, mask, Distillation(hidden=1.0)).item()
    assert logits_only > 0 and with_hidden > logits_only


def test_distillation_moves_the_student_towards_the_teacher(text_dir, tokenizer):
    from hywia.instructions import text_examples
    teacher = tiny_model()
    student, _ = prune(copy.deepcopy(teacher), method="l2", ratio=0.4)
    windows = torch.stack(text_examples("wikitext2", tokenizer, 24, str(text_dir))[0][:8])
    before = _kl_to_teacher(student, teacher, windows)
    peft_model, report = finetune(student, tokenizer, "wikitext2", TEXT_SETTINGS, data_dir=str(text_dir), teacher=teacher,
                                  teacher_name="dense")
    after = _kl_to_teacher(merge(peft_model), teacher, windows)
    assert after < 0.9 * before
    assert report.teacher == "dense" and report.tokens == 8 * 4 * 23  # 8 steps of 4 windows, 23 predicted tokens each
    assert report.losses[-1] < report.losses[0]


def test_distillation_resumes_exactly_and_refuses_another_teacher(text_dir, tokenizer, tmp_path):
    teacher = tiny_model()
    student, _ = prune(copy.deepcopy(teacher), method="l2", ratio=0.3, scope="global")
    settings = FinetuneSettings(**{**TEXT_SETTINGS.__dict__, "kd_hidden": 0.5, "kd_temperature": 2.0})
    run = lambda **kw: finetune(copy.deepcopy(student), tokenizer, "wikitext2", settings, data_dir=str(text_dir),  # noqa: E731
                                teacher=teacher, **kw)
    whole, _ = run(teacher_name="dense")
    run(checkpoint_dir=tmp_path / "c", stop_after=3, teacher_name="dense")
    with pytest.raises(HywiaError, match="other settings"):
        run(checkpoint_dir=tmp_path / "c", resume=True, teacher_name="another")
    resumed, report = run(checkpoint_dir=tmp_path / "c", resume=True, teacher_name="dense")
    assert report.resumed_from == 3 and report.tokens == 8 * 4 * 23
    a, b = lora_state(whole), lora_state(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_token_budget_sets_the_steps(text_dir, tokenizer):
    settings = FinetuneSettings(**{**TEXT_SETTINGS.__dict__, "max_steps": None, "tokens": 200})
    _, report = finetune(tiny_model(), tokenizer, "wikitext2", settings, data_dir=str(text_dir))
    assert report.steps == 3 and report.tokens == 3 * 4 * 23  # the first step count reaching 200 tokens (276 >= 200 > 184)
    assert report.data["trained"] == 3 * 4 < report.data["records"]  # 12 windows drawn, of all the text holds
    with pytest.raises(HywiaError, match="give one of them"):
        finetune(tiny_model(), tokenizer, "wikitext2", FinetuneSettings(tokens=10, max_steps=2), data_dir=str(text_dir))


def test_teacher_of_another_shape_is_refused(text_dir, tokenizer):
    other = tiny_model(layers=2)
    with pytest.raises(HywiaError, match="the teacher's num_hidden_layers is 2 but the student's is 3"):
        finetune(tiny_model(), tokenizer, "wikitext2", TEXT_SETTINGS, data_dir=str(text_dir), teacher=other)


def test_cli_distils_on_text_with_a_token_budget(text_dir, tokenizer, tmp_path, capsys):
    from hywia.cli import main
    dense = save_model(tiny_model(), tokenizer, tmp_path / "dense", {})
    pruned, _ = prune(tiny_model(), method="l2", ratio=0.3)
    pruned_dir = save_model(pruned, tokenizer, tmp_path / "pruned", {})
    code = main(["finetune", "--model", str(pruned_dir), "--teacher", str(dense), "--data", "wikitext2", "--data-dir", str(text_dir),
                 "--tokens", "100", "--batch-size", "4", "--micro-batch-size", "2", "--cutoff-len", "24", "--lr", "1e-3",
                 "--kd-hidden", "0.5", "--eval-every", "1", "--eval-windows", "2", "--out", str(tmp_path / "tuned"), "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads(out)
    assert result["teacher"] == str(dense) and result["tokens"] == 2 * 4 * 23 and result["settings"]["kd_hidden"] == 0.5
    assert json.loads((tmp_path / "tuned" / "hywia.json").read_text())["finetune"]["teacher"] == str(dense)
    curve = result["curve"]  # before training and after each of the 2 steps
    assert [c["step"] for c in curve] == [0, 1, 2] and [c["tokens"] for c in curve] == [0, 92, 184]
    assert all(math.isfinite(c["ppl"]) and c["ppl"] > 1 for c in curve)
    assert (tmp_path / "tuned" / "tokens.png").read_bytes()[:4] == b"\x89PNG"


# several processes under accelerate launch

def _launch(processes: int, model_dir, data_dir, out, *extra, popen: bool = False):
    # --multi_gpu is accelerate's torchrun launcher, the one that starts N processes; with no GPU (or --device cpu) they
    # run on the CPU over gloo. Its --cpu flag starts one process whatever --num_processes says (MPI aside).
    launcher = [sys.executable, "-m", "accelerate.commands.launch", *(["--multi_gpu"] if processes > 1 else []),
                "--num_processes", str(processes), "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(29500 + os.getpid() % 1000)]
    command = launcher + ["-m", "hywia.cli", "finetune", "--model", str(model_dir), "--data", "wikitext2", "--data-dir", str(data_dir),
                          "--batch-size", "8", "--micro-batch-size", "2", "--cutoff-len", "24", "--lr", "3e-3", "--warmup-steps", "1",
                          "--out", str(out), "--json", *extra]
    if popen:
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def _kill_tree(pid: int) -> None:
    """SIGKILL a launcher and every process below it: torchrun starts its workers in sessions of their own, so
    killing the launcher's process group would leave them running."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.parametrize("shard", [[], ["--fsdp"]], ids=["replicas", "fsdp"])
def test_two_processes_follow_the_single_process_run_and_resume_exactly(shard, text_dir, tokenizer, tmp_path):
    """accelerate launch --cpu with 2 processes, each a whole replica or (FSDP) half of the frozen weights of student
    and teacher: the same effective batch gives the single-process loss curve (to 1e-5, the order of float sums), and
    a run SIGKILLed mid-way resumes to the uninterrupted 2-process run's weights. The step's 4 micro-batches of 2
    are dealt 2 and 2; 3 micro-batches (batch 6) leave the second process a zero-weight pass under FSDP."""
    from safetensors.torch import load_file
    dense = save_model(tiny_model(), tokenizer, tmp_path / "dense", {})
    pruned = save_model(prune(tiny_model(), method="l2", ratio=0.3)[0], tokenizer, tmp_path / "pruned", {})
    kd = ["--teacher", str(dense), "--kd-hidden", "0.5", *(["--batch-size", "6"] if shard else []), "--max-steps", "6"]
    one = _launch(1, pruned, text_dir, tmp_path / "one", *kd)
    two = _launch(2, pruned, text_dir, tmp_path / "two", *kd, *shard)
    assert one.returncode == 0 and two.returncode == 0, (one.stderr[-2000:], two.stderr[-2000:])
    (report_one, report_two) = (json.loads(r.stdout.strip().splitlines()[-1]) for r in (one, two))
    curve_one, curve_two = report_one["losses"], report_two["losses"]
    assert len(two.stdout.strip().splitlines()) == 1  # only the main process prints
    assert report_two["processes"]["count"] == 2 and report_two["processes"]["fsdp"] == bool(shard)
    if shard:  # each process held about half of the frozen weights (FSDP pads a shard to an even split)
        held, frozen = report_two["processes"]["frozen_params_held"], report_two["processes"]["frozen_params"]
        assert 0.45 * frozen < held < 0.55 * frozen
    assert curve_one == pytest.approx(curve_two, rel=1e-5) and curve_one[-1] < curve_one[0]
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)

    ckpt = tmp_path / "ckpt"
    proc = _launch(2, pruned, text_dir, tmp_path / "killed", *kd[:-1], "40", "--save-steps", "1", "--checkpoint-dir", str(ckpt),
                   *shard, popen=True)
    deadline = time.time() + 300
    while not any(int(p.stem.split("-")[1]) >= 3 for p in ckpt.glob("step-*.pt")) and time.time() < deadline:
        time.sleep(0.05)
    _kill_tree(proc.pid)
    proc.wait()
    step = max(int(p.stem.split("-")[1]) for p in ckpt.glob("step-*.pt"))
    assert 3 <= step < 40 and not (tmp_path / "killed").exists()
    resumed = _launch(2, pruned, text_dir, tmp_path / "killed", *kd[:-1], "40", "--save-steps", "1", "--checkpoint-dir", str(ckpt),
                      "--resume", *shard)
    whole = _launch(2, pruned, text_dir, tmp_path / "whole", *kd[:-1], "40", *shard)
    assert resumed.returncode == 0 and whole.returncode == 0, (resumed.stderr[-6000:], whole.stderr[-2000:])
    assert json.loads(resumed.stdout.strip().splitlines()[-1])["resumed_from"] == step
    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "killed" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("train", ["norms+lora", "full"])
def test_other_trainables_train_what_they_say_and_merge_exactly(train, text_dir, tokenizer):
    teacher = tiny_model()
    student, _ = prune(copy.deepcopy(teacher), method="l2", ratio=0.4)
    norm_before = student.model.layers[1].input_layernorm.weight.detach().clone()
    embedding_before = student.model.embed_tokens.weight.detach().clone()
    settings = FinetuneSettings(**{**TEXT_SETTINGS.__dict__, "train": train, "max_steps": 3})
    trained, report = finetune(student, tokenizer, "wikitext2", settings, data_dir=str(text_dir), teacher=teacher)
    with torch.no_grad():
        expected = trained(input_ids=IDS).logits
    merged = merge(trained, None, settings)
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=IDS).logits, expected, atol=1e-5)
    assert not torch.equal(merged.model.layers[1].input_layernorm.weight, norm_before)  # norms train in both
    assert torch.equal(merged.model.embed_tokens.weight, embedding_before) == (train == "norms+lora")  # only full trains all
