"""Files written next to a pruned model from its report: per-group scores and the HyWIA figures.

scores.safetensors  one float32 tensor per "NAME/LAYER.KIND" (NAME: fine, coarse, alpha, fused)
kept_params.png     kept parameters per layer when fine-only, coarse-only or fused scores drive the pruning at the
                    same ratio, under layer and global scope (the paper's Figure 1 and Figure 3 right)
alpha.png           distribution of the fusion weight alpha per layer, attention and MLP groups (Figure 3 left)
loss.png            (recovery) the training loss per optimizer step, next to a fine-tuned model
tokens.png          (recovery with --eval-every) held-out perplexity against training tokens: would more pay?
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from .report import PruneReport  # noqa: E402

LABELS = {"fine": "fine-grained only (Element²)", "coarse": "coarse-grained only (Vector)", "fused": "hybrid (fused)"}


def write_scores(directory: Path, report: PruneReport) -> None:
    tensors = {f"{name}/{key}": t.float().contiguous() for name, by_set in report.scores.items() for key, t in by_set.items()}
    save_file(tensors, str(directory / "scores.safetensors"))


def plot_kept_params(report: PruneReport, path: Path) -> None:
    compared = report.extra.get("kept_params_by_score", {})
    fig, axes = plt.subplots(1, len(compared), figsize=(6 * len(compared), 3.6), squeeze=False)
    for ax, (scope, by_score) in zip(axes[0], compared.items()):
        for name, kept in by_score.items():
            layers = sorted(kept, key=int)
            ax.plot([int(l) for l in layers], [kept[l] / 1e6 for l in layers], marker="o", ms=3, label=LABELS[name])
        ax.set_title(f"{scope} scope, ratio {report.ratio:.0%}")
        ax.set_xlabel("layer")
        ax.set_ylabel("kept prunable parameters (M)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_alpha(report: PruneReport, path: Path) -> None:
    alphas = report.scores["alpha"]
    kinds = sorted({key.split(".")[1] for key in alphas})
    fig, axes = plt.subplots(1, len(kinds), figsize=(7 * len(kinds), 3.6), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        keys = sorted((k for k in alphas if k.endswith(f".{kind}")), key=lambda k: int(k.split(".")[0]))
        ax.boxplot([alphas[k].numpy() for k in keys], positions=[int(k.split(".")[0]) for k in keys], widths=0.6,
                   showfliers=False)
        ax.set_title(f"fusion weight α per {kind} group (seed {report.seed})")
        ax.set_xlabel("layer")
        ax.set_ylabel("α (weight on fine-grained)")
        ax.tick_params(axis="x", labelsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _line(xs: list, ys: list, path: Path, xlabel: str, ylabel: str, title: str, marker: str | None) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(xs, ys, marker=marker, ms=3)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_losses(losses: list[float], path: Path, title: str) -> None:
    """The training loss per optimizer step of a recovery run (written next to the merged model as loss.png)."""
    _line(list(range(1, len(losses) + 1)), losses, path, "optimizer step", "training loss (token-weighted NLL)", title,
          "." if len(losses) < 60 else None)


def plot_curve(curve: list[dict], path: Path, title: str) -> None:
    """Held-out (WikiText-2 validation) perplexity against the training tokens seen, one point per evaluation."""
    _line([c["tokens"] for c in curve], [c["ppl"] for c in curve], path, "training tokens", "WikiText-2 validation perplexity",
          title, "o")


def write_artifacts(directory: Path, report: PruneReport) -> None:
    """Everything a report holds beyond hywia.json; nothing for criteria without intermediate scores."""
    if not report.scores:
        return
    write_scores(directory, report)
    if "kept_params_by_score" in report.extra:
        plot_kept_params(report, directory / "kept_params.png")
    if "alpha" in report.scores:
        plot_alpha(report, directory / "alpha.png")
