"""hywia: structured pruning of Hugging Face causal LMs (HyWIA and the baselines it is compared against)."""
from . import fusion  # noqa: F401  (registers the fused criteria next to the baselines)
from .errors import HywiaError
from .evaluate import perplexity
from .grouping import find_groups
from .importance import CRITERIA
from .io import load_model, save_model
from .prune import PruneReport, prune

__all__ = ["CRITERIA", "HywiaError", "PruneReport", "find_groups", "load_model", "perplexity", "prune", "save_model"]
