"""`hywia prune`, `finetune`, `eval ppl|zeroshot` and `bench speed`: parse, check, call the API, print.

Every failure is one line on stderr (docs/errors.md): a mistake in the input, `hywia: error: ...` naming the fix,
exit code 2; a signal (Ctrl-C, `kill`, `timeout`), `hywia: interrupted ...` saying what was kept, exit code
128 + the signal's number; anything unexpected, one line naming a log file that holds the traceback, exit code 1
(`--debug` prints the traceback instead).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import re
import signal
import sys
import time
import traceback
import warnings
from collections.abc import Iterator
from pathlib import Path

from .errors import HywiaError, Interrupted


class _Parser(argparse.ArgumentParser):
    """argparse, but its errors are one line like every other hywia error."""

    def error(self, message: str):
        message = message.replace("\r", "\\r").replace("\n", "\\n")  # an echoed value keeps the line whole
        self.exit(2, f"hywia: error: {message} (see `{self.prog} --help`)\n")


def _add_common(p: argparse.ArgumentParser, model_required: bool = True) -> None:
    p.add_argument("--model", required=model_required, help="packaged short name (smollm2-135m, gemma3-270m), .gguf file, directory or hub id")
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, or auto / balanced: spread over every GPU (then CPU) by accelerate")
    p.add_argument("--data-dir", default=None, help="offline data folder (default $HYWIA_DATA_DIR): wikitext2/, ptb/ as released")
    p.add_argument("--json", action="store_true", help="print one JSON result object instead of text")
    _add_debug(p)


def _add_debug(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="on an unexpected error, print the full traceback (by default it goes to a log file the error names)")


def _add_ppl_protocol(p: argparse.ArgumentParser) -> None:
    p.add_argument("--protocol", default="llm-pruner", help="llm-pruner: 128-token windows (default); "
                   "sparsegpt: 2048-token windows or the model's context when shorter")
    p.add_argument("--seq-len", type=int, default=None, help="window length, overriding --protocol (reported as custom)")
    p.add_argument("--bos", default="auto", help="auto: BOS first in every window if the tokenizer adds BOS (default); yes; no")
    p.add_argument("--max-windows", type=int, default=None, help="score only the first N windows (a fixed subset; default all)")
    p.add_argument("--batch-size", type=int, default=8)


def _version() -> str:
    import importlib.metadata
    try:
        return importlib.metadata.version("hywia")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def _parser(recipe: dict | None = None) -> argparse.ArgumentParser:
    parser = _Parser(prog="hywia", description="Structured pruning of Hugging Face causal LMs.")
    parser.add_argument("--debug", action="store_true", help="on an unexpected error, print the full traceback")
    parser.add_argument("--version", action="version", version=f"hywia {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    _prune_parser(sub, recipe)
    _finetune_parser(sub, recipe)
    _export_parser(sub)
    _bench_parser(sub)
    _eval_parser(sub)
    return parser


def _prune_parser(sub: argparse._SubParsersAction, recipe: dict | None) -> None:
    """The prune command: every Recipe field is a flag."""
    p = sub.add_parser("prune", help="prune a model and save the smaller model")
    _add_common(p, model_required=False)
    p.add_argument("--recipe", default=None, help="hywia.json of a pruned model: take every option from it (those given here "
                   "win), to make the same model again")
    p.add_argument("--method", default="hywia-adaptive", help="structured: hywia-adaptive (default), hywia, saap, slimgpt, random, l1, l2, vector, element1, "
                   "element2, wanda_sp, flap; unstructured (zeros, same shapes): sparsegpt, wanda, mixed, magnitude")
    p.add_argument("--ratio", type=float, default=None, help="structured: fraction of the prunable parameters to remove, 0 < ratio < 1")
    p.add_argument("--sparsity", type=float, default=None, help="unstructured: fraction of the decoder weights to zero, 0 < s < 1")
    p.add_argument("--pattern", default=None, help="unstructured: N:M, N zeros in every M consecutive weights (2:4, 4:8)")
    p.add_argument("--calib", default=None, help="calibration data: wikitext2, ptb, c4, bookcorpus or a file path "
                   "(default: wikitext2 for structured methods, c4 for unstructured ones, as their papers do)")
    p.add_argument("--samples", type=int, default=None, help="calibration windows (default 10 structured, 128 unstructured)")
    p.add_argument("--seq-len", type=int, default=None, help="calibration window length (default 128 structured, 2048 unstructured)")
    p.add_argument("--scope", default=None, help="layer: same ratio in every layer; global: one ranking per kind across layers; "
                   "joint: one ranking of every group (default: joint for flap, layer for the others)")
    p.add_argument("--target", default=None, help="attention, mlp or both (default)")
    p.add_argument("--layers", default=None, help="START:END decoder blocks to prune (Python slice), default all")
    p.add_argument("--attention-unit", default=None, help="kv: remove whole KV groups (the default, except hywia-adaptive's query); query: remove query heads, "
                   "the same number from every KV group of a layer (needed where a layer has one KV group, e.g. Gemma-3-270M)")
    p.add_argument("--kind-split", default=None, help="how the budget splits between attention and MLP: ratio (the same fraction "
                   "of each), evidence (the split with the lowest held-out calibration loss), evidence-refit (the same, each candidate "
                   "refit as --reconstruct will build it), evidence-best (both; where they disagree, both built and judged on windows "
                   "of their own: the refit one kept only if its loss is lower beyond the windows' noise; one more reconstruction "
                   "walk, the incumbent built beside the model one layer at a time, hywia.aside), evidence-both (both screens; where they disagree, the same judge reads the refit screen's "
                   "one-shot models of the two shares instead of built ones: one walk, the kept share's) or the fraction of attention to remove "
                   "(default: evidence-best for hywia-adaptive, evidence with --reconstruct no; ratio for the others)")
    p.add_argument("--compensate", default=None, choices=("yes", "no"), help="fold the removed inputs' calibration means into the "
                   "output biases (FLAP's bias compensation; default: yes for flap, no for the others)")
    p.add_argument("--reconstruct", default=None, choices=("yes", "obs", "no"), help="refit the weights that read removed groups "
                   "(o_proj, down_proj) by least squares on calibration inputs, layer by layer (with --compensate yes: "
                   "jointly with their biases); obs: also let OBS errors choose which groups of each layer go, the method "
                   "still deciding how many (default: obs for hywia-adaptive, yes for slimgpt, no for the others)")
    p.add_argument("--reconstruct-samples", type=int, default=None, help="calibration windows the reconstruction fits on (default 128)")
    p.add_argument("--judge-samples", type=int, default=None, help="--kind-split evidence-best or evidence-both: calibration windows, a draw of their "
                   "own, on which the two models are compared, window by window (default 100, at least 2)")
    p.add_argument("--judge-calib", default=None, help="--kind-split evidence-best or evidence-both: a second text the judge draws as many windows "
                   "from; the refit share is kept only if it wins beyond the noise on both texts (default c4, wikitext2 when "
                   "calibrating on c4, the calibration text alone with a warning where that cannot be read; none: the "
                   "calibration text alone)")
    p.add_argument("--min-keep", type=int, default=None, help="groups every layer keeps (default 1; MLP may go to 0, attention keeps 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--round-to", type=int, default=None, help="keep a multiple of N MLP channels in every layer (e.g. 8 or 64)")
    p.add_argument("--batch-size", type=int, default=None, help="calibration batch (default 4 structured, 1 unstructured)")
    p.add_argument("--fusion", default=None, help="hywia only: attention (default: the untrained attention fusion model), fixed, "
                   "or evidence (alpha per layer and kind chosen on held-out calibration windows, docs/method.md)")
    p.add_argument("--alpha", type=float, default=None, help="hywia --fusion fixed: weight on the fine-grained score (default 0.5)")
    p.add_argument("--fusion-dim", type=int, default=None, help="hywia --fusion attention: d_model of the fusion model (default 64)")
    p.add_argument("--normalize", default=None, help="hywia, hywia-adaptive, saap: rank (default) or mean, how fine and coarse scores are put on one scale")
    p.add_argument("--spread", type=float, default=None, help="saap: how far layer ratios spread over the layer ranking (default 1, capped at 50%%+ ratios); "
                   "mixed: sparsity spread over the sensitivity ranking, target +- spread (default 0.1)")
    p.add_argument("--granularity", default=None, help="mixed: layer (default) or matrix, the unit that gets its own sparsity")
    p.add_argument("--sensitivity-samples", type=int, default=None, help="mixed: calibration windows the Fisher sensitivity uses (default 8)")
    p.add_argument("--wbits", type=int, default=None, help="sparsegpt, mixed: also quantize the kept weights to N bits in the same pass")
    p.add_argument("--layers-per-pass", type=int, default=None, help="gradient criteria: gather gradients for N decoder layers "
                   "per sweep (N sweeps' time, 1/N of the gradient buffers; default all at once)")
    p.add_argument("--stats-dtype", default=None, help="keep accumulated gradient statistics in float32 (default) or bfloat16 (half the memory)")
    p.add_argument("--stats-store", default=None, help="gradient criteria made of per-group sums (vector, element2, hywia, hywia-adaptive): "
                   "groups (per-group totals summed as backward gives each gradient: no per-weight store; the same scores to float "
                   "rounding; hywia-adaptive's default) or weights (per-weight statistics, two float32 copies of the prunable "
                   "weights; the others' default, and what --stats-dtype sets)")
    p.add_argument("--stats-device", default=None, help="keep accumulated gradient statistics on this device, e.g. cpu (off the GPU)")
    p.add_argument("--checkpointing", action="store_true", help="gradient criteria: recompute layer activations in backward (less memory)")
    p.add_argument("--sequential", action="store_true", help="forward-only statistics (wanda_sp, flap, compensation) one decoder "
                   "layer at a time: only one layer's activations live, and only one layer's weights on --device")
    p.add_argument("--gguf", default=None, help="also write the pruned model as OUT/model.TYPE.gguf for llama.cpp "
                   "(TYPE: f32, f16, bf16, q8_0, q4_0; see hywia export)")
    p.add_argument("--out", required=True, help="output directory (refused if it exists, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--checkpoint-dir", default=None, help="where a reconstructing prune keeps its stages before the build "
                   "(calibration, scores, split), removed once the model is saved (default: OUT.checkpoints beside --out)")
    p.add_argument("--resume", action="store_true", help="continue a killed prune from its checkpoint, at the build")
    p.set_defaults(**(recipe or {}))


def _finetune_parser(sub: argparse._SubParsersAction, recipe: dict | None) -> None:
    """The finetune command: LoRA (or distillation) recovery, merged back."""
    f = sub.add_parser("finetune", help="recover a (pruned) model with LoRA and merge it back")
    _add_common(f)
    f.add_argument("--data", default=None, help="alpaca (the default without --teacher), a json/jsonl file of instruction/input/output "
                   "records, or plain text: a dataset name (c4, the default with --teacher) or a text file, cut into --cutoff-len windows")
    f.add_argument("--teacher", default=None, help="distil from this model (the dense model the student was pruned from; any "
                   "reference --model takes) instead of training on the data's next tokens")
    f.add_argument("--kd-temperature", type=float, default=None, help="with --teacher: temperature of the logit KL (default 1)")
    f.add_argument("--kd-hidden", type=float, default=None, help="with --teacher: weight of the hidden-state (residual stream) loss "
                   "after every layer (default 0: logits only)")
    f.add_argument("--train", default="lora", help="what is trained: lora (default), norms+lora (LoRA and every normalisation "
                   "weight) or full (every weight)")
    f.add_argument("--eval-every", type=int, default=None, help="measure WikiText-2 validation perplexity every N steps (and "
                   "before the first and after the last) and draw it against training tokens in tokens.png")
    f.add_argument("--eval-windows", type=int, default=32, help="with --eval-every: the first N 128-token validation windows")
    f.add_argument("--tokens", type=int, default=None, help="training budget in predicted tokens, instead of --epochs / --max-steps")
    for name, kind, default in (("rank", int, 8), ("lora-alpha", int, 16), ("lora-dropout", float, 0.05), ("lr", float, 1e-4),
                                ("batch-size", int, 64), ("micro-batch-size", int, 4), ("epochs", int, 2),
                                ("max-steps", int, None), ("max-records", int, None), ("warmup-steps", int, 100), ("cutoff-len", int, 256),
                                ("save-steps", int, 50), ("seed", int, 0), ("groups", int, 1)):
        f.add_argument(f"--{name}", type=kind, default=default)
    f.epilog = "--groups N > 1: SAAP's group fine-tuning, N groups of decoder layers trained one after another (deepest first)"
    f.add_argument("--fsdp", action="store_true", help="under accelerate launch: split the frozen weights (and the teacher) over the "
                   "processes instead of one replica each (also on with accelerate launch --use_fsdp)")
    f.add_argument("--checkpoint-dir", default=None, help="where checkpoints go (default: OUT.checkpoints beside --out)")
    f.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    f.add_argument("--recipe", default=None, help="hywia.json of a fine-tuned model: take every fine-tuning option from it "
                   "(those given here win)")
    f.add_argument("--out", required=True)
    f.add_argument("--overwrite", action="store_true")
    f.set_defaults(**(recipe or {}))


def _export_parser(sub: argparse._SubParsersAction) -> None:
    """The export command: a GGUF file for llama.cpp."""
    x = sub.add_parser("export", help="write a (pruned) model as a GGUF file for llama.cpp")
    x.add_argument("--model", required=True, help="a hywia model folder (or a packaged name or .gguf file: the dense model)")
    x.add_argument("--format", default="gguf", help="gguf (the only format so far)")
    x.add_argument("--type", default="f16", help="f32, f16 (default), bf16, q8_0 or q4_0")
    x.add_argument("--pad-to", type=int, default=32, help="pad every FFN width with zero channels to a multiple of N "
                   "(default 32, the q8_0/q4_0 block: exact, and faster in llama.cpp; 1: widths as pruned)")
    x.add_argument("--out", required=True, help="the .gguf file to write (refused if it exists, unless --overwrite)")
    x.add_argument("--overwrite", action="store_true")
    x.add_argument("--json", action="store_true")
    _add_debug(x)


def _bench_parser(sub: argparse._SubParsersAction) -> None:
    """The bench command: speed of models side by side."""
    b = sub.add_parser("bench", help="measure models")
    bsub = b.add_subparsers(dest="bench_command", required=True)
    sp = bsub.add_parser("speed", help="prefill/decode throughput, latency and peak memory, the first model as reference")
    sp.add_argument("--model", required=True, nargs="+", help="models to compare, the dense one first")
    sp.add_argument("--batch-sizes", default="1,8")
    sp.add_argument("--prompt-len", type=int, default=128)
    sp.add_argument("--new-tokens", type=int, default=64)
    sp.add_argument("--repeats", type=int, default=3)
    sp.add_argument("--dtype", default="float32")
    sp.add_argument("--device", default="cpu")
    sp.add_argument("--json", action="store_true")
    _add_debug(sp)


def _eval_parser(sub: argparse._SubParsersAction) -> None:
    """The eval command: perplexity and zero-shot accuracy."""
    e = sub.add_parser("eval", help="evaluate a model")
    esub = e.add_subparsers(dest="eval_command", required=True)
    ppl = esub.add_parser("ppl", help="perplexity on the test split")
    _add_common(ppl)
    ppl.add_argument("--data", default=["wikitext2"], nargs="+",
                     help="wikitext2 (raw), wikitext2-tokens, ptb, c4 or text file paths (several allowed)")
    ppl.add_argument("--backend", default="transformers", help="transformers (default) or llama.cpp: run a .gguf file in "
                     "llama.cpp itself (llama-cpp-python), its own kernels and quantized types, as it will be deployed")
    _add_ppl_protocol(ppl)
    zs = esub.add_parser("zeroshot", help="zero-shot accuracy on the paper's seven tasks (lm-evaluation-harness)")
    _add_common(zs)
    zs.add_argument("--tasks", default="boolq,piqa,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa")
    zs.add_argument("--limit", type=int, default=None, help="score only the first N documents of each task (a fixed subset)")
    zs.add_argument("--ppl", action="store_true", help="add WikiText-2 and PTB perplexity columns (Table 1 layout)")
    zs.add_argument("--hellaswag-case", default="restore", help="restore (default) or as-file: see docs/recovery_and_zeroshot.md")
    _add_ppl_protocol(zs)


def _load_checked(args, name: str | None = None, device: str | None = None):
    """Stages 2 and 3 of hywia.checks around the load: the config before the weights, the weights before use."""
    from .checks import check_config
    from .finite import check_weights
    from .io import load_model, peek_config
    name = name or args.model
    check_config(args, peek_config(name))
    model, tokenizer = load_model(name, args.dtype, device or args.device)
    check_weights(model, f"{name} cannot be pruned, trained or evaluated as it is; use a good checkpoint")
    return model, tokenizer


def _is_main_process() -> bool:
    """False in the other processes `accelerate launch` started (they train, the main process writes and prints)."""
    return int(os.environ.get("RANK", "0")) == 0


def _recipe_path(argv: list[str]) -> Path | None:
    if argv[:1] not in (["prune"], ["finetune"]) or "--recipe" not in argv or argv.index("--recipe") + 1 >= len(argv):
        return None  # argparse itself says a missing value is missing
    return Path(argv[argv.index("--recipe") + 1]).expanduser()


def _recipe_defaults(argv: list[str]) -> dict:
    """For `prune --recipe FILE` (or `finetune --recipe FILE`): the recipe FILE recorded (hywia.Recipe.load, or
    FinetuneSettings.load, every field checked there) and, for a prune, the model and dtype it ran on, as the
    command's defaults, so an option given on the command line still wins."""
    path = _recipe_path(argv)
    if path is None:
        return {}
    if argv[0] == "finetune":
        from .finetune import FinetuneSettings
        return FinetuneSettings.load(path)
    from .recipe import Recipe
    recipe, settings = Recipe.load(path)
    return {**settings, **{k: v for k, v in recipe.as_flags().items() if v is not None}}


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    actions = parser._subparsers._group_actions  # argparse keeps its subparsers there; no public accessor exists
    return next(a for a in actions if isinstance(a, argparse._SubParsersAction)).choices[name]


def _given(argv: list[str]) -> set[str]:
    """The options the command line itself sets (values that differ from its command's defaults)."""
    parser = _parser()
    args, sub = parser.parse_args(argv), _subparser(parser, argv[0])
    return {name for name, value in vars(args).items() if value != sub.get_default(name)}


@contextlib.contextmanager
def _naming_recipe(path: Path, recipe: dict, given: set[str]) -> Iterator[None]:
    """An error about an option the recipe set, not the command line, says so: `--recipe FILE sets --x: ...`."""
    try:
        yield
    except HywiaError as e:
        match = re.search(r"(?<![\w-])--([a-z][a-z0-9-]*)", str(e))
        name = match[1].replace("-", "_") if match else None
        if name in recipe and name not in given:
            raise HywiaError(f"--recipe {path} sets --{match[1]} {recipe[name]}: {e}") from None
        raise


def _prune(args) -> dict:
    from .checkpoints import PRUNE_FILES, check_resume, interrupted, remove_checkpoints
    from .checks import memory_device
    from .figures import write_artifacts
    from .io import save_model
    from .prune import prune
    from .recipe import Recipe
    from .sparsify import sparsify

    recipe = Recipe.from_args(args)
    checkpoints = _checkpoint_dir(args)
    check_resume(checkpoints, args.resume)  # before the model loads: minutes at 7B
    t0 = time.perf_counter()
    model, tokenizer = _load_checked(args)
    load_seconds = time.perf_counter() - t0
    if recipe.unstructured:
        model, report = sparsify(model, tokenizer, recipe, data_dir=args.data_dir)
        artifacts, record = None, report.as_dict()
    else:
        model, report = prune(model, tokenizer, recipe, data_dir=args.data_dir, device=memory_device(args.device),
                              checkpoint_dir=checkpoints, resume=args.resume)
        artifacts, record = (lambda tmp: write_artifacts(tmp, report)), report.as_dict()  # noqa: E731
    if args.gguf:
        from .export import export_gguf
        figures = artifacts

        def artifacts(tmp: Path) -> None:
            if figures is not None:
                figures(tmp)
            export_gguf(model, tmp / f"model.{args.gguf}.gguf", args.gguf, source=args.model)
    record = {"model": args.model, "dtype": args.dtype, "device": args.device, "data_dir": args.data_dir, **record,
              "load_seconds": load_seconds}
    try:
        save_model(model, tokenizer, args.out, record, overwrite=args.overwrite, extra=artifacts)
    except KeyboardInterrupt as e:  # the model was not saved: its prune's stages before the build are still kept
        raise interrupted(e, checkpoints) from None
    remove_checkpoints(checkpoints, PRUNE_FILES)  # the model is saved: the stages kept for a resume are spent (nothing else goes)
    return {**record, "out": str(args.out)}


def _checkpoint_dir(args) -> Path:
    """Where a command keeps its checkpoints: --checkpoint-dir, or OUT.checkpoints beside --out."""
    out = Path(args.out).expanduser()
    return Path(args.checkpoint_dir).expanduser() if args.checkpoint_dir else out.with_name(out.name + ".checkpoints")


def _finetune(args) -> dict:
    import shutil
    import tempfile
    from dataclasses import asdict, fields

    from .figures import plot_curve, plot_losses
    from .checkpoints import remove_checkpoints
    from .finetune import FinetuneSettings, check_recovery, finetune, merge
    from .io import load_model, save_model, stored_dtype
    from .shard import fsdp_requested

    out = Path(args.out).expanduser()
    settings = FinetuneSettings(**{f.name: getattr(args, f.name) for f in fields(FinetuneSettings)})
    checkpoints = _checkpoint_dir(args)
    if args.device == "cuda" and "LOCAL_RANK" in os.environ:
        args.device = f"cuda:{os.environ['LOCAL_RANK']}"  # accelerate launch: one GPU per process
    fsdp = fsdp_requested(args.fsdp)
    load_on = "cpu" if fsdp else args.device  # sharded: each process moves only its part onto the device
    model, tokenizer = _load_checked(args, device=load_on)
    teacher = _load_checked(args, args.teacher, load_on)[0] if args.teacher else None
    source_recipe = Path(args.model) / "hywia.json"
    previous = json.loads(source_recipe.read_text()) if source_recipe.is_file() else {}
    peft_model, report = finetune(model, tokenizer, args.data, settings, checkpoints, args.resume, args.data_dir,
                                  teacher=teacher, teacher_name=args.teacher, fsdp=fsdp, device=args.device if fsdp else None)
    if not _is_main_process():  # under accelerate launch the main process merges, checks and saves
        return {"model": args.model, "out": str(out), **report.as_dict()}
    stored = stored_dtype(args.model) or report.compute_dtype
    reload = fsdp or stored != report.compute_dtype  # sharded weights are merged into a whole copy read from disk
    base = load_model(args.model, stored, "cpu" if fsdp else args.device)[0] if reload else None
    with tempfile.TemporaryDirectory() as adapter_dir:
        if settings.train == "lora":
            peft_model.save_pretrained(adapter_dir)  # the adapter on its own, before merging folds it in
        merged = merge(peft_model, base, settings)
        check_recovery(merged, tokenizer, report)
        # "model" is what this run trained; "base_model" stays the dense model the chain started from (what --recipe prunes)
        base = previous.get("base_model") or previous.get("model")
        replay = {"data": args.data, "teacher": args.teacher, **asdict(settings)}  # what `finetune --recipe` takes back
        if args.teacher is None:  # distillation settings are refused without a teacher: a replay must not carry them
            replay = {k: v for k, v in replay.items() if k not in ("kd_temperature", "kd_hidden")}
        recipe = {**previous, **({"base_model": base} if base else {}), "model": args.model,
                  "finetune": {**report.as_dict(), "recipe": replay}}

        def extra(tmp: Path) -> None:
            if settings.train == "lora":
                shutil.copytree(adapter_dir, tmp / "adapter")
            if report.curve:
                plot_curve(report.curve, tmp / "tokens.png", f"recovery of {Path(args.model).name}"
                           f"{' distilled from ' + Path(args.teacher).name if args.teacher else ''} ({settings.train})")
            plot_losses(report.losses, tmp / "loss.png", f"LoRA recovery of {Path(args.model).name}\n{report.data['trained']} "
                        f"examples, {report.steps} steps, {report.seconds / 60:.1f} min ({report.compute_dtype} compute)")
        save_model(merged, tokenizer, out, recipe, overwrite=args.overwrite, extra=extra)
    remove_checkpoints(checkpoints)  # the run finished: the checkpoints it wrote are no longer needed (nothing else goes)
    return {"model": args.model, "out": str(out), **report.as_dict()}


def _eval(args) -> dict:
    from .evaluate import perplexity
    from .report import count_params

    if getattr(args, "backend", "transformers") == "llama.cpp":
        from . import llama_cpp
        return {"model": args.model, "backend": "llama.cpp", "params": gguf_params(args.model),
                "ppl": {name: llama_cpp.perplexity(args.model, name, args.seq_len, args.max_windows, args.data_dir,
                                                   args.protocol, args.bos).as_dict() for name in args.data}}
    model, tokenizer = _load_checked(args)
    result: dict = {"model": args.model, "params": count_params(model)}
    datasets = args.data if args.eval_command == "ppl" else (["wikitext2", "ptb"] if args.ppl else [])
    batch = args.batch_size
    result["ppl"] = {name: perplexity(model, tokenizer, name, args.seq_len, args.max_windows, args.data_dir, batch,
                                      args.protocol, args.bos).as_dict() for name in datasets}
    if args.eval_command == "zeroshot":
        from .zeroshot import zeroshot
        result["zeroshot"] = zeroshot(model, tokenizer, args.task_list, args.limit, args.data_dir, batch, args.hellaswag_case)
        result["limit"] = args.limit
        result["average"] = sum(r["score"] for r in result["zeroshot"].values()) / len(result["zeroshot"])
    return result


def _export(args) -> dict:
    from .export import export_gguf
    from .io import load_model
    model, _ = load_model(args.model, "float32", "cpu")
    return {"export": export_gguf(model, args.out, args.type, source=args.model, overwrite=args.overwrite, pad_to=args.pad_to)}


def gguf_params(path: str) -> int:
    """Parameters a GGUF file holds (every tensor but llama.cpp's RoPE factors), as count_params counts a model's."""
    import gguf
    return sum(int(t.n_elements) for t in gguf.GGUFReader(path).tensors if t.name != "rope_freqs.weight")


def _bench(args) -> dict:
    from .speed import compare
    return {"speed": compare(args.model, args.batches, args.dtype, args.device, args.prompt_len, args.new_tokens, args.repeats)}


def _print_text(result: dict) -> None:
    if "export" in result:
        done = result["export"]
        fallback = f"; {len(done['f16_fallback'])} matrices kept in f16 (rows not a multiple of 32)" if done["f16_fallback"] else ""
        if done["padded_channels"]:
            fallback += f"; FFN widths padded to multiples of {done['pad_to']} with {done['padded_channels']:,} zero channels (exact)"
        print(f"wrote {done['out']} ({done['bytes'] / 2**20:.1f} MiB, {done['type']}, llama.cpp architecture "
              f"{done['arch']}{'' if done['uniform'] else ', per-layer widths'}){fallback}")
        return
    if "speed" in result:
        from .speed import markdown
        print(markdown(result["speed"]))
        return
    if "steps" in result:
        how = f"distilled from {result['teacher']}" if result["teacher"] else "fine-tuned"
        print(f"{how} {result['model']} for {result['steps']} steps, {result['tokens']:,} tokens (resumed from {result['resumed_from']}), "
              f"last loss {result['losses'][-1]:.4f}, {result['seconds']:.0f}s ({result['compute_dtype']} compute); "
              f"loss on {result['guard']['records']} training records {result['guard']['before']:.4f} -> "
              f"{result['guard']['after']:.4f}; merged model saved to {result['out']} (loss curve: loss.png)")
        return
    if "zeroshot" in result:
        head = [f"{n} ppl" for n in result["ppl"]] + [f"{n} ({r['metric']})" for n, r in result["zeroshot"].items()] + ["average"]
        cells = [f"{r['ppl']:.2f}" for r in result["ppl"].values()] + [f"{100 * r['score']:.2f}" for r in result["zeroshot"].values()]
        print("| model | params | " + " | ".join(head) + " |\n|" + "---|" * (len(head) + 2))
        print(f"| {result['model']} | {result['params']:,} | " + " | ".join(cells) + f" | {100 * result['average']:.2f} |")
        from .evaluate import Perplexity
        for r in result["ppl"].values():
            print(Perplexity(**r).describe())
        documents = ", ".join(f"{n} {r['documents']}" for n, r in result["zeroshot"].items())
        print(f"zero-shot documents scored{' (--limit ' + str(result['limit']) + ')' if result['limit'] else ''}: {documents}")
        return
    if "ppl" in result:
        from .evaluate import Perplexity
        for r in result["ppl"].values():
            print(Perplexity(**r).describe())
        print(f"params: {result['params']:,}")
        return
    if result.get("outcome") == "unstructured":
        print(f"sparsified {result['model']} with {result['method']} at {result['pattern'] or result['sparsity']}: "
              f"{result['zeros']:,} of {result['prunable']:,} decoder weights are zero ({result['achieved_sparsity']:.4f}); "
              f"per-matrix sparsity {min(result['per_matrix'].values()):.3f}-{max(result['per_matrix'].values()):.3f}")
    else:
        print(f"pruned {result['model']} with {result['method']} at ratio {result['ratio']} ({result['scope']} scope): "
              f"removed {result['achieved_ratio']:.4f} of prunable parameters")
        print(f"params: {result['params_before']:,} -> {result['params_after']:,} "
              f"({1 - result['params_after'] / result['params_before']:.2%} fewer overall)")
    print(f"calibration: {result['calibration']}")
    print(f"time {result['seconds']:.1f}s (+{result['load_seconds']:.1f}s load), peak RSS {result['peak_rss_mb']:.0f} MB")
    print(f"saved to {result['out']}")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Parsed and checked arguments (stage 1 of hywia.checks: nothing is loaded). A bad value raises HywiaError
    (SystemExit(2) for what argparse itself refuses), with a one-line message."""
    argv = sys.argv[1:] if argv is None else list(argv)
    recipe = _recipe_defaults(argv)
    args = _parser(recipe).parse_args(argv)
    from . import methods  # noqa: F401  (registers every method the checks name)
    from .checks import check_args, is_unstructured
    if not recipe:
        check_args(args)
        return args
    given = _given(argv)
    replayed = recipe.get("method", getattr(args, "method", None))
    if args.command == "prune" and "method" in given and is_unstructured(args.method) != is_unstructured(replayed):
        kind = lambda method: "an unstructured" if is_unstructured(method) else "a structured"  # noqa: E731
        raise HywiaError(f"--recipe {_recipe_path(argv)} replays {kind(replayed)} prune (--method {replayed}), and --method "
                         f"{args.method} is {kind(args.method)} one: leave out --recipe to prune with {args.method}, or leave out "
                         "--method to replay the recipe")
    with _naming_recipe(_recipe_path(argv), recipe, given):
        check_args(args)
    return args


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    text = str(message).strip()
    print(f"hywia: warning: {text.splitlines()[0] if text else category.__name__}", file=sys.stderr)


def _non_finite(value, path: str = "result") -> str | None:
    """Where in a result a non-finite float sits (JSON has no NaN), or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return path
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    return next((found for key, item in items if (found := _non_finite(item, f"{path}.{key}"))), None)


def _json(result: dict) -> str:
    where = _non_finite(result)
    if where is not None:
        raise HywiaError(f"{where} is not a finite number, which JSON cannot carry; nothing is reported as a result")
    return json.dumps(result)


def _raise_interrupted(signum: int, frame) -> None:
    """Raise Interrupted where the main thread is, unless that is inside a finalizer (`__del__`), where Python would
    print the exception and drop it: then send the signal again a moment later, so no signal is ever lost."""
    while frame is not None:
        if frame.f_code.co_name == "__del__":
            import threading
            threading.Timer(0.05, os.kill, (os.getpid(), signum)).start()
            return
        frame = frame.f_back
    raise Interrupted(signal.Signals(signum).name)


@contextlib.contextmanager
def _signals_interrupt():
    """SIGTERM (kill, timeout, Slurm, docker stop) and SIGHUP end the run as Ctrl-C does: every cleanup runs."""
    names = [n for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n)]
    previous = {n: signal.signal(getattr(signal, n), _raise_interrupted) for n in names}
    try:
        yield
    finally:
        for n, handler in previous.items():
            signal.signal(getattr(signal, n), handler)


def _log_traceback() -> Path | None:
    """Write the current exception's traceback to a log file and return its path (None if nowhere is writable)."""
    from .scratch import cache_dir
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    for folder in (cache_dir() / "logs", Path(os.environ.get("TMPDIR", "/tmp"))):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"hywia-{stamp}-{os.getpid()}.log"
            path.write_text(f"hywia {' '.join(sys.argv[1:])}\n\n{traceback.format_exc()}")
            return path
        except OSError:
            continue
    return None


def _interrupted_line(e: KeyboardInterrupt) -> tuple[str, int]:
    name = e.signal_name if isinstance(e, Interrupted) else "SIGINT"
    kept = e.kept if isinstance(e, Interrupted) and e.kept else "no output was written"
    return f"hywia: interrupted ({name}); {kept}", 128 + int(getattr(signal, name, signal.SIGINT))


def main(argv: list[str] | None = None) -> int:
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    with warnings.catch_warnings(), _signals_interrupt():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.showwarning = _one_line_warning
        try:
            args = parse(argv)
            from .outputs import claim_output
            with claim_output(args.out) if getattr(args, "out", None) and _is_main_process() else contextlib.nullcontext():
                result = {"prune": _prune, "finetune": _finetune, "eval": _eval, "bench": _bench, "export": _export}[args.command](args)
            text = _json(result) if args.json else None
        except HywiaError as e:
            print(f"hywia: error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as e:
            line, code = _interrupted_line(e)
            print(line, file=sys.stderr)
            return code
        except Exception as e:  # a bug, or a failure at a boundary hywia does not know yet: one line, and where the rest is
            first = (str(e).strip().splitlines() or [""])[0]
            if debug:
                traceback.print_exc()
                where = "the traceback is above"
            else:
                log = _log_traceback()
                where = f"the traceback is in {log}" if log else "rerun with --debug for the traceback"
            print(f"hywia: error: unexpected {type(e).__name__}: {first} ({where}; please report it)", file=sys.stderr)
            return 1
    if not _is_main_process():
        return 0
    if text is not None:
        print(text)
    else:
        _print_text(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
