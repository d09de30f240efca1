"""Compression: pruning (unstructured, N:M, structured, layer removal), low-rank factorisation, recovery."""

from .calibration import gradient_norms, input_norms, text_batches
from .layers import block_influence, remove_layers, shortgpt
from .lowrank import LowRankLinear, factorize, laser, laser_search
from .pruning import nm_mask, nm_ok, prune, sparsity
from .recovery import perp_recover
from .report import CompressionReport, accuracy, perplexity
from .structured import load_pruned, prune_channels, prune_heads

__all__ = [
    "CompressionReport",
    "LowRankLinear",
    "accuracy",
    "block_influence",
    "factorize",
    "gradient_norms",
    "input_norms",
    "laser",
    "laser_search",
    "load_pruned",
    "nm_mask",
    "nm_ok",
    "perp_recover",
    "perplexity",
    "prune",
    "prune_channels",
    "prune_heads",
    "remove_layers",
    "shortgpt",
    "sparsity",
    "text_batches",
]
