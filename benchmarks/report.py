"""Markdown tables for docs/RESULTS.md from benchmarks/results/*.jsonl (nothing is typed by hand), and the README's
figure (quality against kept parameters, every method on every model, docs/figures/quality_vs_params.png).

    python benchmarks/report.py                 # the tables
    python benchmarks/report.py --figure        # the figure

Rows that differ only by seed are merged into mean ± sample standard deviation, with the seed count.
"""
import json
import statistics
from collections import defaultdict
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
DATA = ("wikitext2", "ptb")


def load(name: str) -> list[dict]:
    path = RESULTS / name
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def label(row: dict) -> str:
    """"hywia, fixed α=0.5, mean-normalised" from the method and its extra flags."""
    if row["ratio"] == 0:
        return "dense"
    flags = dict(zip(row["extra"][::2], row["extra"][1::2]))
    parts = [row["method"]]
    if flags.pop("--fusion", None) == "fixed":
        parts.append(f"fixed α={flags.pop('--alpha', '0.5')}")
    if flags.pop("--normalize", None) == "mean":
        parts.append("mean-normalised")
    parts += [f"{k} {v}" for k, v in flags.items()]
    return ", ".join(parts)


def cell(values: list[float], digits: int = 2) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def quality_table(records: list[dict], samples: int | None) -> str:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        row = r["row"]
        if row["ratio"] > 0 and samples is not None and row["method"] not in ("l1", "l2", "random") and row["samples"] != samples:
            continue
        groups[(row["ratio"], label(row))].append(r)
    lines = ["| method | ratio | seeds | params | WikiText-2 ppl | PTB ppl |", "|---|---|---|---|---|---|"]
    for (ratio, name), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], statistics.mean(r["ppl"]["wikitext2"] for r in kv[1]))):
        ppl = [cell([r["ppl"][d] for r in rs]) for d in DATA]
        lines.append(f"| {name} | {ratio:.0%} | {len(rs)} | {rs[0]['params']:,} | {ppl[0]} | {ppl[1]} |")
    return "\n".join(lines)


PAIRS = tuple((a + suffix, b + (suffix if b != "element2" else "")) for suffix in ("", ", mean-normalised")
              for a, b in (("hywia", "element2"), ("hywia", "hywia, fixed α=0.5"), ("hywia, fixed α=0.5", "element2")))
PAIRS += (("hywia", "hywia, mean-normalised"), ("flap, --scope layer", "element2"), ("hywia", "flap, --scope layer"),
          ("flap", "flap, --scope layer"))


def paired_table(records: list[dict]) -> str:
    """Per-seed WikiText-2 ppl ratios of rows calibrated on the same windows (same seed): calibration noise cancels."""
    ppl = {(r["row"]["ratio"], r["row"]["samples"], label(r["row"]), r["row"]["seed"]): r["ppl"]["wikitext2"] for r in records}
    lines = ["| ratio | samples | comparison (WikiText-2 ppl ratio, per seed) | seeds | mean ± std | per seed |", "|---|---|---|---|---|---|"]
    for ratio, samples in sorted({(k[0], k[1]) for k in ppl if k[0] > 0}):
        for a, b in PAIRS:
            seeds = sorted(s for (r, n, name, s) in ppl if (r, n, name) == (ratio, samples, a) and (ratio, samples, b, s) in ppl)
            if len(seeds) < 2:
                continue
            ratios = [ppl[(ratio, samples, a, s)] / ppl[(ratio, samples, b, s)] for s in seeds]
            per_seed = ", ".join(f"{x:.2f}" for x in ratios)
            lines.append(f"| {ratio:.0%} | {samples} | {a} / {b} | {len(seeds)} | {cell(ratios)} | {per_seed} |")
    return "\n".join(lines)


def cost_table(records: list[dict]) -> str:
    lines = ["| method | ratio | calibration samples | prune s | load s | peak RSS MB |", "|---|---|---|---|---|---|"]
    methods = list(dict.fromkeys(r["row"]["method"] for r in records))  # first-measured order
    for r in sorted(records, key=lambda r: (r["row"]["samples"], r["row"]["ratio"], methods.index(r["row"]["method"]))):
        row = r["row"]
        lines.append(f"| {row['method']} | {row['ratio']:.0%} | {row['samples']} | {r['prune_seconds']:.1f} | "
                     f"{r['load_seconds']:.1f} | {r['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def cost_by_size_table(records: list[dict]) -> str:
    """Prune seconds and peak memory of each method and ratio on each model (one quiet process a row, all on one
    machine: the caller groups them), the peak as a
    multiple of the float32 weights (bytes over bytes; GB = 10^9 bytes) and the time as a multiple of SlimGPT's on the same model; under it, per method
    and ratio, the power law seconds = c * params^k fitted on the sizes measured and what it gives at 7B and 70B
    (the same machine: an extrapolation of the fit, not a measurement), for three sizes or more. A row run with more
    flags is its own method (its flags beside the name), timed against SlimGPT's plain row."""
    import math
    lines = ["| model | params | method | ratio | prune s | × SlimGPT | peak RSS GB | × float32 weights |", "|---|---|---|---|---|---|---|---|"]
    method = lambda r: " ".join([r["row"]["method"], *r["row"].get("extra", [])])  # noqa: E731
    slim = {(r["row"]["model"], r["row"]["ratio"]): r["prune_seconds"] for r in records if method(r) == "slimgpt"}
    for r in sorted(records, key=lambda r: (r["params_before"], method(r), r["row"]["ratio"])):
        row, peak = r["row"], r["peak_rss_mb"] * 2**20  # hywia.json's peak_rss_mb is MiB (Linux's kB / 1024): bytes here
        versus = f"{r['prune_seconds'] / slim[(row['model'], row['ratio'])]:.2f}" if (row["model"], row["ratio"]) in slim else "-"
        lines.append(f"| {row['model']} | {r['params_before'] / 1e6:,.0f} M | {method(r)} | {row['ratio']:.0%} | "
                     f"{r['prune_seconds']:,.0f} | {versus} | {peak / 1e9:.1f} | {peak / (4 * r['params_before']):.2f} |")
    fits = []
    for (name, ratio) in sorted({(method(r), r["row"]["ratio"]) for r in records}):
        points = sorted((r["params_before"], r["prune_seconds"]) for r in records if (method(r), r["row"]["ratio"]) == (name, ratio))
        if len({p for p, _ in points}) < 3:  # two sizes give a slope, not a fit anyone should extrapolate
            continue
        x = [math.log(p) for p, _ in points]
        y = [math.log(t) for _, t in points]
        mx, my = sum(x) / len(x), sum(y) / len(y)
        k = sum((a - mx) * (b - my) for a, b in zip(x, y)) / sum((a - mx) ** 2 for a in x)
        at = lambda params: math.exp(my + k * (math.log(params) - mx)) / 3600  # noqa: E731
        fits.append(f"| {name} | {ratio:.0%} | {len(points)} | k = {k:.2f} | {at(7e9):,.1f} h | {at(7e10):,.0f} h |")
    if fits:
        lines += ["", "| method | ratio | sizes | seconds ∝ params^k | estimate at 7B | at 70B |", "|---|---|---|---|---|---|", *fits]
    return "\n".join(lines)


def pairs_table(records: list[dict]) -> str:
    """benchmarks/prune_cost.py rows of the default and SlimGPT run back to back, each tagged with the commit it ran at
    (`"commit"`, added when the rows were gathered), in the order they ran: neighbouring rows of one model and ratio,
    one of each method, are a pair (two commits, "a / b", where the prune's code is the same at both). For each pair,
    the default's seconds with its split and build stages, SlimGPT's, their ratio, and each one's peak as a multiple
    of the float32 weights ("-" for a side that did not finish)."""
    pairs: list[tuple[tuple, dict]] = []  # ((model, ratio), method -> row)
    for r in records:
        key = r["row"]["model"], r["row"]["ratio"]
        if not pairs or pairs[-1][0] != key or r["row"]["method"] in pairs[-1][1]:
            pairs.append((key, {}))
        pairs[-1][1][r["row"]["method"]] = r
    lines = ["| model | ratio | commit | the default, s | SlimGPT, s | × SlimGPT | peak × float32 weights: the default, SlimGPT |",
             "|---|---|---|---|---|---|---|"]
    for (model, ratio), pair in pairs:
        default, slim = pair.get("hywia-adaptive"), pair.get("slimgpt")
        default_s = slim_s = multiple = "-"
        if default:
            stages = ", ".join(f"{name} {v['seconds']:,.0f}" for name, v in default["stages"].items() if name in ("split", "build aside", "build"))
            default_s = f"{default['prune_seconds']:,.0f} ({stages})"
        if slim:
            slim_s = f"{slim['prune_seconds']:,.0f}"
        if default and slim:
            multiple = f"{default['prune_seconds'] / slim['prune_seconds']:.2f}"
        commits = " / ".join(dict.fromkeys(r["commit"] for r in (slim, default) if r))
        peaks = ", ".join(f"{r['peak_rss_mb'] * 2**20 / (4 * r['params_before']):.2f}" if r else "-" for r in (default, slim))
        lines.append(f"| {model} | {ratio:.0%} | {commits} | {default_s} | {slim_s} | {multiple} | {peaks} |")
    return "\n".join(lines)


def judges_table(records: list[dict]) -> str:
    """The default's prunes (`evidence-best`: its judge reads the two built models) beside `--kind-split evidence-both`
    (the judge reads the refit screen's one-shot models) at one model, ratio and seed, with SlimGPT's row where one ran
    the same day: the screens' attention shares (masked, refit), each judge's paired difference (refit - masked, nats a
    token, ± its standard error) on each text and the share it kept, whether the kept groups are the same, and each
    prune's seconds ("-" for a run that is not there)."""
    cells: dict[tuple, dict] = {}
    for r in records:
        row = r["row"]
        side = "slimgpt" if row["method"] == "slimgpt" else "screened" if "evidence-both" in row["extra"] else "built"
        cells.setdefault((row["model"], row["ratio"], row["seed"]), {})[side] = r
    lines = ["| model | ratio | seed | screens: masked, refit | judge of the built models | judge of the screened models | "
             "same kept groups | seconds: built, screened, SlimGPT |", "|---|---|---|---|---|---|---|---|"]
    for (model, ratio, seed), cell in cells.items():
        built, screened, slim = (cell.get(side) for side in ("built", "screened", "slimgpt"))
        screens = (built or screened)["kind_split_evidence"]["screened"]
        shares = ", ".join(f"{screens[name]['attention_share']:g}" for name in ("masked", "refit"))
        same = "-" if not (built and screened) else "yes" if built["kept_digest"] == screened["kept_digest"] else "no"
        seconds = ", ".join(f"{r['prune_seconds']:,.0f}" if r else "-" for r in (built, screened, slim))
        lines.append(f"| {model} | {ratio:.0%} | {seed} | {shares} | {_verdict(built)} | {_verdict(screened)} | {same} | {seconds} |")
    return "\n".join(lines)


def _verdict(record: dict | None) -> str:
    """A judge's differences on each text and the share it kept ("none" where the screens agreed)."""
    if record is None:
        return "-"
    evidence = record["kind_split_evidence"]
    judge = evidence.get("judge")
    if judge is None:  # the screens agreed: nothing to judge
        return f"none (screens agree) → {evidence['attention_share']:g}"
    texts = judge.get("texts", {"calibration": judge})
    return "; ".join(f"{name} {v['difference']:+.3f} ± {v['standard_error']:.3f}" for name, v in texts.items()) + \
        f" → {evidence['attention_share']:g}"


def store_table(records: list[dict]) -> str:
    """benchmarks/prune_cost.py rows of one method with and without `--stats-store groups` (one machine, one quiet
    process a row): seconds, the whole prune's peak and the calibrate stage's, as multiples of the float32 weights."""
    lines = ["| model | method | ratio | statistics | prune s | peak RSS GB | × float32 weights | calibrate stage peak GB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(records, key=lambda r: (r["params_before"], r["row"]["method"], r["row"]["ratio"], r["row"]["extra"])):
        row, peak = r["row"], r["peak_rss_mb"] * 2**20
        store = "per-group totals" if "groups" in row["extra"] else "per-weight"
        calibrate = r["stages"]["calibrate"]["peak_rss_mb"] * 2**20
        lines.append(f"| {row['model']} | {row['method']} | {row['ratio']:.0%} | {store} | {r['prune_seconds']:,.0f} | "
                     f"{peak / 1e9:.2f} | {peak / (4 * r['params_before']):.2f} | {calibrate / 1e9:.2f} |")
    return "\n".join(lines)


STAGES = ("before", "calibrate", "score", "split", "build aside", "build")


def stage_table(records: list[dict]) -> str:
    """benchmarks/prune_cost.py rows with each stage's own peak (hywia.json's stages; "before" is loading), GB:
    where a prune's memory goes, and which stage sets its peak."""
    lines = ["| model | method | ratio | options | prune s | peak GB | × float32 weights | " + " | ".join(STAGES) + " |",
             "|" + "---|" * (7 + len(STAGES))]
    for r in sorted(records, key=lambda r: (r["params_before"], r["row"]["method"], r["row"]["extra"], sorted(r.get("env", {}).items()))):
        row, peak = r["row"], r["peak_rss_mb"] * 2**20
        options = " ".join([*row["extra"], *(f"{k}={v}" for k, v in r.get("env", {}).items())]) or "-"
        stages = " | ".join(f"{r['stages'][s]['peak_rss_mb'] * 2**20 / 1e9:.2f}" if s in r["stages"] else "-" for s in STAGES)
        lines.append(f"| {row['model']} | {row['method']} | {row['ratio']:.0%} | {options} | {r['prune_seconds']:,.0f} | "
                     f"{peak / 1e9:.2f} | {peak / (4 * r['params_before']):.2f} | {stages} |")
    return "\n".join(lines)


def cost_by_machine(records: list[dict]) -> str:
    """One cost table by size per machine the rows ran on: seconds compare only on one machine."""
    sections = [f"\n## Prune cost by model size (one quiet process a row; {machine})\n\n"
                + cost_by_size_table([r for r in records if r["machine"] == machine])
                for machine in dict.fromkeys(r["machine"] for r in records)]
    return "\n".join(sections)


TASK_COLUMNS = (("boolq", "BoolQ"), ("piqa", "PIQA"), ("hellaswag", "HellaS."), ("winogrande", "WinoG."), ("arc_easy", "ARC-e"),
                ("arc_challenge", "ARC-c"), ("openbookqa", "OBQA"))


def table1(records: list[dict]) -> str:
    """The paper's Table 1 layout: ppl (llm-pruner protocol) then the seven accuracies (%) and their average."""
    head = "| model | ratio | params | WikiText-2 | PTB | " + " | ".join(n for _, n in TASK_COLUMNS) + " | average |"
    lines = [head, "|" + "---|" * (6 + len(TASK_COLUMNS))]
    for r in sorted(records, key=lambda r: (r["ratio"], r["recovered"], -r["average"])):
        accs = " | ".join(f"{100 * r['zeroshot'][t]['score']:.1f}" for t, _ in TASK_COLUMNS)
        ppl = r["ppl_128"]
        lines.append(f"| {r['name']} | {r['ratio']:.0%} | {r['params']:,} | {ppl['wikitext2']['ppl']:.2f} | {ppl['ptb']['ppl']:.2f} | "
                     f"{accs} | {100 * r['average']:.2f} |")
    return "\n".join(lines)


def table1_long(records: list[dict]) -> str:
    """Both perplexity protocols side by side, with the recovery cost of recovered rows."""
    lines = ["| model | WikiText-2 (128) | PTB (128) | WikiText-2 (2048) | PTB (2048) | recovery | eval s |", "|---|---|---|---|---|---|---|"]
    for r in sorted(records, key=lambda r: (r["ratio"], r["recovered"], -r["average"])):
        a, b = r["ppl_128"], r["ppl_2048"]
        tune = (f"{r['finetune_steps']} steps, {r['finetune_records']} {'C4 windows' if r.get('mode') == 'kd' else 'records'}"
                + (f", {r['finetune_tokens']:,} tokens" if r.get("finetune_tokens") else "")
                + f", {r['finetune_seconds'] / 60:.0f} min"
                + (f" (after a resume at step {r['finetune_resumed_from']})" if r.get("finetune_resumed_from") else "")
                + (f", peak {r['finetune_peak_rss_mb'] / 1024:.1f} GB" if r.get("finetune_peak_rss_mb") else "")
                + (f", {r['finetune_processes']['count']} process{'es' if r['finetune_processes']['count'] > 1 else ''}"
                   + (" (FSDP)" if r['finetune_processes'].get('fsdp') else "") if r.get("finetune_processes") else "")
                + f"; guard loss {r['guard']['before']:.3f} → {r['guard']['after']:.3f}") if r["recovered"] else "-"
        lines.append(f"| {r['name']} | {a['wikitext2']['ppl']:.2f} | {a['ptb']['ppl']:.2f} | {b['wikitext2']['ppl']:.2f} | "
                     f"{b['ptb']['ppl']:.2f} | {tune} | {r['eval_seconds']:.0f} |")
    return "\n".join(lines)


def recovery_curves(records: list[dict]) -> str:
    """WikiText-2 validation perplexity (the choice corpus) against training tokens, for the rows recovered with a curve."""
    lines = ["| model | WikiText-2 validation ppl at k training tokens | last step's gain |", "|---|---|---|"]
    for r in records:
        curve = r.get("finetune_curve")
        if curve:
            points = ", ".join(f"{c['ppl']:.2f} @{c['tokens'] / 1000:.0f}k" for c in curve)
            gain = curve[-1]["ppl"] / curve[-2]["ppl"] - 1 if len(curve) > 1 else float("nan")
            lines.append(f"| {r['name']}, seed {json.loads(r['key'])['seed']} | {points} | {gain:+.1%} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def table1_seeds(records: list[dict]) -> str:
    """Table 1 rows measured at several seeds (perplexity, 128-token protocol): mean ± std, and per seed the ratio to
    the same model before recovery and to Element² recovered the same way; seed s prunes on calibration draw s and
    recovers with data order s, and every seed is evaluated on the same windows."""
    by: dict[str, dict[int, dict]] = defaultdict(dict)
    for r in records:
        key = json.loads(r["key"])
        by[key["row"]][key["seed"]] = r  # the perplexity-only rerun of a seed measures the same windows
    dense = next(iter(by["dense"].values()))["ppl_128"]["wikitext2"]["ppl"]
    lines = ["| model | seeds | WikiText-2 (128) | × dense | PTB (128) | WikiText-2 (2048) | per seed (WikiText-2) | "
             "/ before recovery (per seed) | / Element² the same way (per seed) |", "|---|---|---|---|---|---|---|---|---|"]

    def per_seed(mine: dict[int, dict], other: dict[int, dict] | None) -> str:
        seeds = sorted(set(mine) & set(other or {}))
        ratios = [mine[s]["ppl_128"]["wikitext2"]["ppl"] / other[s]["ppl_128"]["wikitext2"]["ppl"] for s in seeds]
        return f"{cell(ratios, 3)} ({', '.join(f'{x:.3f}' for x in ratios)})" if ratios else "-"

    for row, seeds in by.items():
        if len(seeds) < 2:
            continue
        rs = [seeds[s] for s in sorted(seeds)]
        wiki = [r["ppl_128"]["wikitext2"]["ppl"] for r in rs]
        method, ratio, *budget = row.split(" ")
        before = by.get(f"{method} {ratio}") if budget else None
        element2 = by.get(" ".join(["element2", ratio, *budget])) if method != "element2" else None
        lines.append(f"| {rs[0]['name']} | {len(rs)} | {cell(wiki)} | {statistics.mean(wiki) / dense:.2f} | "
                     f"{cell([r['ppl_128']['ptb']['ppl'] for r in rs])} | {cell([r['ppl_2048']['wikitext2']['ppl'] for r in rs])} | "
                     f"{', '.join(f'{x:.2f}' for x in wiki)} | {per_seed(seeds, before)} | {per_seed(seeds, element2)} |")
    return "\n".join(lines) if len(lines) > 2 else ""


LEVELS = ("0.5", "0.6", "0.7", "2:4")


def sparsity_table(records: list[dict]) -> str:
    """benchmarks/sparsity.py rows (its own dense row first): both WikiText-2 protocols, PTB, the zero-shot average,
    the spread of per-layer sparsity that mixed sparsity allocates, and each row's WikiText-2 (128) perplexity over
    SparseGPT's at the same level (the paired comparison the mixed-sparsity paper makes)."""
    lines = ["| method | sparsity | per-layer sparsity | WikiText-2 (128) | WikiText-2 (2048) | PTB (128) | PTB (2048) | average | "
             "WikiText-2 (128) / SparseGPT's | prune s |", "|---|---|---|---|---|---|---|---|---|---|"]
    sparsegpt = {r["level"]: r["ppl_128"]["wikitext2"]["ppl"] for r in records if r["method"] == "sparsegpt"}
    for r in sorted(records, key=lambda r: (LEVELS.index(r["level"]) if r["level"] in LEVELS else -1, r["method"])):
        layers: dict[str, list[float]] = defaultdict(list)
        for name, value in r.get("per_matrix", {}).items():
            layers[name.split(".")[2]].append(value)
        per_layer = [statistics.mean(v) for v in layers.values()]
        spread = f"{min(per_layer):.3f}–{max(per_layer):.3f}" if per_layer else "-"
        wiki = r["ppl_128"]["wikitext2"]["ppl"]
        ratio = f"{wiki / sparsegpt[r['level']]:.3f}" if r["level"] in sparsegpt else "-"
        seconds = f"{r['prune_seconds']:.0f}" if "prune_seconds" in r else "-"
        lines.append(f"| {r['method']} | {r['level']} | {spread} | {wiki:.2f} | {r['ppl_2048']['wikitext2']['ppl']:.2f} | "
                     f"{r['ppl_128']['ptb']['ppl']:.2f} | {r['ppl_2048']['ptb']['ppl']:.2f} | {100 * r['average']:.2f} | {ratio} | {seconds} |")
    return "\n".join(lines)


def sparsity_seeds_table(records: list[dict]) -> str:
    """Mixed sparsity over SparseGPT per calibration seed (WikiText-2 ppl ratio, both protocols): seed 0 from the
    full grid (benchmarks/results/sparsity.jsonl), further seeds from sparsity_seeds.jsonl; paired within a seed."""
    ppl = {(json.loads(r["key"])["seed"], r["method"], r["level"]): r for r in records if not r.get("wbits")}
    lines = ["| sparsity | protocol | seeds | mixed / SparseGPT (mean ± std) | per seed | mixed ppl | SparseGPT ppl |",
             "|---|---|---|---|---|---|---|"]
    for level in sorted({k[2] for k in ppl if k[1] == "mixed"}):
        seeds = sorted(s for (s, m, l) in ppl if (m, l) == ("mixed", level) and (s, "sparsegpt", level) in ppl)
        for protocol in ("ppl_128", "ppl_2048"):
            mixed = [ppl[(s, "mixed", level)][protocol]["wikitext2"]["ppl"] for s in seeds]
            sparsegpt = [ppl[(s, "sparsegpt", level)][protocol]["wikitext2"]["ppl"] for s in seeds]
            ratios = [a / b for a, b in zip(mixed, sparsegpt)]
            lines.append(f"| {level} | {protocol[4:]} tokens | {len(seeds)} | {cell(ratios, 3)} | {', '.join(f'{x:.3f}' for x in ratios)} | "
                         f"{cell(mixed)} | {cell(sparsegpt)} |")
    return "\n".join(lines)


def hybrid_table(records: list[dict]) -> str:
    """benchmarks/hybrid.py: per model and ratio, each configuration's WikiText-2 test and held-out (validation) ppl
    over seeds, its per-seed ratio to the row before it (the ingredient it adds) and to the baseline to beat."""
    from hybrid import CONFIGS, NAMED, PAIRED  # the chain's order, the configurations that have a --method name of their own
    chain = list(CONFIGS)
    baseline = {0.2: "element2", 0.5: "flap (layer scope)"}
    by = {(r["model"], r["ratio"], r["config"], r["seed"]): r for r in records}
    lines = ["| model | ratio | configuration | seeds | test ppl | held-out ppl | / paired row (test, per seed) | / baseline (test, per seed) | "
             "/ slimgpt (test, per seed) | alphas (attention; MLP) | attention share removed (per seed) | prune s | prune peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for model, ratio in sorted({(r["model"], r["ratio"]) for r in records}):
        configs = sorted({r["config"] for r in records if (r["model"], r["ratio"]) == (model, ratio) and r["config"] in chain},
                         key=chain.index)  # rows of configurations no longer in CONFIGS stay in the file as a record
        for config in configs:
            rows = [by[k] for k in sorted(by) if k[:3] == (model, ratio, config)]
            seeds = [r["seed"] for r in rows]

            def ratios(other: str | None) -> str:
                pairs = [by[(model, ratio, config, s)]["ppl"]["test"] / by[(model, ratio, other, s)]["ppl"]["test"]
                         for s in seeds if other and (model, ratio, other, s) in by]
                return ", ".join(f"{x:.3f}" for x in pairs) if pairs and other != config else "-"

            alphas = [v for r in rows for v in r.get("alphas", {}).items()]
            attention = [a for k, a in alphas if not k.endswith("mlp")]
            mlp = [a for k, a in alphas if k.endswith("mlp")]
            alpha_text = f"{statistics.mean(attention):.2f}; {statistics.mean(mlp):.2f}" if attention and mlp else "-"
            shares = [f"{r['kind_split']['attention_share']:.2f}" for r in rows if r.get("kind_split")]
            unshared = [r["prune_seconds"] for r in rows if not r.get("shared_stats")]
            seconds = f"{statistics.mean([r['prune_seconds'] for r in rows]):.0f}" + (" (with statistics)" if unshared else "")
            # PAIRED names the issue-22 rows' pairs; "+" adds to the row above, "-" takes from hywia-adaptive (the row above
            # it), "... as hywia-adaptive" is its control
            adaptive = next(name for name, flag in NAMED.items() if flag == "--method hywia-adaptive --reconstruct no")
            chained = PAIRED.get(config) or (chain[chain.index(config) - 1] if config.startswith(("+", "-")) else
                                             adaptive if config.endswith("as hywia-adaptive") else None)
            name = f"{config} (= {NAMED[config]})" if config in NAMED else config
            lines.append(f"| {model} | {ratio:.0%} | {name} | {len(rows)} | {cell([r['ppl']['test'] for r in rows])} | "
                         f"{cell([r['ppl']['heldout'] for r in rows])} | {ratios(chained)} | {ratios(baseline.get(ratio))} | {ratios('slimgpt')} | {alpha_text} | {', '.join(shares) or '-'} | {seconds} | "
                         f"{max(r.get('prune_peak_rss_mb', 0) for r in rows):.0f} |".replace("| 0 |", "| - |"))
    return "\n".join(lines)


RECONSTRUCTION_ROWS = ("element2", "flap (layer scope)", "+ evidence split", "- compensation", "slimgpt", "element2 + reconstruction",
                       "hywia-adaptive + reconstruction", "- compensation + reconstruction", "hywia-adaptive + obs selection",
                       "+ refit-weighed split", "+ both splits built")


def reconstruction_table(records: list[dict]) -> str:
    """The hybrid table's rows that reconstruction is judged by: the baselines, hywia-adaptive with and without its compensation,
    SlimGPT, and each with its kept weights refit, on the cells where the new rows were measured."""
    new = {(r["model"], r["ratio"]) for r in records if r["config"] in RECONSTRUCTION_ROWS[4:]}
    return hybrid_table([r for r in records if r["config"] in RECONSTRUCTION_ROWS and (r["model"], r["ratio"]) in new])


def structure_table(structured: list[dict], unstructured: list[dict]) -> str:
    """What structure costs: Table 1's structured rows beside SparseGPT at the same fraction of the decoder's
    weights removed, same machine and evaluation; `kept` counts the weights a model still has (nonzero ones for
    SparseGPT: its zeros stay stored as zeros)."""
    dense = next(r for r in structured if r["method"] == "dense")
    prunable = {"smollm2-135m": 99_532_800}  # the decoder's linear weights (hywia.json's prunable_before)
    lines = ["| model | removed | kept weights | WikiText-2 (128) | PTB (128) | WikiText-2 (2048) | PTB (2048) | average | "
             "WikiText-2 (128) / SparseGPT's |", "|---|---|---|---|---|---|---|---|---|"]
    rows = [(0.0, dense["params"], dense)]
    for r in unstructured:
        model = json.loads(r["key"])["model"]
        rows.append((float(r["level"]), round(dense["params"] - r["achieved_sparsity"] * prunable[model]), r))
    rows += [(r["ratio"], r["params"], r) for r in structured  # Table 1's own draw, seed 0; the grid's extra seeds stay out
             if r["ratio"] in {x for x, _, _ in rows[1:]} and not r["recovered"] and json.loads(r["key"])["seed"] == 0]
    sparsegpt = {level: r["ppl_128"]["wikitext2"]["ppl"] for level, _, r in rows if r["method"] == "sparsegpt"}
    for level, kept, r in sorted(rows, key=lambda x: (x[0], x[2]["ppl_128"]["wikitext2"]["ppl"])):
        a, b = r["ppl_128"], r["ppl_2048"]
        ratio = f"{a['wikitext2']['ppl'] / sparsegpt[level]:.2f}" if level in sparsegpt else "-"
        average = f"{100 * r['average']:.2f}" if r.get("average") is not None else "-"
        lines.append(f"| {r['name']} | {level:.0%} | {kept:,} | {a['wikitext2']['ppl']:.2f} | {a['ptb']['ppl']:.2f} | "
                     f"{b['wikitext2']['ppl']:.2f} | {b['ptb']['ppl']:.2f} | {average} | {ratio} |")
    return "\n".join(lines)


def quantized_table(records: list[dict]) -> str:
    """benchmarks/sparsity.py --wbits rows (perplexity only) beside the same machine's float rows and dense row."""
    floats = {(r["method"], r["level"]): r for r in records if not r.get("wbits")}
    lines = ["| method | sparsity | weight bits | WikiText-2 (128) | WikiText-2 (2048) | PTB (128) | PTB (2048) | WikiText-2 (128) / float's | prune s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(records, key=lambda r: (r["level"], r["method"], r.get("wbits") or 32)):
        wiki = r["ppl_128"]["wikitext2"]["ppl"]
        same = floats.get((r["method"], r["level"]))
        ratio = f"{wiki / same['ppl_128']['wikitext2']['ppl']:.3f}" if r.get("wbits") and same else "-"
        seconds = f"{r['prune_seconds']:.0f}" if "prune_seconds" in r else "-"
        lines.append(f"| {r['method']} | {r['level']} | {r.get('wbits') or 'float32'} | {wiki:.2f} | {r['ppl_2048']['wikitext2']['ppl']:.2f} | "
                     f"{r['ppl_128']['ptb']['ppl']:.2f} | {r['ppl_2048']['ptb']['ppl']:.2f} | {ratio} | {seconds} |")
    return "\n".join(lines)


def memory_table(records: list[dict]) -> str:
    """benchmarks/memory.py: peak RSS, statistics store and time per memory option, and whether it pruned the same
    groups as the one-pass run of its method and calibration."""
    lines = ["| model | calibration | method | memory flags | peak RSS MB | stats MB | prune s | same groups as one pass |",
             "|---|---|---|---|---|---|---|---|"]
    one_pass = {(r["model"], r["samples"], r["seq_len"], r["method"]): r["kept_digest"] for r in records if not r["flags"]}
    for r in records:
        same = one_pass.get((r["model"], r["samples"], r["seq_len"], r["method"]))
        lines.append(f"| {r['model']} | {r['samples']} x {r['seq_len']} | {r['method']} | {r['flags'] or '(one pass)'} | "
                     f"{r['peak_rss_mb']:.0f} | {r['stats_mb']:.0f} | {r['prune_seconds']:.0f} | "
                     f"{'-' if not r['flags'] else ('yes' if same == r['kept_digest'] else 'no')} |")
    return "\n".join(lines)


HELD_OUT = {"wikitext2": "WikiText-2 validation", "c4": "C4 (the calibration file)"}


def defaults_table(records: list[dict]) -> str:
    """benchmarks/choose_defaults.py: held-out calibration-corpus perplexity per option value (mean ± std over seeds)."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    seen = set()
    for r in records:
        measurement = json.dumps({k: v for k, v in r.items() if k not in ("seconds", "machine")}, sort_keys=True)
        if measurement in seen:  # the same run appended twice counts once
            continue
        seen.add(measurement)
        groups[(r["method"], r["prune_args"], r["option"], r["held_out"], r["seq_len"], r["windows"], r["value"])].append(r["ppl"])
    lines = ["| method | prune flags | option | value | held-out text (windows x tokens) | seeds | held-out ppl |", "|---|---|---|---|---|---|---|"]
    for (method, args, option, held_out, seq_len, windows, value), ppl in groups.items():
        lines.append(f"| {method} | `{args}` | --{option} | {value} | {HELD_OUT.get(held_out, held_out)} ({windows} x {seq_len}) | {len(ppl)} | {cell(ppl)} |")
    return "\n".join(lines)


def llama_cpp_tables(records: list[dict]) -> str:
    """The latest run of benchmarks/in_llama_cpp.py: perplexity beside transformers', then speed against the ideal.

    Decode time per token (llama.cpp's own timer where the run has it) is also fitted, per type, as a + b × file size over the run's models (size, not parameters:
    a width that is not a multiple of the block keeps its matrix in f16): `a` is the part of a token's time that
    pruning widths cannot remove (the same graph of norms, rotations, softmax and thread barriers
    in every layer), which caps the speedup below the ideal that counts parameters alone."""
    run = records[-1].get("run")
    rows = [r for r in records if r.get("run") == run]
    types = [k[: -len("_speed")] for k in rows[0] if k.endswith("_speed")]
    lines = ["| model | llama.cpp architecture | params | ideal speedup | transformers f32 | llama.cpp f32 | "
             + " | ".join(types) + " | " + " / ".join(types) + " MiB |",
             "|---|---|---|---|---|---|" + "---|" * (len(types) + 1)]
    for r in rows:
        lines.append(f"| {r['name']} | {r.get('arch', '-')} | {r['params']:,} | {r['ideal_speedup']:.2f}× | {r['transformers_ppl']:.2f} | "
                     + (f"{r['f32_ppl']:.2f}" if "f32_ppl" in r else "-") + " | " + " | ".join(f"{r[f'{t}_ppl']:.2f}" for t in types) + " | "
                     + " / ".join(f"{r[f'{t}_mib']:.0f}" for t in types) + " |")
    runtime = "decode_tps_runtime" in rows[0][f"{types[0]}_speed"]  # llama.cpp's own timers (later runs)
    lines += ["", "| model | type | prefill tok/s | decode tok/s | prefill speedup | decode speedup | decode / ideal |"
              + (" decode tok/s in llama_decode | its speedup | its / ideal |" if runtime else ""),
              "|---|---|---|---|---|---|---|" + ("---|---|---|" if runtime else "")]
    for t in types:
        for r in rows:
            s = r[f"{t}_speed"]
            lines.append(f"| {r['name']} | {t} | {s['prefill_tps']:.0f} | {s['decode_tps']:.1f} | {s['prefill_speedup']:.2f}× | "
                         f"{s['decode_speedup']:.2f}× | {s['decode_vs_ideal']:.2f} |" + (
                             f" {s['decode_tps_runtime']:.1f} | {s['decode_speedup_runtime']:.2f}× | {s['decode_vs_ideal_runtime']:.2f} |"
                             if runtime else ""))
    fitted = len(rows) >= 3  # a line through two points fits exactly and says nothing
    lines += ["", "| type | ms/token not removed by pruning (a) | ms per MiB of file (b) | r² | a / dense's ms/token | "
              "fitted decode / ideal at half the size |", "|---|---|---|---|---|---|"] if fitted else []
    for t in types if fitted else []:
        mib = [r[f"{t}_mib"] for r in rows]
        ms = [1000 / r[f"{t}_speed"]["decode_tps_runtime" if runtime else "decode_tps"] for r in rows]
        b = statistics.covariance(mib, ms) / statistics.variance(mib)
        a = statistics.mean(ms) - b * statistics.mean(mib)
        dense = a + b * mib[0]
        ceiling = dense / (a + b * mib[0] / 2) / 2  # the fitted speedup at half the file, over the ideal 2×
        lines.append(f"| {t} | {a:.2f} | {b:.4f} | {statistics.correlation(mib, ms) ** 2:.2f} | {a / dense:.0%} | {ceiling:.2f} |")
    head = rows[0]
    return "\n".join(lines) + (f"\n\nRun {run}: {head['windows']} windows, {head['threads']} threads, "
                               f"{head.get('new_tokens', 64)} decoded tokens after a {head.get('prompt_tokens', 128)}-token prompt, "
                               f"{head['machine']}.")


FIGURE = Path(__file__).parents[1] / "docs" / "figures" / "quality_vs_params.png"
DRAWN = ("hywia-adaptive", "slimgpt", "element2", "flap (layer scope)", "wanda_sp", "saap", "hywia")  # the current rows


def quality_figure(rows: list[dict], out: Path = FIGURE) -> Path:
    """WikiText-2 perplexity (Table 1's 128-token protocol, before recovery, mean over seeds) against the fraction of
    the dense model's parameters kept, one panel per model, one line per method through dense."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    models = list(dict.fromkeys(json.loads(r["key"])["model"] for r in rows))
    figure, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 3.6), squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = [r for r in rows if json.loads(r["key"])["model"] == model and not r["recovered"]]
        dense = next(r for r in mine if r["method"] == "dense")
        for method in DRAWN:
            points = defaultdict(list)
            for r in mine:
                if r["method"] == method:
                    points[r["params"] / dense["params"]].append(r["ppl_128"]["wikitext2"]["ppl"])
            if points:
                xs = sorted(points)
                ax.plot([1.0] + xs[::-1], [dense["ppl_128"]["wikitext2"]["ppl"]] + [statistics.mean(points[x]) for x in xs[::-1]],
                        marker="o", color=f"C{DRAWN.index(method)}", label=method)
        windows = json.loads(dense["key"])["windows"][0]
        ax.set(title=f"{model} ({windows} windows)", xlabel="parameters kept (× dense)", ylabel="WikiText-2 perplexity", yscale="log")
        ax.grid(alpha=0.3)
    handles = {h.get_label(): h for ax in axes[0] for h in ax.get_lines()}
    figure.legend([handles[m] for m in DRAWN if m in handles], [m for m in DRAWN if m in handles], loc="lower center",
                  ncol=len(handles), fontsize=8)
    figure.tight_layout(rect=(0, 0.08, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    return out


if __name__ == "__main__":
    import sys
    rows = load("table1.jsonl")
    if "--figure" in sys.argv[1:]:
        print(quality_figure(rows))
        raise SystemExit
    for model in dict.fromkeys(json.loads(r["key"])["model"] for r in rows):  # one table per model, first measured first
        every_seed = [r for r in rows if json.loads(r["key"])["model"] == model]
        mine = [r for r in every_seed if r["zeroshot"]]  # the zero-shot rows; further seeds are perplexity only
        print(f"## Table 1 ({model})\n")
        print(table1(mine))
        print(f"\n## Table 1 ({model}), both perplexity protocols\n")
        print(table1_long(mine))
        if recovery_curves(every_seed):
            print(f"\n## Table 1 ({model}), recovery curves\n")
            print(recovery_curves(every_seed))
        if table1_seeds(every_seed):
            print(f"\n## Table 1 ({model}), rows at several seeds\n")
            print(table1_seeds(every_seed))
    from hywia.speed import markdown
    sections = [  # (results file, heading, table of its records)
        ("sparsity.jsonl", "Unstructured and N:M (SmolLM2-135M)", sparsity_table),
        ("sparsity_cpu.jsonl", "Sparsity with 4-bit weights (SmolLM2-135M, CPU)", quantized_table),
        ("memory.jsonl", "Memory options", memory_table),
        ("owned_weights.jsonl", "Where a prune's memory goes", stage_table),
        ("back_to_back.jsonl", "The default and SlimGPT back to back", pairs_table),
        ("judges.jsonl", "The judge on built and on screened models", judges_table),
        ("hybrid.jsonl", "HyWIA's own method, ingredient by ingredient", hybrid_table),
        ("hybrid.jsonl", "Three seeds against SlimGPT: the default, reconstruction and the baselines", reconstruction_table),
        ("defaults.jsonl", "Defaults chosen on calibration data", defaults_table),
        ("speed.jsonl", "Speed", lambda records: markdown(records[-10:])),  # the latest run: five models at batch 1 and 8
        ("speed_saap.jsonl", "Speed of SAAP 20% against dense and Element2 20%", lambda records: markdown(records) + "\n"),
        ("llama_cpp.jsonl", "In llama.cpp", llama_cpp_tables),
        ("llama_cpp_padding.jsonl", "In llama.cpp, FFN widths padded at export", llama_cpp_tables),
        ("llama_cpp_1p5b.jsonl", "In llama.cpp at Qwen2.5-Coder-1.5B", llama_cpp_tables),
    ]
    unstructured = load("sparsity_structure.jsonl")
    covered = {r["level"] for r in unstructured}  # other levels: the lent GPU's SparseGPT rows (its dense agrees to 0.02)
    unstructured += [{**r, "name": f"{r['name']} (GPU run)"} for r in load("sparsity.jsonl")
                     if r["method"] == "sparsegpt" and r["level"] in ("0.2", "0.5") and r["level"] not in covered]
    if unstructured:
        print("\n## What structure costs: structured rows beside SparseGPT at the same fraction removed (SmolLM2-135M, CPU)\n")
        print(structure_table([r for r in rows if json.loads(r["key"])["model"] == "smollm2-135m"], unstructured))
    seeds = load("sparsity_seeds.jsonl")
    if seeds:
        print("\n## Mixed sparsity over SparseGPT, per calibration seed\n")
        print(sparsity_seeds_table(load("sparsity.jsonl") + seeds))
    for name, heading, table in sections:
        records = load(name)
        if records:
            print(f"\n## {heading}\n")
            print(table(records))
    quality = load("smollm2.jsonl")
    print("## Baselines, 10 calibration samples\n")
    print(quality_table([r for r in quality if r["row"]["method"] != "hywia"], 10))
    for samples in (10, 50):
        print(f"\n## HyWIA and baselines, {samples} calibration samples\n")
        print(quality_table([r for r in quality if r["row"]["method"] not in ("l1",)], samples))
    print("\n## Same calibration windows, paired by seed (ratio < 1: the first is better)\n")
    print(paired_table(quality))
    print(cost_by_machine(load("cost_by_size.jsonl")))
    stores = load("stats_store.jsonl")
    for machine in dict.fromkeys(r["machine"] for r in stores):
        print(f"\n## Gradient statistics per weight or per group ({machine})\n")
        print(store_table([r for r in stores if r["machine"] == machine]))
    cost = load("prune_cost.jsonl")
    if cost:
        print("\n## Prune cost\n")
        print(cost_table(cost))
    recovery = load("recovery.jsonl")
    if recovery:
        print("\n## Recovery\n")
        print("| model | LoRA epochs | LoRA steps | finetune s | WikiText-2 ppl | PTB ppl |\n|---|---|---|---|---|---|")
        latest = {(r["name"], r.get("epochs", 0)): r for r in recovery}  # a rerun replaces its own rows
        for r in latest.values():
            print(f"| {r['name']} | {r.get('epochs', 0)} | {r['steps']} | {r['seconds']:.0f} | {r['ppl']['wikitext2']:.2f} | {r['ppl']['ptb']:.2f} |")
