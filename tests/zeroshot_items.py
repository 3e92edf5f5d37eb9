"""A handful of hand-written items per task, in each task's original release format (written for these tests)."""
import json
from pathlib import Path

BOOLQ = [{"question": "is water wet", "title": "Water", "answer": True, "passage": "Water is a liquid that makes things wet."},
         {"question": "is the sun cold", "title": "Sun", "answer": False, "passage": "The sun is a very hot star."},
         {"question": "do fish swim", "title": "Fish", "answer": True, "passage": "Fish live in water and swim."}]
PIQA = [{"goal": "To boil water", "sol1": "Put it in a pot on the stove.", "sol2": "Put it in the freezer."},
        {"goal": "To dry wet hands", "sol1": "Wave them in a bucket of water.", "sol2": "Rub them with a towel."},
        {"goal": "To open a jar", "sol1": "Twist the lid.", "sol2": "Shout at the jar."}]
PIQA_LABELS = [0, 1, 0]
HELLASWAG = [{"ind": i, "activity_label": "Cooking", "ctx_a": "A man cracks an egg into a bowl.", "ctx_b": "he",
              "ctx": "A man cracks an egg into a bowl. he", "endings": ["whisks it.", "eats the bowl.", "sings.", "sleeps."],
              "source_id": "t", "split": "val", "split_type": "indomain", "label": i % 4} for i in range(3)]
WINOGRANDE = [{"qID": "a", "sentence": "The cup fell off the table because _ was slippery.", "option1": "the cup", "option2": "the table", "answer": "1"},
              {"qID": "b", "sentence": "Anna helped Mary because _ was kind.", "option1": "Anna", "option2": "Mary", "answer": "1"},
              {"qID": "c", "sentence": "The ball broke the window because _ was fragile.", "option1": "the ball", "option2": "the window", "answer": "2"}]


def _mc(i: int, stem: str, choices: list[str], key: str) -> dict:
    return {"id": f"q{i}", "question": {"stem": stem, "choices": [{"text": t, "label": l} for t, l in zip(choices, "ABCD")]}, "answerKey": key}


ARC = [_mc(0, "Which is a source of light?", ["the sun", "a rock", "a chair", "sand"], "A"),
       _mc(1, "What do plants need to grow?", ["plastic", "sunlight", "metal", "glass"], "B"),
       _mc(2, "Which is a liquid?", ["ice", "wood", "water", "stone"], "C")]


def write_mirror_files(root: Path) -> Path:
    """The same items in the layouts of ../shared/data: SuperGLUE BoolQ val.jsonl with "true"/"false" labels and
    "Title -- " passages, HellaSwag as 6-line text, WinoGrande without qID, ARC in arc_easy/ and arc_challenge/."""
    z = root / "zeroshot"
    boolq = [{"question": r["question"], "passage": f"{r['title']} -- {r['passage']}", "idx": i, "label": str(r["answer"]).lower()}
             for i, r in enumerate(BOOLQ)]
    files = {"boolq/val.jsonl": boolq, "piqa/valid.jsonl": PIQA, "winogrande/dev.jsonl": [{k: v for k, v in r.items() if k != "qID"} for r in WINOGRANDE],
             "arc_easy/ARC-Easy-Test.jsonl": ARC, "arc_challenge/ARC-Challenge-Test.jsonl": ARC, "openbookqa/test.jsonl": ARC}
    for rel, records in files.items():
        (z / rel).parent.mkdir(parents=True, exist_ok=True)
        (z / rel).write_text("".join(json.dumps(r) + "\n" for r in records))
    (z / "piqa/valid-labels.lst").write_text("\n".join(map(str, PIQA_LABELS)) + "\n")
    (z / "hellaswag").mkdir(parents=True, exist_ok=True)
    (z / "hellaswag/hellaswag_val_full.txt").write_text("".join(
        f"{r['activity_label']}: {r['ctx']}\n{r['label']}\n" + "".join(e + "\n" for e in r["endings"]) for r in HELLASWAG))
    return root


def write_release_files(root: Path) -> Path:
    """DATA_DIR/zeroshot/<task>/<release file> for all seven tasks; returns DATA_DIR."""
    z = root / "zeroshot"
    files = {"boolq/dev.jsonl": BOOLQ, "piqa/valid.jsonl": PIQA, "hellaswag/hellaswag_val.jsonl": HELLASWAG,
             "winogrande/dev.jsonl": WINOGRANDE, "arc/ARC-Easy-Test.jsonl": ARC, "arc/ARC-Challenge-Test.jsonl": ARC,
             "openbookqa/test.jsonl": ARC}
    for rel, records in files.items():
        (z / rel).parent.mkdir(parents=True, exist_ok=True)
        (z / rel).write_text("".join(json.dumps(r) + "\n" for r in records))
    (z / "piqa/valid-labels.lst").write_text("\n".join(map(str, PIQA_LABELS)) + "\n")
    return root
