"""hywia: structured pruning of Hugging Face causal LMs (HyWIA, its baselines and companion methods)."""
from . import methods  # noqa: F401  (registers every method)
from .errors import HywiaError
from .evaluate import perplexity
from .grouping import find_groups
from .importance import CRITERIA
from .io import load_model, save_model
from .prune import prune
from .recipe import Recipe
from .report import PruneReport
from .sparsify import SPARSIFIERS, SparsityReport, sparsify

__all__ = ["CRITERIA", "SPARSIFIERS", "HywiaError", "PruneReport", "Recipe", "SparsityReport", "find_groups", "load_model", "perplexity",
           "prune", "save_model", "sparsify"]
