"""Recovery: LoRA fine-tuning (PEFT) of a pruned model on instruction data, merged back afterwards.

Defaults follow LLM-Pruner's recovery (alpaca-lora): LoRA rank 8, alpha 16, dropout 0.05 on every grouped
projection; Adam (AdamW with no weight decay), lr 1e-4 with linear warmup; effective batch 64 by gradient
accumulation; 2 epochs; prompts cut at 256 tokens; loss on the whole prompt + response.

The loop is written out rather than delegated to `transformers.Trainer` so that a killed run resumes *exactly*:
a checkpoint holds the LoRA weights, optimizer and scheduler state and the step, the data order is a pure function
of (seed, epoch), and each micro-batch's dropout masks are seeded by (seed, step, micro-batch), so steps after a
resume see the same batches and masks.

Processes: under `accelerate launch` (DDP-style data parallelism; accelerate starts the processes, sets up the
process group and places each on its device), the micro-batches of every step are dealt out to the processes in
turn, and one all-reduce sums their gradients and losses before every process takes the same optimizer step. As the
micro-batches and their masks are those one process would have run, the run is the single-process run up to the
order of floating-point sums, whatever the number of processes; only the main process writes checkpoints and the
model. Each process holds a whole replica, unless `fsdp` (hywia.shard) splits the frozen weights (and the teacher)
over the processes; the loop is the same, with every process taking as many forward passes as the busiest one.

Precision: the frozen base runs in the model's dtype and the LoRA weights stay float32 (PEFT's default), so
bfloat16 compute is safe; on the development CPU its forward pass is 2.3x faster but its backward pass slower
than float32's, about 15% less time a step overall. float16 is not: its range overflows in the backward
pass of a small model (NaN loss), so a float16 model is trained in bfloat16 instead, and says so. Any
non-finite loss stops the run with an error, keeping the last good checkpoint. The adapter is merged into the
base at the dtype its checkpoint is stored in (`merge`), so a bfloat16 run loses no update to rounding.

Group fine-tuning (SAAP's recovery, `groups` > 1): the decoder layers are split into `groups` contiguous groups
and the run into as many stages of equal length; stage k trains only the LoRA weights of one group, the deepest
group first, while the others stay as they are. The data, steps and learning-rate schedule are those of the
all-at-once run; a stage's backward pass stops at the lowest layer it trains, so early stages are cheaper.

Distillation (`teacher`, hywia.distill): the pruned model learns the dense model's next-token distributions (and,
with `kd_hidden`, its residual stream) instead of the data's next tokens; everything else (LoRA, data order,
resume, guards) is the same loop. Without instruction records it trains on plain text windows of `cutoff_len`
tokens (`data` a dataset name such as c4, or a text file), BOS first where the tokenizer adds it.

Budget: `tokens` sets the run's length in predicted tokens instead of `epochs`/`max_steps`: the run takes as many
steps as the data order needs to reach it (a pure function of seed and data), so the budget is exact and resumable.

Guard: the mean loss on `GUARD_RECORDS` training records is measured before training and on the merged model
after it; recovery that made the model worse on the data it was tuned for is refused (`check_recovery`).
"""
from __future__ import annotations

import json
import math
import os
import resource
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import PartialState
from torch import nn
from tqdm.auto import tqdm

from .adapters import adapter_for
from .data import SOURCES, bos_id, consecutive_windows, hub_reachable, load_text, tokenize
from .data import data_dir as resolve_data_dir
from .distill import Distillation, check_teacher, distillation_loss
from .errors import HywiaError, Interrupted
from .evaluate import window_nll
from .finite import check_number
from .options import RANGES, check_values
from .shard import check_fsdp, passes, shard

PROMPT_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                     "Write a response that appropriately completes the request.\n\n"
                     "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
                   "### Instruction:\n{instruction}\n\n### Response:\n")
# the full release, the first 5,000 records of it (the shared data dir), an early 102-record sample; first found wins
ALPACA_FILES = ("alpaca/alpaca_data_cleaned.json", "alpaca/alpaca_data_cleaned.first5000.json", "alpaca/alpaca_data_cleaned.sample.json")
ALPACA_HUB = "yahma/alpaca-cleaned"
GUARD_RECORDS = 64


@dataclass(frozen=True)
class FinetuneSettings:
    rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lr: float = 1e-4
    batch_size: int = 64  # effective batch, reached by accumulating micro-batches
    micro_batch_size: int = 4
    epochs: int = 2
    max_steps: int | None = None
    max_records: int | None = None  # use the first N records only
    warmup_steps: int = 100  # capped at a tenth of the run, so short CPU runs are not all warmup
    cutoff_len: int = 256
    save_steps: int = 50
    seed: int = 0
    groups: int = 1  # > 1: SAAP's group fine-tuning, one group of decoder layers trained at a time
    tokens: int | None = None  # budget in predicted tokens, instead of epochs / max_steps
    kd_temperature: float = 1.0  # with a teacher: temperature of the logit KL
    kd_hidden: float = 0.0  # with a teacher: weight of the hidden-state loss (0: logits only)
    train: str = "lora"  # what is trained: lora, norms+lora (LoRA and every normalisation weight) or full
    eval_every: int | None = None  # held-out perplexity every N steps (and before the first, after the last)
    eval_windows: int = 32  # ... on the first N 128-token windows of WikiText-2 validation


@dataclass
class FinetuneReport:
    settings: dict
    data: dict
    steps: int
    resumed_from: int
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    compute_dtype: str = "float32"
    guard: dict = field(default_factory=dict)  # mean loss on GUARD_RECORDS training records, before and after
    guard_examples: list[torch.Tensor] = field(default_factory=list, repr=False)  # kept out of JSON
    tokens: int = 0  # predicted tokens trained on, over the whole run (resumed part included)
    teacher: str | None = None
    curve: list[dict] = field(default_factory=list)  # with eval_every: {"step", "tokens", "ppl"} on held-out text
    processes: dict = field(default_factory=dict)  # how many ran the loop, and with fsdp what each held of the weights
    peak_rss_mb: float = 0.0  # the (main) process's peak resident memory, loading included
    peak_device_mb: float | None = None  # on a GPU: the most memory torch held there
    guard_loss: Callable | None = field(default=None, repr=False)  # the training objective, for the guard; kept out of JSON

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("guard_examples", "guard_loss")}


def load_instructions(name: str, data_dir: str | None = None) -> tuple[list[dict], str]:
    """Instruction records (instruction, input, output) and where they came from; malformed records are named."""
    path = Path(name).expanduser()
    if name == "alpaca":
        local = resolve_data_dir(data_dir)
        if local is not None:
            path = next((local / f for f in ALPACA_FILES if (local / f).is_file()), local / ALPACA_FILES[0])
        elif hub_reachable():
            import datasets
            return [dict(r) for r in datasets.load_dataset(ALPACA_HUB, split="train")], ALPACA_HUB
        else:
            raise HywiaError(f"cannot load alpaca from the hub (offline); pass --data-dir DIR holding {ALPACA_FILES[0]} or a json/jsonl path")
    if not path.is_file():
        raise HywiaError(f"instruction data {path} not found; pass alpaca or a json/jsonl file of instruction/input/output records")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise HywiaError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}): give a json/jsonl file of records") from None
    except OSError as e:
        raise HywiaError(f"cannot read {path} ({e.strerror}); check the path and its permissions") from None
    try:
        records = json.loads(text) if text.lstrip().startswith("[") else [json.loads(l) for l in text.splitlines() if l.strip()]
    except json.JSONDecodeError as e:
        raise HywiaError(f"{path} is not valid JSON/JSONL ({e.msg} at line {e.lineno}); fix the file") from None
    for i, r in enumerate(records):
        if not isinstance(r, dict) or not isinstance(r.get("instruction"), str) or not isinstance(r.get("output"), str) \
                or not isinstance(r.get("input", ""), str):
            raise HywiaError(f"record {i} of {path} is malformed: each record needs string 'instruction' and 'output' (and optional 'input')")
    if not records:
        raise HywiaError(f"{path} holds no records")
    return records, str(path)


def is_instruction_data(name: str) -> bool:
    """alpaca, or a json/jsonl file of instruction records; anything else (a dataset name, a text file) is text."""
    path = Path(name).expanduser()
    if name == "alpaca":
        return True
    if name in SOURCES or path.suffix not in (".json", ".jsonl") or not path.is_file():
        return False
    with path.open(encoding="utf-8", errors="replace") as f:
        return '"instruction"' in f.read(4096)


def text_examples(name: str, tokenizer, cutoff_len: int, data_dir: str | None) -> tuple[list[torch.Tensor], str]:
    """Consecutive windows of `cutoff_len` tokens of a training text (a dataset's train split, else its validation
    split, as calibration reads it; or a file), BOS first where the tokenizer adds it, and where they came from."""
    text = load_text(name, "train", data_dir, fall_back_to_validation=True)
    windows = consecutive_windows(tokenize(tokenizer, text.text), cutoff_len, bos_id(tokenizer))
    if len(windows) == 0:
        raise HywiaError(f"{text.source} holds fewer than --cutoff-len {cutoff_len} tokens: give more text or a shorter --cutoff-len")
    return list(windows), f"{text.source} ({len(windows)} windows of {cutoff_len} tokens)"


def plan_steps(examples: list[torch.Tensor], settings: FinetuneSettings) -> int:
    """Steps of the run: `max_steps`, or as many as the data order needs to reach `tokens` predicted tokens, or
    `epochs` passes over the data."""
    steps_per_epoch = math.ceil(len(examples) / settings.batch_size)
    if settings.tokens is None:
        return settings.max_steps or settings.epochs * steps_per_epoch
    seen, step = 0, 0
    while seen < settings.tokens:
        epoch, k = divmod(step, steps_per_epoch)
        order = _batch_order(len(examples), epoch, settings.seed)[k * settings.batch_size:(k + 1) * settings.batch_size]
        seen += sum(len(examples[i]) - 1 for i in order)
        step += 1
    return step


def prompt(record: dict) -> str:
    template = PROMPT_WITH_INPUT if record.get("input") else PROMPT_NO_INPUT
    return template.format(instruction=record["instruction"], input=record.get("input", "")) + record["output"]


def tokenize_records(records: list[dict], tokenizer, cutoff_len: int) -> list[torch.Tensor]:
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return [torch.tensor((tokenizer(prompt(r))["input_ids"] + eos)[:cutoff_len], dtype=torch.long) for r in records]


def _collate(examples: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    length = max(len(e) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, :len(e)], mask[i, :len(e)] = e, 1
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def _micro_batch_nll(model, batch: list[torch.Tensor], pad_id: int) -> torch.Tensor:
    """Summed next-token NLL of a micro-batch of examples (padding ignored)."""
    device = next(model.parameters()).device
    ids, mask, labels = (t.to(device) for t in _collate(batch, pad_id))
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="sum")


def _micro_batch_kd(model, teacher, batch: list[torch.Tensor], pad_id: int, settings: Distillation) -> torch.Tensor:
    """Summed distillation loss of a micro-batch (hywia.distill), on the student's device."""
    device = next(model.parameters()).device
    ids, mask, _ = (t.to(device) for t in _collate(batch, pad_id))
    return distillation_loss(model, teacher, ids, mask, settings)


@torch.no_grad()
def mean_loss(model, examples: list[torch.Tensor], pad_id: int, micro_batch_size: int = 4,
              loss_of: Callable | None = None) -> float:
    """Token-weighted mean of the training objective `loss_of(model, batch)` (default the NLL) over `examples`, in
    eval mode (no dropout)."""
    loss_of = loss_of or (lambda m, batch: _micro_batch_nll(m, batch, pad_id))
    was_training = model.training
    model.eval()
    try:
        total = sum(loss_of(model, examples[m:m + micro_batch_size]).item()
                    for m in range(0, len(examples), micro_batch_size))
    finally:
        model.train(was_training)
    return total / sum(len(e) - 1 for e in examples)


def guard_examples(examples: list[torch.Tensor], seed: int) -> list[torch.Tensor]:
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed + 7919)).tolist()
    return [examples[i] for i in order[:GUARD_RECORDS]]


def pad_id_of(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)


def lora_model(model, settings: FinetuneSettings):
    """Wrap `model` with LoRA on every grouped projection named by its adapter."""
    from peft import LoraConfig, get_peft_model
    adapter = adapter_for(model.config)
    targets = sorted({m.path.rsplit(".", 1)[-1] for m in adapter.attention + adapter.mlp})
    config = LoraConfig(r=settings.rank, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                        target_modules=targets, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


TRAINABLES = ("lora", "norms+lora", "full")


def trainable_model(model, settings: FinetuneSettings):
    """`model` made trainable as `settings.train` says: LoRA on every grouped projection (PEFT), LoRA plus every
    normalisation weight (cheap, and where a pruned layer's output scale moved, the right knob), or every weight."""
    if settings.train not in TRAINABLES:
        raise HywiaError(f"unknown --train '{settings.train}': use {', '.join(TRAINABLES)}")
    if settings.train == "full":
        return model.requires_grad_(True)
    peft_model = lora_model(model, settings)
    if settings.train == "norms+lora":
        for module in peft_model.modules():
            if "norm" in type(module).__name__.lower():
                for p in module.parameters(recurse=False):
                    p.requires_grad_(True)
    return peft_model


def layer_of(name: str, layers_path: str) -> int | None:
    """Decoder layer index in a (PEFT-prefixed) parameter name, or None outside the decoder layers."""
    head, found, tail = name.partition(f"{layers_path}.")
    return int(tail.split(".", 1)[0]) if found else None


def stage_layers(step: int, total: int, groups: int, n_layers: int) -> range:
    """The decoder layers trained at `step` of `total`: stage step * groups // total, deepest group first."""
    stage = min(step * groups // total, groups - 1)
    bounds = [round(i * n_layers / groups) for i in range(groups + 1)]
    group = groups - 1 - stage
    return range(bounds[group], bounds[group + 1])


def _batch_order(n: int, epoch: int, seed: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()


OWNED = ".hywia-checkpoints"  # marks a checkpoint folder hywia created, and so may remove once it is empty


CURVE_WINDOW = 128  # tokens per held-out window, LLM-Pruner's protocol


def heldout_windows(tokenizer, settings: FinetuneSettings, data_dir: str | None) -> torch.Tensor | None:
    """The held-out windows of the quality-vs-tokens curve: WikiText-2 validation, the choice corpus (never test)."""
    if settings.eval_every is None:
        return None
    text = load_text("wikitext2", "validation", data_dir)
    return consecutive_windows(tokenize(tokenizer, text.text), CURVE_WINDOW, bos_id(tokenizer), settings.eval_windows)


def heldout_ppl(model, windows: torch.Tensor, micro_batch_size: int) -> float:
    was_training = model.training
    model.eval()
    try:
        nll = window_nll(model, windows, micro_batch_size).sum().item()
    finally:
        model.train(was_training)
    return check_number(math.exp(nll / (len(windows) * (windows.shape[1] - 1))), "the held-out perplexity",
                        "the model diverged; lower --lr")


def _micro_batch_seed(seed: int, step: int, micro_batch: int) -> int:
    return (seed * 1_000_003 + step) * 1_009 + micro_batch


def _sum_over_processes(processes, trained: dict[str, torch.nn.Parameter], step_loss: float) -> float:
    """Under `accelerate launch`, each process ran some micro-batches of the step: sum their gradients and losses
    (one flat all-reduce), so every process takes the optimizer step one process would have taken."""
    if processes.num_processes == 1:
        return step_loss
    from accelerate.utils import reduce
    params = [p for p in trained.values() if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.flatten().float() for g in grads] + [torch.tensor([step_loss], device=grads[0].device)])
    flat = reduce(flat, reduction="sum")
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset:offset + g.numel()].view_as(g).to(g.dtype)
        offset += g.numel()
    return flat[-1].item()


def _save_checkpoint(directory: Path, step: int, lora: dict[str, torch.nn.Parameter], optimizer, scheduler, recipe: dict,
                     losses: list[float], tokens: int, curve: list[dict]) -> None:
    if not directory.exists():
        directory.mkdir(parents=True)
        (directory / OWNED).touch()
    state = {"step": step, "recipe": recipe, "losses": losses, "tokens": tokens, "curve": curve, "rng": torch.get_rng_state(),
             "lora": {n: p.detach().clone() for n, p in lora.items()},
             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    tmp = directory / f".step-{step}.pt.tmp"
    try:
        torch.save(state, tmp)
        os.replace(tmp, directory / f"step-{step}.pt")  # atomic: a kill leaves the previous checkpoint intact
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise HywiaError(f"cannot write a checkpoint in {directory} ({e.strerror or e}); free disk space or pass another --checkpoint-dir") from None
    for old in directory.glob("step-*.pt"):
        if old.name != f"step-{step}.pt":
            old.unlink()


def remove_checkpoints(directory: Path) -> None:
    """Remove what hywia wrote in `directory` (step-N.pt and unfinished .step-N.pt.tmp files), and the folder itself
    only if hywia created it and nothing else is in it: a --checkpoint-dir a user named keeps their own files."""
    if not directory.is_dir():
        return
    for file in [*directory.glob("step-*.pt"), *directory.glob(".step-*.pt.tmp")]:
        file.unlink()
    if (directory / OWNED).is_file() and [p.name for p in directory.iterdir()] == [OWNED]:
        (directory / OWNED).unlink()
        directory.rmdir()


def _latest_checkpoint(directory: Path) -> Path | None:
    found = sorted(directory.glob("step-*.pt"), key=lambda p: int(p.stem.split("-")[1])) if directory.is_dir() else []
    return found[-1] if found else None


def finetune(model, tokenizer, data: str = "alpaca", settings: FinetuneSettings = FinetuneSettings(),
             checkpoint_dir: str | Path | None = None, resume: bool = False, data_dir: str | None = None,
             stop_after: int | None = None, teacher: nn.Module | None = None, teacher_name: str | None = None,
             fsdp: bool = False, device: str | None = None):
    """LoRA-train `model`; returns (peft_model, report). Checkpoints go to `checkpoint_dir` every `save_steps`.

    `teacher` (the dense model `model` was pruned from) turns the loss into distillation (hywia.distill);
    `teacher_name` is recorded so a resume with another teacher is refused.
    `stop_after` ends the run after that many steps of this call as if it were killed (for tests and budgets).
    `fsdp` shards the frozen weights of `model` and `teacher` over the processes `accelerate launch` started and puts
    each process's part on `device` (default: where `model` is; hywia.shard).
    """
    start_time = time.perf_counter()
    device = str(device or next(model.parameters()).device)
    if fsdp:
        check_fsdp(settings.train, device)
    # one process, or those the launcher started (gloo between CPU processes: accelerate reads that from `cpu` only)
    processes = PartialState(cpu=torch.device(device).type == "cpu")
    if fsdp and not processes.use_distributed:
        raise HywiaError("--fsdp shards the weights over the processes accelerate starts: run it as `accelerate launch "
                         "--multi_gpu --num_processes N $(which hywia) finetune ... --fsdp` (on CPUs too: accelerate's --cpu starts one process)")
    check_values(**{name: value for name, value in asdict(settings).items() if name in RANGES})
    if settings.tokens is not None and settings.max_steps is not None:
        raise HywiaError("--tokens and --max-steps both set the run's length: give one of them")
    if teacher is not None:
        check_teacher(model.config, teacher.config)
    if is_instruction_data(data):
        records, source = load_instructions(data, data_dir)
        if settings.max_records is not None:
            records = records[:settings.max_records]
        examples = tokenize_records(records, tokenizer, settings.cutoff_len)
    else:
        examples, source = text_examples(data, tokenizer, settings.cutoff_len, data_dir)
        examples = examples[:settings.max_records] if settings.max_records is not None else examples
        records = examples
    compute_dtype = next(model.parameters()).dtype
    if compute_dtype == torch.float16:
        warnings.warn("float16 overflows in LoRA training (NaN loss); training in bfloat16 instead", stacklevel=2)
        model.to(torch.bfloat16)
        compute_dtype = torch.bfloat16
    pad_id = pad_id_of(tokenizer)
    steps_per_epoch = math.ceil(len(examples) / settings.batch_size)
    total = plan_steps(examples, settings)
    recipe = {"settings": asdict(settings), "data": source, "records": len(records), "teacher": teacher_name}
    if teacher is not None:
        teacher.to(compute_dtype).eval().requires_grad_(False)
        distillation = Distillation(settings.kd_temperature, settings.kd_hidden)
        loss_of = lambda m, batch: _micro_batch_kd(m, teacher, batch, pad_id, distillation)  # noqa: E731
    else:
        loss_of = lambda m, batch: _micro_batch_nll(m, batch, pad_id)  # noqa: E731
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
    latest = _latest_checkpoint(checkpoint_dir) if checkpoint_dir else None
    if latest is not None and not resume:
        raise HywiaError(f"{checkpoint_dir} holds a checkpoint ({latest.name}); pass --resume to continue it, or remove it to start over")
    if resume and latest is None:
        raise HywiaError(f"--resume found no checkpoint in {checkpoint_dir}; run without --resume to start")
    layers_path = adapter_for(model.config).layers
    n_layers = len(model.get_submodule(layers_path))
    if not 1 <= settings.groups <= min(n_layers, total):
        raise HywiaError(f"--groups {settings.groups} must be between 1 and the number of decoder layers ({n_layers}) and of steps ({total})")

    torch.manual_seed(settings.seed)
    peft_model = trainable_model(model, settings)  # LoRA starts at zero: the model computes what it did before
    sharding = None
    if fsdp:
        sharding = shard(peft_model, device)
        if teacher is not None:
            shard(teacher, device)
    guarded = guard_examples(examples, settings.seed)
    guard = {"records": len(guarded), "objective": "distillation" if teacher is not None else "nll",
             "before": mean_loss(peft_model, guarded, pad_id, settings.micro_batch_size, loss_of)}
    lora = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}  # what is trained (LoRA or more)
    optimizer = torch.optim.AdamW(list(lora.values()), lr=settings.lr, weight_decay=0.0)
    warmup = min(settings.warmup_steps, max(1, total // 10))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    step, losses, tokens_seen = 0, [], 0
    if latest is not None:
        state = torch.load(latest, weights_only=True)
        if state["recipe"] != recipe:
            raise HywiaError(f"{latest} was made with other settings or data; resume with the same ones, or start a new --checkpoint-dir")
        named = dict(peft_model.named_parameters())
        with torch.no_grad():
            for name, value in state["lora"].items():
                named[name].copy_(value)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        step, losses, tokens_seen = state["step"], state["losses"], state["tokens"]
    resumed_from = step

    heldout = heldout_windows(tokenizer, settings, data_dir)
    curve = list(state["curve"]) if latest is not None else []

    def measure() -> None:
        if heldout is not None and (fsdp or processes.is_main_process) and not (curve and curve[-1]["step"] == step):
            curve.append({"step": step, "tokens": tokens_seen, "ppl": heldout_ppl(peft_model, heldout, settings.micro_batch_size)})

    if step == 0:
        measure()
    peft_model.train()
    bar = tqdm(total=total, initial=step, desc="finetune", unit="step", disable=not processes.is_main_process)
    try:
        while step < total:
            if stop_after is not None and step - resumed_from >= stop_after:
                break
            if settings.groups > 1:  # a parameter without grad is skipped by AdamW: its moments wait for its stage
                trained = stage_layers(step, total, settings.groups, n_layers)
                for name, p in lora.items():
                    p.requires_grad_(layer_of(name, layers_path) in trained)
            epoch, k = divmod(step, steps_per_epoch)
            batch = [examples[i] for i in _batch_order(len(examples), epoch, settings.seed)[k * settings.batch_size:(k + 1) * settings.batch_size]]
            batch.sort(key=len)  # micro-batches of similar lengths pad less; the step's gradient is the same sum
            n_tokens = sum(len(e) - 1 for e in batch)
            optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            micro_batches = math.ceil(len(batch) / settings.micro_batch_size)
            for j, counts in passes(micro_batches, processes, fsdp):  # this process's share of the step
                torch.manual_seed(_micro_batch_seed(settings.seed, step, j))  # its dropout masks, whichever process runs it
                m = j * settings.micro_batch_size
                summed = loss_of(peft_model, batch[m:m + settings.micro_batch_size]) * counts
                (summed / n_tokens).backward()  # token-weighted mean over the whole effective batch
                step_loss += summed.item() / n_tokens
            step_loss = _sum_over_processes(processes, lora, step_loss)
            tokens_seen += n_tokens
            if not math.isfinite(step_loss):
                where = f"; the last good checkpoint is in {checkpoint_dir}" if checkpoint_dir and step else ""
                fix = "lower --lr" + ("" if compute_dtype == torch.float32 else ", or load with --dtype float32")
                raise HywiaError(f"the loss became {step_loss} at step {step + 1} ({str(compute_dtype).removeprefix('torch.')} "
                                 f"compute){where}: {fix}")
            optimizer.step()
            scheduler.step()
            step += 1
            losses.append(step_loss)
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.3f}")
            if settings.eval_every and (step % settings.eval_every == 0 or step == total):
                measure()
            if checkpoint_dir and (step % settings.save_steps == 0 or step == total):
                if processes.is_main_process:
                    _save_checkpoint(checkpoint_dir, step, lora, optimizer, scheduler, recipe, losses, tokens_seen, curve)
                processes.wait_for_everyone()
    except KeyboardInterrupt as e:
        latest = _latest_checkpoint(checkpoint_dir) if checkpoint_dir else None
        if latest is None:
            raise
        raise Interrupted(getattr(e, "signal_name", "SIGINT"), f"the checkpoint of {latest.stem} is in {checkpoint_dir}: "
                          "run the same command with --resume to continue") from None
    finally:
        bar.close()
    for p in lora.values():
        p.requires_grad_(True)
    peft_model.eval()
    if fsdp:  # a sharded model (and teacher) runs only with every process: the guard's second reading is taken here
        guard["after"] = mean_loss(peft_model, guarded, pad_id, settings.micro_batch_size, loss_of)
    # "records": what the source held (after --max-records); "trained": the distinct examples the steps drew from it
    used = {"source": source, "records": len(records), "trained": min(len(examples), step * settings.batch_size)}
    report = FinetuneReport(asdict(settings), used, step, resumed_from, losses,
                            time.perf_counter() - start_time, str(compute_dtype).removeprefix("torch."), guard, guarded,
                            tokens=tokens_seen, teacher=teacher_name, curve=curve, guard_loss=loss_of,
                            processes={"count": processes.num_processes, "fsdp": fsdp, **(sharding or {})},
                            peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                            peak_device_mb=torch.cuda.max_memory_allocated(torch.device(device)) / 2**20 if torch.device(device).type == "cuda" else None)
    return peft_model, report


def merge(peft_model, base=None, settings: FinetuneSettings | None = None):
    """Fold the LoRA weights into the base Linears: the same architecture (and pruned widths) as before.

    With `base` (the same model loaded at another dtype, e.g. the checkpoint's float32 after bfloat16 training),
    the trained adapter (and every other trained weight: norms, or all of them) is moved onto it and merged there,
    so no part of the update is lost to rounding."""
    settings = settings or FinetuneSettings()
    from peft import PeftModel
    if not isinstance(peft_model, PeftModel):  # --train full: nothing to merge
        if base is not None:
            base.load_state_dict(peft_model.state_dict())
        return base if base is not None else peft_model
    if base is None:
        return peft_model.merge_and_unload()
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    target = trainable_model(base, settings)
    set_peft_model_state_dict(target, get_peft_model_state_dict(peft_model))
    trained = {n: p for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" not in n}
    with torch.no_grad():
        for name, p in target.named_parameters():
            if name in trained:
                p.copy_(trained[name])
    return target.merge_and_unload()


def check_recovery(merged, tokenizer, report: FinetuneReport) -> None:
    """Measure the merged model on the guard records and refuse a recovery that made them worse (or non-finite).
    Under FSDP the trained model was measured by every process before the merge (the teacher is sharded)."""
    micro_batch_size = report.settings["micro_batch_size"]
    after = report.guard.get("after")
    if after is None:
        after = mean_loss(merged, report.guard_examples, pad_id_of(tokenizer), micro_batch_size, report.guard_loss)
    report.guard["after"] = after
    if not math.isfinite(after) or after > report.guard["before"]:
        raise HywiaError(f"recovery made the model worse on {report.guard['records']} of its own training records "
                         f"(loss {report.guard['before']:.4f} -> {after:.4f}); nothing was saved. Lower --lr or check the data")
