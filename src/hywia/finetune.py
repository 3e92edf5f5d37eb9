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

Modules: the training data in hywia.instructions, the objectives and the guard's loss in hywia.losses, checkpoints in
hywia.checkpoints; this one holds the settings, the model made trainable, the loop (`Training`) and the merge.
"""
from __future__ import annotations

import math
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
from .data import bos_id, consecutive_windows, load_text, tokenize
from .distill import Distillation, check_teacher
from .errors import HywiaError, Interrupted
from .evaluate import window_nll
from .finite import check_number
from .options import RANGES, check_fields, check_values, read_record
from .shard import check_fsdp, passes, shard
from .checkpoints import latest_checkpoint, remove_checkpoints, save_checkpoint  # noqa: F401  (remove_checkpoints: API)
from .instructions import training_examples
from .losses import GUARD_RECORDS, guard_examples, mean_loss, micro_batch_kd, micro_batch_nll, pad_id_of  # noqa: F401  (API)



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

    @staticmethod
    def load(path: str | Path) -> dict:
        """The fine-tuning a recovered model's hywia.json records: its settings' fields (each checked for name and
        type, one line naming the file and the field) and the run's `data` and `teacher`, as `hywia finetune`'s flags."""
        where = f"--recipe {path}"
        recorded = read_record(path, "fine-tuned")
        run = recorded.get("finetune") if isinstance(recorded, dict) else None
        if not isinstance(run, dict) or not isinstance(run.get("recipe"), dict):
            raise HywiaError(f"{where} records no fine-tuning recipe: give the hywia.json of a model this hywia fine-tuned")
        values = dict(run["recipe"])
        given = {k: values.pop(k) for k in ("data", "teacher") if k in values}
        check_fields(FinetuneSettings, values, where, "finetune.recipe")
        if not all(isinstance(v, (str, type(None))) for v in given.values()):
            raise HywiaError(f"{where}: 'data' and 'teacher' in finetune.recipe are names or paths; correct them")
        return {**values, **given}


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


@dataclass
class Training:
    """A fine-tuning run in progress: the trainable model, its optimizer, where the steps stand, and how to take one."""

    peft_model: nn.Module
    settings: FinetuneSettings
    examples: list[torch.Tensor]
    loss_of: Callable  # (model, micro-batch) -> summed loss
    processes: PartialState
    fsdp: bool
    total: int  # steps of the whole run
    layers_path: str
    n_layers: int
    compute_dtype: torch.dtype
    checkpoint_dir: Path | None
    recipe: dict  # what a checkpoint must match to be resumed
    heldout: torch.Tensor | None = None
    step: int = 0
    losses: list[float] = field(default_factory=list)
    tokens_seen: int = 0
    curve: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.lora = {n: p for n, p in self.peft_model.named_parameters() if p.requires_grad}  # what is trained
        self.optimizer = torch.optim.AdamW(list(self.lora.values()), lr=self.settings.lr, weight_decay=0.0)
        warmup = min(self.settings.warmup_steps, max(1, self.total // 10))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / warmup))

    def resume(self, checkpoint: Path) -> None:
        """Continue from `checkpoint`: weights, optimizer, scheduler, random state, and where the run stood."""
        state = torch.load(checkpoint, weights_only=True)
        if state["recipe"] != self.recipe:
            raise HywiaError(f"{checkpoint} was made with other settings or data; resume with the same ones, or start a new --checkpoint-dir")
        named = dict(self.peft_model.named_parameters())
        with torch.no_grad():
            for name, value in state["lora"].items():
                named[name].copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        self.step, self.losses, self.tokens_seen, self.curve = state["step"], state["losses"], state["tokens"], list(state["curve"])

    def measure(self) -> None:
        """Held-out perplexity at this step, for the quality-vs-tokens curve (once per step)."""
        if self.heldout is not None and (self.fsdp or self.processes.is_main_process) and not (self.curve and self.curve[-1]["step"] == self.step):
            self.curve.append({"step": self.step, "tokens": self.tokens_seen,
                               "ppl": heldout_ppl(self.peft_model, self.heldout, self.settings.micro_batch_size)})

    def take_step(self) -> float:
        """One optimizer step over the next effective batch, this process's micro-batches of it; returns its loss."""
        s = self.settings
        if s.groups > 1:  # a parameter without grad is skipped by AdamW: its moments wait for its stage
            trained = stage_layers(self.step, self.total, s.groups, self.n_layers)
            for name, p in self.lora.items():
                p.requires_grad_(layer_of(name, self.layers_path) in trained)
        epoch, k = divmod(self.step, math.ceil(len(self.examples) / s.batch_size))
        batch = [self.examples[i] for i in _batch_order(len(self.examples), epoch, s.seed)[k * s.batch_size:(k + 1) * s.batch_size]]
        batch.sort(key=len)  # micro-batches of similar lengths pad less; the step's gradient is the same sum
        n_tokens = sum(len(e) - 1 for e in batch)
        self.optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for j, counts in passes(math.ceil(len(batch) / s.micro_batch_size), self.processes, self.fsdp):
            torch.manual_seed(_micro_batch_seed(s.seed, self.step, j))  # its dropout masks, whichever process runs it
            m = j * s.micro_batch_size
            summed = self.loss_of(self.peft_model, batch[m:m + s.micro_batch_size]) * counts
            (summed / n_tokens).backward()  # token-weighted mean over the whole effective batch
            step_loss += summed.item() / n_tokens
        step_loss = _sum_over_processes(self.processes, self.lora, step_loss)
        self.tokens_seen += n_tokens
        if not math.isfinite(step_loss):
            where = f"; the last good checkpoint is in {self.checkpoint_dir}" if self.checkpoint_dir and self.step else ""
            fix = "lower --lr" + ("" if self.compute_dtype == torch.float32 else ", or load with --dtype float32")
            raise HywiaError(f"the loss became {step_loss} at step {self.step + 1} ({str(self.compute_dtype).removeprefix('torch.')} "
                             f"compute){where}: {fix}")
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self.losses.append(step_loss)
        return step_loss

    def run(self, stop_after: int | None) -> None:
        """Take steps to the end of the run (or `stop_after` of them), measuring and checkpointing as settings say."""
        s, resumed_from = self.settings, self.step
        if self.step == 0:
            self.measure()
        self.peft_model.train()
        bar = tqdm(total=self.total, initial=self.step, desc="finetune", unit="step", disable=not self.processes.is_main_process)
        try:
            while self.step < self.total and (stop_after is None or self.step - resumed_from < stop_after):
                bar.set_postfix(loss=f"{self.take_step():.3f}")
                bar.update(1)
                if s.eval_every and (self.step % s.eval_every == 0 or self.step == self.total):
                    self.measure()
                if self.checkpoint_dir and (self.step % s.save_steps == 0 or self.step == self.total):
                    if self.processes.is_main_process:
                        save_checkpoint(self.checkpoint_dir, self.step, self.lora, self.optimizer, self.scheduler, self.recipe,
                                        self.losses, self.tokens_seen, self.curve)
                    self.processes.wait_for_everyone()
        except KeyboardInterrupt as e:
            latest = latest_checkpoint(self.checkpoint_dir) if self.checkpoint_dir else None
            if latest is None:
                raise
            raise Interrupted(getattr(e, "signal_name", "SIGINT"), f"the checkpoint of {latest.stem} is in {self.checkpoint_dir}: "
                              "run the same command with --resume to continue") from None
        finally:
            bar.close()
        for p in self.lora.values():
            p.requires_grad_(True)
        self.peft_model.eval()


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
    processes = _processes(settings, fsdp, device)
    if teacher is not None:
        check_teacher(model.config, teacher.config)
    examples, records, source = training_examples(data, tokenizer, settings.cutoff_len, settings.max_records, data_dir)
    compute_dtype = _compute_dtype(model)
    pad_id, total = pad_id_of(tokenizer), plan_steps(examples, settings)
    loss_of = _objective(teacher, compute_dtype, pad_id, settings)
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
    latest = _checkpoint_to_resume(checkpoint_dir, resume)
    layers_path = adapter_for(model.config).layers
    n_layers = len(model.get_submodule(layers_path))
    if not 1 <= settings.groups <= min(n_layers, total):
        raise HywiaError(f"--groups {settings.groups} must be between 1 and the number of decoder layers ({n_layers}) and of steps ({total})")
    torch.manual_seed(settings.seed)
    peft_model = trainable_model(model, settings)  # LoRA starts at zero: the model computes what it did before
    sharding = shard(peft_model, device) if fsdp else {}
    if fsdp and teacher is not None:
        shard(teacher, device)
    guarded = guard_examples(examples, settings.seed)
    guard = {"records": len(guarded), "objective": "distillation" if teacher is not None else "nll",
             "before": mean_loss(peft_model, guarded, pad_id, settings.micro_batch_size, loss_of)}
    recipe = {"settings": asdict(settings), "data": source, "records": records, "teacher": teacher_name}
    run = Training(peft_model, settings, examples, loss_of, processes, fsdp, total, layers_path, n_layers, compute_dtype,
                   checkpoint_dir, recipe, heldout_windows(tokenizer, settings, data_dir))
    if latest is not None:
        run.resume(latest)
    resumed_from = run.step
    run.run(stop_after)
    if fsdp:  # a sharded model (and teacher) runs only with every process: the guard's second reading is taken here
        guard["after"] = mean_loss(peft_model, guarded, pad_id, settings.micro_batch_size, loss_of)
    # "records": what the source held (after --max-records); "trained": the distinct examples the steps drew from it
    used = {"source": source, "records": records, "trained": min(len(examples), run.step * settings.batch_size)}
    on_gpu = torch.device(device).type == "cuda"
    report = FinetuneReport(asdict(settings), used, run.step, resumed_from, run.losses, time.perf_counter() - start_time,
                            str(compute_dtype).removeprefix("torch."), guard, guarded, tokens=run.tokens_seen, teacher=teacher_name,
                            curve=run.curve, guard_loss=loss_of, processes={"count": processes.num_processes, "fsdp": fsdp, **sharding},
                            peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                            peak_device_mb=torch.cuda.max_memory_allocated(torch.device(device)) / 2**20 if on_gpu else None)
    return peft_model, report


def _processes(settings: FinetuneSettings, fsdp: bool, device: str) -> PartialState:
    """The processes of the run (one, or those `accelerate launch` started), after checking the settings against them."""
    if fsdp:
        check_fsdp(settings.train, device)
    # gloo between CPU processes: accelerate reads that from `cpu` only
    processes = PartialState(cpu=torch.device(device).type == "cpu")
    if fsdp and not processes.use_distributed:
        raise HywiaError("--fsdp shards the weights over the processes accelerate starts: run it as `accelerate launch "
                         "--multi_gpu --num_processes N $(which hywia) finetune ... --fsdp` (on CPUs too: accelerate's --cpu starts one process)")
    check_values(**{name: value for name, value in asdict(settings).items() if name in RANGES})
    if settings.tokens is not None and settings.max_steps is not None:
        raise HywiaError("--tokens and --max-steps both set the run's length: give one of them")
    return processes


def _compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype training computes in: the model's, except float16, which overflows (bfloat16 instead)."""
    dtype = next(model.parameters()).dtype
    if dtype == torch.float16:
        warnings.warn("float16 overflows in LoRA training (NaN loss); training in bfloat16 instead", stacklevel=3)
        model.to(torch.bfloat16)
        return torch.bfloat16
    return dtype


def _objective(teacher: nn.Module | None, dtype: torch.dtype, pad_id: int, settings: FinetuneSettings) -> Callable:
    """The loss of a micro-batch: next-token NLL, or with a teacher the distillation loss (hywia.distill)."""
    if teacher is None:
        return lambda m, batch: micro_batch_nll(m, batch, pad_id)
    teacher.to(dtype).eval().requires_grad_(False)
    distillation = Distillation(settings.kd_temperature, settings.kd_hidden)
    return lambda m, batch: micro_batch_kd(m, teacher, batch, pad_id, distillation)


def _checkpoint_to_resume(checkpoint_dir: Path | None, resume: bool) -> Path | None:
    """The checkpoint `--resume` continues, refusing to start over one by accident or to resume nothing."""
    latest = latest_checkpoint(checkpoint_dir) if checkpoint_dir else None
    if latest is not None and not resume:
        raise HywiaError(f"{checkpoint_dir} holds a checkpoint ({latest.name}); pass --resume to continue it, or remove it to start over")
    if resume and latest is None:
        raise HywiaError(f"--resume found no checkpoint in {checkpoint_dir}; run without --resume to start")
    return latest


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
