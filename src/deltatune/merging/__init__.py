"""Model merging: task vectors, their sparsifiers and the named presets (TIES, DARE, Breadcrumbs, DELLA, soup)."""

from .sparsify import Sparsify, breadcrumbs, magnitude, magnitude_sampled, random_drop, sparsify
from .task_arithmetic import (
    MERGE_METHODS,
    Consensus,
    TaskVectorMerge,
    get_merge_method,
    linear,
)

__all__ = [
    "MERGE_METHODS",
    "Consensus",
    "Sparsify",
    "TaskVectorMerge",
    "breadcrumbs",
    "get_merge_method",
    "linear",
    "magnitude",
    "magnitude_sampled",
    "random_drop",
    "sparsify",
]
