"""Zero-shot accuracy on the paper's seven tasks through lm-evaluation-harness, used as a library.

Scoring is the harness's: its own task definitions (prompts, `process_docs`, choices, metrics) are loaded from
its registry. Online, the tasks read their standard hub datasets. Offline, hywia writes for each task a small
YAML that `include`s the harness's definition and overrides only where the documents come from: the task's
file in the data dir, in its original release format, converted record by record into the schema the harness
definition reads (a field renaming, never a change of text, choices or label).
"""
from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .data import data_dir as resolve_data_dir
from .data import hub_reachable
from .errors import HywiaError


def _boolq(r: dict) -> dict:  # google-research BoolQ dev.jsonl: answer is a bool
    return {"question": r["question"], "passage": r["passage"], "label": int(r["answer"] if "answer" in r else r["label"])}


def _arc(r: dict) -> dict:  # AI2 ARC / OpenBookQA release: question {stem, choices: [{text, label}]}
    q = r["question"]
    return {"id": r["id"], "question": q["stem"], "question_stem": q["stem"], "answerKey": r["answerKey"],
            "choices": {"text": [c["text"] for c in q["choices"]], "label": [c["label"] for c in q["choices"]]}}


def _same(r: dict) -> dict:
    return r


@dataclass(frozen=True)
class ZeroShotTask:
    harness: str  # the harness's task name
    metric: str  # the metric reported in tables (both acc and acc_norm are kept in JSON where the task has them)
    files: tuple[str, ...]  # globs under DATA_DIR/zeroshot/, first match wins
    convert: Callable[[dict], dict]
    labels: str | None = None  # a separate labels file next to the data (PIQA's release)


# acc_norm where LLM-Pruner / HyWIA-style tables report it (HellaSwag, ARC-c, OpenBookQA), acc elsewhere
TASKS: dict[str, ZeroShotTask] = {
    "boolq": ZeroShotTask("boolq", "acc", ("boolq/dev.jsonl", "**/boolq*/dev.jsonl"), _boolq),
    "piqa": ZeroShotTask("piqa", "acc", ("piqa/valid.jsonl", "**/piqa*/valid.jsonl"), _same, labels="valid-labels.lst"),
    "hellaswag": ZeroShotTask("hellaswag", "acc_norm", ("hellaswag/hellaswag_val.jsonl", "**/hellaswag_val.jsonl"), _same),
    "winogrande": ZeroShotTask("winogrande", "acc", ("winogrande/dev.jsonl", "**/winogrande*/dev.jsonl"), _same),
    "arc_easy": ZeroShotTask("arc_easy", "acc", ("arc/ARC-Easy-Test.jsonl", "**/ARC-Easy-Test.jsonl"), _arc),
    "arc_challenge": ZeroShotTask("arc_challenge", "acc_norm", ("arc/ARC-Challenge-Test.jsonl", "**/ARC-Challenge-Test.jsonl"), _arc),
    "openbookqa": ZeroShotTask("openbookqa", "acc_norm", ("openbookqa/test.jsonl", "**/Main/test.jsonl"), _arc),
}


def _find(root: Path, task: ZeroShotTask) -> Path | None:
    for pattern in task.files:
        found = sorted(root.glob(pattern))
        if found:
            return found[0]
    return None


def _read_records(path: Path, task: ZeroShotTask) -> list[dict]:
    try:
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise HywiaError(f"{path} is not valid JSONL ({e.msg} at line {e.lineno}); it should be the task's release file") from None
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
        raise HywiaError(f"{path} is not in {task.harness}'s release format (missing {e}); see docs/zeroshot.md") from None


def local_task_files(names: list[str], data_dir: str | None, workdir: Path) -> list[str]:
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
                             f"{root / 'zeroshot' / task.files[0]} (see docs/zeroshot.md), or run online")
        converted = workdir / f"{name}.jsonl"
        converted.write_text("".join(json.dumps(r) + "\n" for r in _read_records(source, task)))
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


def zeroshot(model, tokenizer, tasks: list[str] | None = None, limit: int | None = None, data_dir: str | None = None,
             batch_size: int = 8) -> dict:
    """Per task: the table metric, acc and acc_norm (where defined), stderr and the number of documents scored."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    names = tasks or list(TASKS)
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise HywiaError(f"unknown task '{unknown[0]}': choose from {', '.join(TASKS)}")
    offline = resolve_data_dir(data_dir) is not None
    if not offline and not hub_reachable():
        raise HywiaError("cannot load the zero-shot tasks from the Hugging Face hub (offline); pass --data-dir DIR "
                         "holding zeroshot/<task>/ release files (or set HYWIA_DATA_DIR); see docs/zeroshot.md")
    with tempfile.TemporaryDirectory() as tmp:
        specs = local_task_files(names, data_dir, Path(tmp)) if offline else [TASKS[n].harness for n in names]
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = lm_eval.simple_evaluate(model=lm, tasks=specs, limit=limit, num_fewshot=0, task_manager=TaskManager(),
                                      log_samples=False, bootstrap_iters=1000)
    results = {}
    for name in names:
        r = out["results"][TASKS[name].harness]
        entry = {k.split(",")[0]: v for k, v in r.items() if k.endswith(",none") and not k.startswith("alias")}
        entry.update(metric=TASKS[name].metric, score=entry[TASKS[name].metric],
                     documents=out.get("n-samples", {}).get(TASKS[name].harness, {}).get("effective"))
        results[name] = entry
    return results
