"""Zero-shot accuracy on the paper's seven tasks through lm-evaluation-harness, used as a library.

Scoring is the harness's: its own task definitions (prompts, `process_docs`, choices, metrics) are loaded from
its registry. Online, the tasks read their standard hub datasets. Offline, hywia writes for each task a small
YAML that `include`s the harness's definition and overrides only where the documents come from: the task's
file in the data dir, in whichever layout it was released or mirrored in, converted record by record into the
schema the harness definition reads (a field renaming, never a change of text, choices or label -- except
HellaSwag's plain-text mirror, whose lost context split is rebuilt as `hellaswag_docs` explains).
"""
from __future__ import annotations

import contextlib
import json
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .data import data_dir as resolve_data_dir
from .data import hub_reachable
from .errors import HywiaError

HELLASWAG_CASES = ("restore", "as-file")


def _boolq(r: dict) -> dict:
    """google-research BoolQ (`title`, `passage`, `answer` bool) or SuperGLUE BoolQ (`passage` = "Title -- text",
    `label` as a bool, 0/1 or the strings "true"/"false"): both become SuperGLUE's schema, which the harness reads."""
    if "answer" in r:
        passage = f"{r['title']} -- {r['passage']}" if r.get("title") else r["passage"]
        return {"question": r["question"], "passage": passage, "label": int(bool(r["answer"]))}
    label = r["label"]
    if isinstance(label, str):
        if label.lower() not in ("true", "false"):
            raise KeyError(f"label {label!r}")
        label = label.lower() == "true"
    return {"question": r["question"], "passage": r["passage"], "label": int(label)}


def _arc(r: dict) -> dict:  # AI2 ARC / OpenBookQA release: question {stem, choices: [{text, label}]}
    q = r["question"]
    return {"id": r["id"], "question": q["stem"], "question_stem": q["stem"], "answerKey": r["answerKey"],
            "choices": {"text": [c["text"] for c in q["choices"]], "label": [c["label"] for c in q["choices"]]}}


def _same(r: dict) -> dict:
    return r


def _read_jsonl(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise HywiaError(f"{path} is not valid JSONL ({e.msg} at line {e.lineno}); it should be the task's release file") from None


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=\S)")


def split_hellaswag_context(ctx: str) -> tuple[str, str]:
    """(ctx_a, ctx_b) rebuilt from a joined context. HellaSwag's ctx_b is the start of the sentence the endings
    complete, lower-cased in the release ("... on a roof. he"); the harness capitalises it. So a trailing fragment
    after the last sentence end that starts in lower case is taken as ctx_b; otherwise ctx_b is empty."""
    parts = _SENTENCE_END.split(ctx)
    if len(parts) > 1 and parts[-1][:1].islower():
        return " ".join(parts[:-1]), parts[-1]
    return ctx, ""


def hellaswag_docs(path: Path, case: str = "restore") -> list[dict]:
    """HellaSwag documents from the plain-text mirror (6 lines an item: "activity_label: ctx", the gold label, four
    endings; bracket tags already removed) in the official schema. The mirror joined ctx_a and ctx_b, so
    `case="restore"` rebuilds them with `split_hellaswag_context` (the harness then capitalises ctx_b as it does
    for the official file); `case="as-file"` keeps the context as written (ctx_b empty, so nothing is capitalised)."""
    if case not in HELLASWAG_CASES:
        raise HywiaError(f"unknown --hellaswag-case '{case}': use {' or '.join(HELLASWAG_CASES)}")
    lines = path.read_text(encoding="utf-8").split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    if len(lines) % 6:
        raise HywiaError(f"{path} has {len(lines)} lines, not 6 per item (context, label, four endings); it should be hellaswag_val_full.txt")
    docs = []
    for i in range(0, len(lines), 6):
        head, label, endings = lines[i], lines[i + 1].strip(), lines[i + 2:i + 6]
        activity, sep, ctx = head.partition(": ")
        if not sep or label not in ("0", "1", "2", "3"):
            raise HywiaError(f"{path} line {i + 1}: expected 'activity_label: context' then a label 0-3; it should be hellaswag_val_full.txt")
        ctx_a, ctx_b = split_hellaswag_context(ctx) if case == "restore" else (ctx, "")
        docs.append({"ind": i // 6, "activity_label": activity, "ctx_a": ctx_a, "ctx_b": ctx_b, "ctx": ctx,
                     "endings": endings, "label": label})
    return docs


@dataclass(frozen=True)
class ZeroShotTask:
    harness: str  # the harness's task name
    metric: str  # the metric reported in tables (both acc and acc_norm are kept in JSON where the task has them)
    files: tuple[str, ...]  # globs under DATA_DIR/zeroshot/, first match wins
    convert: Callable[[dict], dict]
    labels: str | None = None  # a separate labels file next to the data (PIQA's release)


# acc_norm where LLM-Pruner / HyWIA-style tables report it (HellaSwag, ARC-c, OpenBookQA), acc elsewhere
TASKS: dict[str, ZeroShotTask] = {
    "boolq": ZeroShotTask("boolq", "acc", ("boolq/dev.jsonl", "boolq/val.jsonl", "**/boolq*/dev.jsonl", "**/boolq*/val.jsonl"), _boolq),
    "piqa": ZeroShotTask("piqa", "acc", ("piqa/valid.jsonl", "**/piqa*/valid.jsonl"), _same, labels="valid-labels.lst"),
    "hellaswag": ZeroShotTask("hellaswag", "acc_norm", ("hellaswag/hellaswag_val.jsonl", "**/hellaswag_val.jsonl",
                                                        "hellaswag/hellaswag_val_full.txt", "**/hellaswag_val_full.txt"), _same),
    "winogrande": ZeroShotTask("winogrande", "acc", ("winogrande/dev.jsonl", "**/winogrande*/dev.jsonl"), _same),
    "arc_easy": ZeroShotTask("arc_easy", "acc", ("arc_easy/ARC-Easy-Test.jsonl", "arc/ARC-Easy-Test.jsonl", "**/ARC-Easy-Test.jsonl"), _arc),
    "arc_challenge": ZeroShotTask("arc_challenge", "acc_norm", ("arc_challenge/ARC-Challenge-Test.jsonl", "arc/ARC-Challenge-Test.jsonl",
                                                                "**/ARC-Challenge-Test.jsonl"), _arc),
    "openbookqa": ZeroShotTask("openbookqa", "acc_norm", ("openbookqa/test.jsonl", "**/Main/test.jsonl"), _arc),
}


def _find(root: Path, task: ZeroShotTask) -> Path | None:
    for pattern in task.files:
        found = sorted(root.glob(pattern))
        if found:
            return found[0]
    return None


def read_task_file(path: Path, task: ZeroShotTask, hellaswag_case: str = "restore") -> list[dict]:
    """The documents of one task file in the harness's schema (jsonl releases, or HellaSwag's text mirror)."""
    if path.suffix == ".txt":
        return hellaswag_docs(path, hellaswag_case)
    records = _read_jsonl(path)
    if task.labels:
        labels_path = path.with_name(task.labels)
        if not labels_path.is_file():
            raise HywiaError(f"{labels_path} not found: PIQA's release keeps labels in {task.labels} next to {path.name}")
        labels = [int(l) for l in labels_path.read_text().split()]
        if len(labels) != len(records):
            raise HywiaError(f"{labels_path} has {len(labels)} labels for {len(records)} records in {path}")
        records = [{**r, "label": lab} for r, lab in zip(records, labels)]
    try:
        return [task.convert(r) for r in records]
    except (KeyError, TypeError) as e:
        raise HywiaError(f"{path} is not in {task.harness}'s release format (bad or missing {e}); see docs/recovery_and_zeroshot.md") from None


def local_task_files(names: list[str], data_dir: str | None, workdir: Path, hellaswag_case: str = "restore") -> list[str]:
    """Write one YAML per task that includes the harness's definition and reads the converted local file."""
    import yaml
    from lm_eval.tasks import TaskManager

    root = resolve_data_dir(data_dir)
    assert root is not None
    registry = TaskManager().task_index
    paths = []
    for name in names:
        task = TASKS[name]
        source = _find(root / "zeroshot", task)
        if source is None:
            raise HywiaError(f"{name}: no data file in {root / 'zeroshot'}; put the task's release file at "
                             f"{root / 'zeroshot' / task.files[0]} (see docs/recovery_and_zeroshot.md), or run online")
        converted = workdir / f"{name}.jsonl"
        converted.write_text("".join(json.dumps(r) + "\n" for r in read_task_file(source, task, hellaswag_case)))
        entry = registry[task.harness]
        split = entry.cfg.get("test_split") or entry.cfg.get("validation_split")
        config = {"include": str(entry.yaml_path), "task": task.harness, "dataset_path": "json", "dataset_name": None,
                  "dataset_kwargs": {"data_files": {split: str(converted)}}, "training_split": None,
                  "validation_split": split if split == entry.cfg.get("validation_split") else None,
                  "test_split": split if split == entry.cfg.get("test_split") else None,
                  "metadata": {**(entry.cfg.get("metadata") or {}), "hywia_source": str(source)}}
        path = workdir / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        paths.append(str(path))
    return paths


def check_options(names: list[str], hellaswag_case: str) -> None:
    """Validate task names and the HellaSwag option before a model is loaded."""
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise HywiaError(f"unknown task '{unknown[0]}': choose from {', '.join(TASKS)}")
    if hellaswag_case not in HELLASWAG_CASES:
        raise HywiaError(f"unknown --hellaswag-case '{hellaswag_case}': use {' or '.join(HELLASWAG_CASES)}")


@contextlib.contextmanager
def _no_git_probe() -> Iterator[None]:
    """The harness records `git describe` of the working directory, which is not hywia's and, outside a checkout,
    prints "fatal: not a git repository" to the terminal; skip that probe for the duration of the run."""
    import lm_eval.evaluator
    original = lm_eval.evaluator.get_git_commit_hash
    lm_eval.evaluator.get_git_commit_hash = lambda: None
    try:
        yield
    finally:
        lm_eval.evaluator.get_git_commit_hash = original


def zeroshot(model, tokenizer, tasks: list[str] | None = None, limit: int | None = None, data_dir: str | None = None,
             batch_size: int = 8, hellaswag_case: str = "restore") -> dict:
    """Per task: the table metric, acc and acc_norm (where defined), stderr, the number of documents scored and the
    file they came from."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    names = tasks or list(TASKS)
    check_options(names, hellaswag_case)
    offline = resolve_data_dir(data_dir) is not None
    if not offline and not hub_reachable():
        raise HywiaError("cannot load the zero-shot tasks from the Hugging Face hub (offline); pass --data-dir DIR "
                         "holding zeroshot/<task>/ release files (or set HYWIA_DATA_DIR); see docs/recovery_and_zeroshot.md")
    with tempfile.TemporaryDirectory() as tmp:
        specs = local_task_files(names, data_dir, Path(tmp), hellaswag_case) if offline else [TASKS[n].harness for n in names]
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        with _no_git_probe():
            out = lm_eval.simple_evaluate(model=lm, tasks=specs, limit=limit, num_fewshot=0, task_manager=TaskManager(),
                                          log_samples=False, bootstrap_iters=1000)
    results = {}
    for name in names:
        r = out["results"][TASKS[name].harness]
        entry = {k.split(",")[0]: v for k, v in r.items() if k.endswith(",none") and not k.startswith("alias")}
        entry.update(metric=TASKS[name].metric, score=entry[TASKS[name].metric],
                     documents=out.get("n-samples", {}).get(TASKS[name].harness, {}).get("effective"),
                     source=(out.get("configs", {}).get(TASKS[name].harness, {}).get("metadata") or {}).get("hywia_source"))
        results[name] = entry
    return results
