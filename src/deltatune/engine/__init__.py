"""The method-independent engine: wrapping, adapters, merging, routing, IO."""

from .adapterhub import load_adapterhub
from .checkpointing import enable_gradient_checkpointing
from .composition import Average, BatchSplit, Block, Fuse, Parallel, Split, Stack
from .layer import BASE, Delta, DeltaLayer, Routing
from .model import Adapter, DeltaModel, inject, load, load_adapters, load_peft
from .registry import DeltaConfig, MethodSpec, get_method, list_methods, make_config, register

__all__ = ["BASE", "Adapter", "Average", "BatchSplit", "Block", "Fuse", "Parallel", "Split", "Stack", "Delta", "DeltaConfig", "DeltaLayer", "DeltaModel", "MethodSpec", "enable_gradient_checkpointing",
           "get_method",
           "inject", "list_methods", "load", "load_adapterhub", "load_adapters", "load_peft", "make_config", "register", "Routing"]
