"""Every pruning method hywia has, one module per method family; importing this package registers them all.

structured (groups scored, then removed: a smaller dense model, hywia/prune.py):
    magnitude   random, l1, l2             llm_pruner  element1, element2, vector
    flap        flap, wanda_sp             hywia       hywia                       saap   saap
    slimgpt     slimgpt (chooses and refits layer by layer on calibration inputs, hywia/reconstruct.py)
unstructured and N:M (weights zeroed in place, layer by layer: same shapes, hywia/sparsify.py):
    magnitude   magnitude                  wanda       wanda
    sparsegpt   sparsegpt                  mixed       mixed (sensitivity-aware mixed sparsity over SparseGPT)
"""
from . import flap, hywia, llm_pruner, magnitude, mixed, saap, slimgpt, sparsegpt, wanda  # noqa: F401
