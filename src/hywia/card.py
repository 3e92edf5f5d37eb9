"""The model card written next to every saved model (README.md, Hugging Face's conventions): what the model is,
how it was made, what was measured while making it, how to load it and the command that makes it again, so a
folder pushed to a hub explains itself. Everything comes from the recipe hywia.json holds."""
from __future__ import annotations

import json

HUB_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct", "gemma3-270m": "google/gemma-3-270m"}


def _base_model(recipe: dict) -> str | None:
    """The hub id of the dense model at the start of the chain, when there is one."""
    origin = recipe.get("base_model") or recipe.get("model")
    if origin in HUB_IDS:
        return HUB_IDS[origin]
    if origin and "/" in origin and not origin.startswith((".", "/", "~")) and not origin.endswith(".gguf"):
        return origin
    return None


def _pruning(recipe: dict) -> list[str]:
    if "method" not in recipe:
        return []
    calibration = recipe.get("calibration", {})
    amount = (f"ratio {recipe['ratio']} of the prunable parameters (achieved {recipe['achieved_ratio']:.4f}), {recipe.get('scope')} scope"
              if "achieved_ratio" in recipe else f"sparsity {recipe.get('pattern') or recipe.get('sparsity')}")
    lines = [f"- **Pruning**: `{recipe['method']}`, {amount}.",
             f"- **Parameters**: {recipe['params_before']:,} → {recipe['params_after']:,} "
             f"({1 - recipe['params_after'] / recipe['params_before']:.2%} fewer)." if "params_after" in recipe else
             f"- **Parameters**: {recipe.get('params', 0):,} ({recipe.get('zeros', 0):,} decoder weights zero).",
             f"- **Calibration**: {calibration.get('samples')} windows of {calibration.get('seq_len')} tokens from "
             f"`{calibration.get('source')}` ({calibration.get('split') or 'file'}), seed {recipe.get('seed')}."]
    if recipe.get("seconds") is not None:
        lines.append(f"- **Cost**: {recipe['seconds']:.1f} s, peak memory {recipe.get('peak_rss_mb', 0):.0f} MB.")
    return lines


def _recovery(recipe: dict) -> list[str]:
    tune = recipe.get("finetune")
    if not tune:
        return []
    settings = tune.get("settings", {})
    how = f"distilled from `{tune['teacher']}`" if tune.get("teacher") else "fine-tuned on the data's next tokens"
    guard = tune.get("guard", {})
    lines = [f"- **Recovery**: {how}, training {settings.get('train', 'lora')} (LoRA rank {settings.get('rank')}), "
             f"{tune.get('steps')} steps, {tune.get('tokens', 0):,} tokens of `{tune.get('data', {}).get('source')}`, "
             f"{tune.get('seconds', 0) / 60:.1f} min ({tune.get('compute_dtype')} compute).",
             f"- **Training-objective guard**: {guard.get('before', float('nan')):.4f} → {guard.get('after', float('nan')):.4f} "
             f"on {guard.get('records')} training records."]
    if tune.get("curve"):
        last = tune["curve"][-1]
        lines.append(f"- **WikiText-2 validation perplexity**: {tune['curve'][0]['ppl']:.2f} before recovery, {last['ppl']:.2f} "
                     f"after {last['tokens']:,} tokens (tokens.png).")
    return lines


def model_card(recipe: dict, remote_code: bool) -> str:
    """README.md for a saved model, from its recipe (the dict hywia.json holds)."""
    base = _base_model(recipe)
    front = ["---", "library_name: transformers", "pipeline_tag: text-generation",
             "tags:", "- hywia", "- pruned", "- structured-pruning" if "achieved_ratio" in recipe else "- sparse"]
    if base:
        front.append(f"base_model: {base}")
    front.append("---")
    flag = ", trust_remote_code=True" if remote_code else ""
    body = [f"# {recipe.get('model', 'model')}, pruned by hywia", "",
            "A smaller model made by [hywia](https://pypi.org/project/hywia/) structured pruning"
            + (f" of [{base}](https://huggingface.co/{base})" if base else "") + ".", "", "## How it was made", "",
            *_pruning(recipe), *_recovery(recipe), "", "## Use", "", "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
            f'model = AutoModelForCausalLM.from_pretrained("PATH"{flag})', 'tokenizer = AutoTokenizer.from_pretrained("PATH")', "```", ""]
    if remote_code:
        body += ["Its layers have different widths, so the folder carries `modeling_hywia.py` (30 lines, the stock "
                 "class with per-layer Linear shapes): hence `trust_remote_code=True`.", ""]
    if recipe.get("recipe") or "options" in recipe:
        body += ["## Make it again", "", "Every option that made it is in `hywia.json`:", "", "```bash",
                 "hywia prune --recipe hywia.json --out again/    # the same weights on CPU, given the same data", "```", ""]
    body += ["## Versions", "", "```json", json.dumps(recipe.get("versions", {})), "```", ""]
    return "\n".join(front + [""] + body)
