"""`deltatune bench`: methods x models, side by side with PEFT, interleaved in one process (see suite.py)."""

from .suite import BenchConfig, run

__all__ = ["BenchConfig", "run"]
