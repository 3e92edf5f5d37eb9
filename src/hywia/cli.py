"""`hywia prune`, `finetune`, `eval ppl|zeroshot` and `bench speed`: parse, call the API, print. Errors are one line,
exit code 2."""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings

from .errors import HywiaError


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="packaged short name (smollm2-135m, gemma3-270m), .gguf file, directory or hub id")
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, or auto / balanced: spread over every GPU (then CPU) by accelerate")
    p.add_argument("--data-dir", default=None, help="offline data folder (default $HYWIA_DATA_DIR): wikitext2/, ptb/ as released")
    p.add_argument("--json", action="store_true", help="print one JSON result object instead of text")


def _add_ppl_protocol(p: argparse.ArgumentParser) -> None:
    p.add_argument("--protocol", default="llm-pruner", help="llm-pruner: 128-token windows (default); "
                   "sparsegpt: 2048-token windows or the model's context when shorter")
    p.add_argument("--seq-len", type=int, default=None, help="window length, overriding --protocol (reported as custom)")
    p.add_argument("--bos", default="auto", help="auto: BOS first in every window if the tokenizer adds BOS (default); yes; no")
    p.add_argument("--max-windows", type=int, default=None, help="score only the first N windows (a fixed subset; default all)")
    p.add_argument("--batch-size", type=int, default=8)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hywia", description="Structured pruning of Hugging Face causal LMs.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prune", help="prune a model and save the smaller model")
    _add_common(p)
    p.add_argument("--method", default="hywia-adaptive", help="structured: hywia-adaptive (default), hywia, saap, random, l1, l2, vector, element1, element2, "
                   "wanda_sp, flap; unstructured (zeros, same shapes): sparsegpt, wanda, mixed, magnitude")
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
                   "of each), evidence (the split with the lowest held-out calibration loss) or the fraction of attention to remove "
                   "(default: evidence for hywia-adaptive, ratio for the others)")
    p.add_argument("--compensate", default=None, choices=("yes", "no"), help="fold the removed inputs' calibration means into the "
                   "output biases (FLAP's bias compensation; default: yes for flap, no for the others)")
    p.add_argument("--min-keep", type=int, default=None, help="groups every layer keeps (default 1; MLP may go to 0, attention keeps 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--round-to", type=int, default=None, help="keep a multiple of N MLP channels in every layer (e.g. 8 or 64)")
    p.add_argument("--batch-size", type=int, default=None, help="calibration batch (default 4 structured, 1 unstructured)")
    p.add_argument("--fusion", default=None, help="hywia only: attention (default: the untrained attention fusion model), fixed, "
                   "or evidence (alpha per layer and kind chosen on held-out calibration windows, docs/method.md)")
    p.add_argument("--alpha", type=float, default=None, help="hywia --fusion fixed: weight on the fine-grained score (default 0.5)")
    p.add_argument("--fusion-dim", type=int, default=None, help="hywia --fusion attention: d_model of the fusion model (default 64)")
    p.add_argument("--normalize", default=None, help="hywia, hywia-adaptive, saap: rank (default) or mean, how fine and coarse scores are put on one scale")
    p.add_argument("--spread", type=float, default=None, help="saap: how far layer ratios spread over the layer ranking (default 1, capped at 50%+ ratios); "
                   "mixed: sparsity spread over the sensitivity ranking, target +- spread (default 0.1)")
    p.add_argument("--granularity", default=None, help="mixed: layer (default) or matrix, the unit that gets its own sparsity")
    p.add_argument("--sensitivity-samples", type=int, default=None, help="mixed: calibration windows the Fisher sensitivity uses (default 8)")
    p.add_argument("--wbits", type=int, default=None, help="sparsegpt, mixed: also quantize the kept weights to N bits in the same pass")
    p.add_argument("--layers-per-pass", type=int, default=None, help="gradient criteria: gather gradients for N decoder layers "
                   "per sweep (N sweeps' time, 1/N of the gradient buffers; default all at once)")
    p.add_argument("--stats-dtype", default=None, help="keep accumulated gradient statistics in float32 (default) or bfloat16 (half the memory)")
    p.add_argument("--stats-device", default=None, help="keep accumulated gradient statistics on this device, e.g. cpu (off the GPU)")
    p.add_argument("--checkpointing", action="store_true", help="gradient criteria: recompute layer activations in backward (less memory)")
    p.add_argument("--sequential", action="store_true", help="forward-only statistics (wanda_sp, flap, compensation) one decoder "
                   "layer at a time: only one layer's activations live, and only one layer's weights on --device")
    p.add_argument("--out", required=True, help="output directory (refused if it exists, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true")

    f = sub.add_parser("finetune", help="recover a (pruned) model with LoRA and merge it back")
    _add_common(f)
    f.add_argument("--data", default="alpaca", help="alpaca, or a json/jsonl file of instruction/input/output records")
    for name, kind, default in (("rank", int, 8), ("lora-alpha", int, 16), ("lora-dropout", float, 0.05), ("lr", float, 1e-4),
                                ("batch-size", int, 64), ("micro-batch-size", int, 4), ("epochs", int, 2),
                                ("max-steps", int, None), ("max-records", int, None), ("warmup-steps", int, 100), ("cutoff-len", int, 256),
                                ("save-steps", int, 50), ("seed", int, 0), ("groups", int, 1)):
        f.add_argument(f"--{name}", type=kind, default=default)
    f.epilog = "--groups N > 1: SAAP's group fine-tuning, N groups of decoder layers trained one after another (deepest first)"
    f.add_argument("--checkpoint-dir", default=None, help="where checkpoints go (default: OUT.checkpoints beside --out)")
    f.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    f.add_argument("--out", required=True)
    f.add_argument("--overwrite", action="store_true")

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

    e = sub.add_parser("eval", help="evaluate a model")
    esub = e.add_subparsers(dest="eval_command", required=True)
    ppl = esub.add_parser("ppl", help="perplexity on the test split")
    _add_common(ppl)
    ppl.add_argument("--data", default=["wikitext2"], nargs="+",
                     help="wikitext2 (raw), wikitext2-tokens, ptb, c4 or text file paths (several allowed)")
    _add_ppl_protocol(ppl)
    zs = esub.add_parser("zeroshot", help="zero-shot accuracy on the paper's seven tasks (lm-evaluation-harness)")
    _add_common(zs)
    zs.add_argument("--tasks", default="boolq,piqa,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa")
    zs.add_argument("--limit", type=int, default=None, help="score only the first N documents of each task (a fixed subset)")
    zs.add_argument("--ppl", action="store_true", help="add WikiText-2 and PTB perplexity columns (Table 1 layout)")
    zs.add_argument("--hellaswag-case", default="restore", help="restore (default) or as-file: see docs/recovery_and_zeroshot.md")
    _add_ppl_protocol(zs)
    return parser


STRUCTURED_ONLY = ("ratio", "scope", "target", "layers", "min_keep", "round_to", "fusion", "alpha", "fusion_dim", "normalize",
                   "attention_unit", "kind_split", "compensate", "layers_per_pass", "stats_dtype", "stats_device")
UNSTRUCTURED_ONLY = ("sparsity", "pattern", "granularity", "sensitivity_samples", "wbits")


def _refuse(args, names: tuple[str, ...], kind: str) -> None:
    given = [n for n in names if getattr(args, n) is not None]
    if given:
        flag = "--" + given[0].replace("_", "-")
        fix = "it takes --sparsity or --pattern" if kind == "unstructured" else "it takes --ratio"
        raise HywiaError(f"{flag} does not apply to --method {args.method}, which is {kind} pruning ({fix})")


def _prune(args) -> dict:
    from .data import data_dir
    from .figures import write_artifacts
    from .importance import Memory
    from .io import ACCELERATE_MAPS, check_output, load_model, save_model
    from .prune import check_options, prune
    from .sparsify import SPARSIFIERS, sparsify

    unstructured = args.method in SPARSIFIERS
    _refuse(args, STRUCTURED_ONLY if unstructured else UNSTRUCTURED_ONLY, "unstructured" if unstructured else "structured")
    names = ("spread", "granularity", "sensitivity_samples", "wbits") if unstructured else ("fusion", "alpha", "fusion_dim", "normalize", "spread")
    method_options = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    calib = args.calib or ("c4" if unstructured else "wikitext2")
    samples, seq_len = args.samples or (128 if unstructured else 10), args.seq_len or (2048 if unstructured else 128)
    batch_size = args.batch_size or (1 if unstructured else 4)
    check_output(args.out, args.overwrite)  # fail before minutes of work, not after
    if unstructured:
        from .sparsify import check_options as check_sparsity
        check_sparsity(args.method, args.sparsity, args.pattern, method_options)
    else:
        if args.ratio is None:
            raise HywiaError(f"--method {args.method} needs --ratio (fraction of prunable parameters to remove, e.g. 0.2)")
        check_options(args.method, args.ratio, args.scope, args.target or "both", method_options, args.round_to or 1,
                      args.attention_unit, args.kind_split)
        memory = Memory(args.layers_per_pass, args.stats_dtype or "float32", args.stats_device, args.checkpointing,
                        args.sequential, None if args.device in ACCELERATE_MAPS else args.device)
        memory.check()
    data_dir(args.data_dir)
    if samples < 1 or seq_len < 2:
        raise HywiaError("--samples must be >= 1 and --seq-len >= 2")
    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model, args.dtype, args.device)
    load_seconds = time.perf_counter() - t0
    if unstructured:
        model, report = sparsify(model, tokenizer, method=args.method, sparsity=args.sparsity, pattern=args.pattern, calib=calib,
                                 samples=samples, seq_len=seq_len, seed=args.seed, data_dir=args.data_dir,
                                 batch_size=batch_size, **method_options)
        artifacts = None
    else:
        model, report = prune(model, tokenizer, method=args.method, ratio=args.ratio, calib=calib, samples=samples,
                              seq_len=seq_len, scope=args.scope, target=args.target or "both", layers=args.layers,
                              min_keep=1 if args.min_keep is None else args.min_keep, seed=args.seed, data_dir=args.data_dir,
                              batch_size=batch_size, round_to=args.round_to or 1, attention_unit=args.attention_unit,
                              compensate=None if args.compensate is None else args.compensate == "yes",
                              kind_split=args.kind_split, memory=memory,
                              **method_options)
        artifacts = lambda tmp: write_artifacts(tmp, report)  # noqa: E731
    recipe = {"model": args.model, "dtype": args.dtype, **report.as_dict(), "load_seconds": load_seconds}
    save_model(model, tokenizer, args.out, recipe, overwrite=args.overwrite, extra=artifacts)
    return {**recipe, "out": str(args.out)}


def _finetune(args) -> dict:
    import shutil
    import tempfile
    from dataclasses import fields
    from pathlib import Path

    from .figures import plot_losses
    from .finetune import FinetuneSettings, check_recovery, finetune, merge
    from .io import check_output, load_model, save_model, stored_dtype

    out = check_output(args.out, args.overwrite)
    settings = FinetuneSettings(**{f.name: getattr(args, f.name) for f in fields(FinetuneSettings)
                                   if f.name not in ("lora_alpha", "lora_dropout")},
                                lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout)
    checkpoints = Path(args.checkpoint_dir) if args.checkpoint_dir else out.with_name(out.name + ".checkpoints")
    model, tokenizer = load_model(args.model, args.dtype, args.device)
    source_recipe = Path(args.model) / "hywia.json"
    previous = json.loads(source_recipe.read_text()) if source_recipe.is_file() else {}
    peft_model, report = finetune(model, tokenizer, args.data, settings, checkpoints, args.resume, args.data_dir)
    stored = stored_dtype(args.model)
    base = load_model(args.model, stored, args.device)[0] if stored and stored != report.compute_dtype else None
    with tempfile.TemporaryDirectory() as adapter_dir:
        peft_model.save_pretrained(adapter_dir)  # the adapter on its own, before merging folds it in
        merged = merge(peft_model, base, settings)
        check_recovery(merged, tokenizer, report)
        recipe = {**previous, "model": args.model, "finetune": report.as_dict()}

        def extra(tmp: Path) -> None:
            shutil.copytree(adapter_dir, tmp / "adapter")
            plot_losses(report.losses, tmp / "loss.png", f"LoRA recovery of {Path(args.model).name}\n{report.data['records']} "
                        f"records, {report.steps} steps, {report.seconds / 60:.1f} min ({report.compute_dtype} compute)")
        save_model(merged, tokenizer, out, recipe, overwrite=args.overwrite, extra=extra)
    shutil.rmtree(checkpoints, ignore_errors=True)  # the run finished: its checkpoints are no longer needed
    return {"model": args.model, "out": str(out), **report.as_dict()}


def _eval(args) -> dict:
    from .evaluate import perplexity
    from .io import load_model
    from .prune import count_params

    if args.eval_command == "zeroshot":
        from .zeroshot import check_options, zeroshot
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        check_options(tasks, args.hellaswag_case)
    model, tokenizer = load_model(args.model, args.dtype, args.device)
    result: dict = {"model": args.model, "params": count_params(model)}
    datasets = args.data if args.eval_command == "ppl" else (["wikitext2", "ptb"] if args.ppl else [])
    batch = args.batch_size
    result["ppl"] = {name: perplexity(model, tokenizer, name, args.seq_len, args.max_windows, args.data_dir, batch,
                                      args.protocol, args.bos).as_dict() for name in datasets}
    if args.eval_command == "zeroshot":
        result["zeroshot"] = zeroshot(model, tokenizer, tasks, args.limit, args.data_dir, batch, args.hellaswag_case)
        result["limit"] = args.limit
        result["average"] = sum(r["score"] for r in result["zeroshot"].values()) / len(result["zeroshot"])
    return result


def _bench(args) -> dict:
    from .speed import compare
    try:
        batches = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    except ValueError:
        raise HywiaError(f"--batch-sizes {args.batch_sizes!r}: give comma-separated integers, e.g. 1,8") from None
    if not batches or min(batches) < 1 or min(args.prompt_len, args.new_tokens, args.repeats) < 1:
        raise HywiaError("--batch-sizes, --prompt-len, --new-tokens and --repeats must be positive")
    return {"speed": compare(args.model, batches, args.dtype, args.device, args.prompt_len, args.new_tokens, args.repeats)}


def _print_text(result: dict) -> None:
    if "speed" in result:
        from .speed import markdown
        print(markdown(result["speed"]))
        return
    if "steps" in result:
        print(f"fine-tuned {result['model']} for {result['steps']} steps (resumed from {result['resumed_from']}), "
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


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            result = {"prune": _prune, "finetune": _finetune, "eval": _eval, "bench": _bench}[args.command](args)
    except HywiaError as e:
        print(f"hywia: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hywia: interrupted; nothing was written", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(result))
    else:
        _print_text(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
