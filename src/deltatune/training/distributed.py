"""Data-parallel training on torch.distributed: DDP, or FSDP2 with the frozen base sharded.

`torchrun` and `accelerate launch` both start one process per rank with RANK, WORLD_SIZE, LOCAL_RANK and
MASTER_ADDR/MASTER_PORT set; `init` joins that group (gloo on CPU, nccl on CUDA). Every rank builds the same
model from the same seed and reads its own contiguous slice of each global batch (the recipe's batch_size, in
the single-process order), and its loss is weighted by its share of the batch's loss terms (rows, or response
tokens), so the averaged gradient is the global batch's mean gradient, as one process computes it.

- ddp: DistributedDataParallel around the training forward (`LossStep`, which includes the methods' own loss
  terms, so every gradient path runs inside DDP's forward).
- fsdp: FSDP2 `fully_shard` on every block (the children of the model's ModuleLists), then on the model: each
  rank keeps 1/world of the frozen base's parameters. The trainable tensors (deltas, train_modules copies,
  DeltaModel.shared) are left out (`ignored_params`) and replicated: they are small (0.3% of MiniLM with LoRA),
  and kept whole they make adapter saves, PEFT export, checkpoints and optimizer state exactly the
  single-process ones (nothing to gather), and parameters that a step does not use need no collective
  agreement. Their gradients are averaged by one all-reduce per step (`sync_gradients`).
Only rank 0 writes files and logs; the other ranks follow its decisions (`Group.on_main`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from deltatune.engine.checkpointing import blocks
from deltatune.engine.layer import Delta
from deltatune.engine.model import DeltaModel
from deltatune.training.chunked_loss import chunked_causal_lm_loss

logger = logging.getLogger(__name__)

MODES = ("none", "ddp", "fsdp")
T = TypeVar("T")


class RemoteError(ValueError):
    """What failed on rank 0, raised on the other ranks too so that no rank waits for it forever."""


@dataclass
class Group:
    """This process's place in the run: rank, number of processes, and whether `init` started the group."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    mode: str = "none"
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.world > 1

    def device(self) -> torch.device:
        if torch.cuda.is_available():
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run `fn` on rank 0 only and give its result, or its error, to every rank."""
        if not self.parallel:
            return fn()
        box: list[Any] = [None]
        error: Exception | None = None
        if self.main:
            try:
                box[0] = ("ok", fn())
            except Exception as e:  # only its message travels: not every exception pickles
                error, box[0] = e, ("error", str(e))
        dist.broadcast_object_list(box, src=0)
        status, value = box[0]
        if error is not None:
            raise error
        if status == "error":
            raise RemoteError(value)
        return value

    def gather(self, value: T) -> list[T]:
        """`value` of every rank, in rank order (on every rank)."""
        if not self.parallel:
            return [value]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def total(self, value: float) -> float:
        """The sum of `value` over the ranks."""
        if not self.parallel:
            return value
        t = torch.tensor(value, dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t)
        return float(t)

    def _comm_device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def init(mode: str) -> Group:
    """Join the process group that torchrun / accelerate launch set up, as `train.distributed` asks."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if mode == "none":
        if world > 1:
            raise ValueError(f"launched as {world} processes (WORLD_SIZE={world}) but train.distributed=none: "
                             "set train.distributed=ddp or train.distributed=fsdp")
        return Group()
    if world == 1:
        logger.info("train.distributed=%s in a single process (no torchrun): training as one process", mode)
        return Group(mode=mode)
    owns = not dist.is_initialized()
    if owns:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=timedelta(minutes=30))
    return Group(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), mode, owns)


# --- data ----------------------------------------------------------------------------------------
def rank_share(examples: list[dict], loss_terms: Callable[[list[dict]], int], group: Group
               ) -> tuple[list[dict], float]:
    """This rank's contiguous slice of a global batch, and the weight of its mean loss.

    With DDP averaging over ranks, weight = world * (my loss terms) / (the batch's), so the averaged loss
    is the global batch's mean even when slices differ in size or token count; one process gets weight 1.
    A rank left without examples (a last batch smaller than the world) runs one with weight 0, so that
    it still joins every collective.
    """
    parts = np.array_split(np.arange(len(examples)), group.world)
    terms = [loss_terms([examples[i] for i in part]) for part in parts]
    mine = [examples[i] for i in parts[group.rank]]
    if not mine:
        return examples[:1], 0.0
    return mine, group.world * terms[group.rank] / sum(terms)


# --- the training forward -----------------------------------------------------------------------
class LossStep(nn.Module):
    """One training forward: (task loss, weighted task loss + the methods' own terms). One module call, so
    DDP sees every path to the gradients (regularizers included) inside its forward."""

    def __init__(self, dm: DeltaModel, chunked_loss: int | None = None):
        super().__init__()
        self.dm = dm
        self.chunked_loss = chunked_loss  # train.chunked_loss: tokens per chunk of a causal LM's loss

    def forward(self, batch: dict[str, Tensor], weight: float, accum: int) -> tuple[Tensor, Tensor]:
        if self.chunked_loss:
            loss = chunked_causal_lm_loss(self.dm, batch, self.chunked_loss)
        else:
            loss = self.dm(**batch).loss
        # as the single-process loop always wrote it: weight 1 changes no bit
        return loss, loss * weight / accum + self.dm.regularization_loss() / accum


def may_skip_parameters(dm: DeltaModel) -> bool:
    """Whether some step may leave a trainable parameter without a gradient, so DDP must look for unused ones:
    a delta with a step hook (DyLoRA's rank draw, LaMDA's freezing) or a module dropout (LoKr, LoHa)."""
    for _, layer in dm.layers():
        for delta in layer.deltas.values():
            parts = [delta, *getattr(delta, "parts", {}).values()]
            if any(type(d).on_step is not Delta.on_step for d in parts):
                return True
            if getattr(delta.config, "module_dropout", 0.0):
                return True
    return False


def wrap_ddp(step: LossStep, group: Group) -> nn.Module:
    """DDP around the training forward; buffers are equal on every rank by construction, so none are synced per step."""
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [group.local_rank] if torch.cuda.is_available() else None
    return DistributedDataParallel(step, device_ids=device_ids, forward_sync_buffers=False,
                                   find_unused_parameters=may_skip_parameters(step.dm))


def shard_base(dm: DeltaModel, group: Group) -> None:
    """FSDP2 on `dm.model`: every block, then the rest of the model; the trainable tensors stay whole on each rank."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    mesh = init_device_mesh(device_type, (group.world,))
    replicated = {p for p in dm.parameters() if p.requires_grad}
    for block in blocks(dm.model):
        fully_shard(block, mesh=mesh, ignored_params=replicated)
    fully_shard(dm.model, mesh=mesh, ignored_params=replicated)


def sync_gradients(params: Sequence[nn.Parameter], group: Group) -> None:
    """Average the replicated parameters' gradients over the ranks in one all-reduce. A gradient missing on a
    rank counts as zero there; one missing on every rank stays None (AdamW then skips it, as in one process)."""
    if not group.parallel:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
                     + [torch.tensor([p.grad is not None for p in params], dtype=params[0].dtype,
                                     device=params[0].device)])
    dist.all_reduce(flat)
    offset = 0
    for i, p in enumerate(params):
        n = p.numel()
        if flat[-len(params) + i] > 0:
            p.grad = (flat[offset : offset + n] / group.world).view_as(p).clone()
        offset += n


def local_parameter_bytes(module: nn.Module, trainable: bool = False) -> int:
    """Bytes of the (frozen, or trainable) parameters this rank holds: its shard of a sharded one."""
    total = 0
    for p in module.parameters():
        if p.requires_grad == trainable:
            local = p.to_local() if hasattr(p, "to_local") else p
            total += local.numel() * local.element_size()
    return total
