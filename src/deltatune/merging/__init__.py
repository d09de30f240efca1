"""Model merging: one task-vector pipeline (sparsify -> per-entry weight -> consensus -> normalise -> lambda),
its named presets (TIES, DARE, DAREx, Breadcrumbs, DELLA, Fisher, PCB), soups, exact adapter merging and ComPEFT."""

from .adapters import merge_adapters
from .compeft import apply_compressed_delta, compeft, compress_delta
from .darex import darex_prune, search_q
from .fisher import estimate_fisher, load_fisher, save_fisher
from .soup import greedy_soup, uniform_soup
from .sparsify import Sparsify, breadcrumbs, magnitude, magnitude_sampled, random_drop, sparsify
from .task_arithmetic import (
    MERGE_METHODS,
    Balance,
    Consensus,
    TaskVectorMerge,
    get_merge_method,
    linear,
)

__all__ = [
    "MERGE_METHODS",
    "Balance",
    "Consensus",
    "Sparsify",
    "TaskVectorMerge",
    "apply_compressed_delta",
    "breadcrumbs",
    "compeft",
    "compress_delta",
    "darex_prune",
    "estimate_fisher",
    "get_merge_method",
    "greedy_soup",
    "linear",
    "load_fisher",
    "magnitude",
    "magnitude_sampled",
    "merge_adapters",
    "random_drop",
    "save_fisher",
    "search_q",
    "sparsify",
    "uniform_soup",
]
