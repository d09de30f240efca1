"""Run under torchrun by tests/test_distributed.py: several training runs in one process group.

argv[1] is a JSON file: {"runs": [{"recipe": path, "overrides": [...], "resume": bool, "kill_rank": int|null, "kill_at": int|null}],
"report": path}. Each run is a Trainer on the recipe's overrides. Rank 0 writes, per run, what the test checks
beside the adapter files (and, when asked, the first step's gradients): every rank's bytes of frozen (base) parameters, and how far each rank's adapter
is from rank 0's after training (replicas must stay equal). A run with `kill_rank` SIGKILLs that rank just
before step `kill_at` begins, as a crashed process would die; torchrun then stops the others.
"""

from __future__ import annotations

import json
import os
import signal
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from deltatune.training import distributed
from deltatune.training.loop import Trainer
from deltatune.training.recipe import load_recipe


def record_first_gradients(trainer: Trainer, path: str) -> None:
    """Save the gradients the first optimizer step applies (averaged over the ranks) to `path`, on rank 0."""
    step = trainer.optimizer.step

    def recording_step(*args, **kwargs):
        trainer.optimizer.step = step
        if trainer.group.main:
            names = {id(p): n for n, p in trainer.model.named_parameters()}
            grads = {names[id(p)]: p.grad.detach().clone() for g in trainer.optimizer.param_groups
                     for p in g["params"] if p.grad is not None}
            save_file(grads, path)
        return step(*args, **kwargs)

    trainer.optimizer.step = recording_step


def run(spec: dict) -> dict:
    trainer = Trainer(load_recipe(spec["recipe"], spec["overrides"]), resume=spec.get("resume", False))
    trainer.setup()
    if spec.get("grads"):
        record_first_gradients(trainer, spec["grads"])
    if spec.get("kill_rank") == trainer.group.rank:
        step = trainer.train_step

        def dying_step():
            if trainer.step == spec["kill_at"]:
                os.kill(os.getpid(), signal.SIGKILL)
            return step()

        trainer.train_step = dying_step
    base_bytes = trainer.group.gather(distributed.local_parameter_bytes(trainer.model.model))
    trainer.train()
    state = trainer.model.adapter_state_dict()
    others = trainer.group.gather({k: t.detach().cpu() for k, t in state.items()})
    drift = max((others[r][k] - others[0][k]).abs().max().item() for r in range(len(others)) for k in state)
    return {"base_bytes": base_bytes, "replica_drift": drift}


def main() -> None:
    job = json.loads(open(sys.argv[1], encoding="utf-8").read())
    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # once for all runs; a Trainer leaves a group it did not start alone
    results = [run(spec) for spec in job["runs"]]
    if dist.get_rank() == 0:
        with open(job["report"], "w", encoding="utf-8") as f:
            json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
