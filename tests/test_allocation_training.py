"""AdaLoRA and IncreLoRA through `deltatune train`: the trainer drives their schedules (total steps from the run),
the ranks move, and a run killed mid-way and resumed ends equal to an uninterrupted one (allocator state in the
checkpoint)."""

from __future__ import annotations

import pytest
from helpers import assert_close
from safetensors.torch import load_file

from deltatune.methods.allocation import adalora, increlora
from deltatune.training.loop import Trainer
from deltatune.training.recipe import load_recipe

TINY = ["data.max_train=40", "data.max_eval=16", "train.batch_size=4", "train.grad_accum=2", "train.max_length=24",
        "train.steps=10", "train.save_every=3", "train.keep_checkpoints=3"]
METHODS = {
    "adalora": ("method={name: adalora, init_r: 4, target_r: 2, tinit: 1, tfinal: 3, dropout: 0.1, "
                "targets: [query, value]}", adalora.ranks, lambda n: 2 * n),
    "increlora": ("method={name: increlora, r: 1, target_r: 2, max_r: 4, add_r: 1, top_h: 3, tinit: 1, delta_t: 2, "
                  "dropout: 0.1, targets: [query, value]}", increlora.ranks, lambda n: 2 * n),
}


class Killed(Exception):
    pass


def run(overrides, resume=False):
    trainer = Trainer(load_recipe(None, overrides), resume=resume)
    trainer.setup()
    return trainer


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_schedule_runs_and_a_resumed_run_matches(method, tmp_path, monkeypatch):
    section, ranks, budget = METHODS[method]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    trainer = run([*TINY, section, f"train.output_dir={whole}"])
    trainer.train()
    used = ranks(trainer.model)
    assert sum(used.values()) == budget(len(used))  # the budget reached within the run's 10 steps
    assert len(set(used.values())) > 1 or method == "adalora"  # IncreLoRA's growth is uneven by design

    original = Trainer.train_step

    def killed(self):
        if self.step == 5:  # after the checkpoint of step 3, mid-allocation
            raise Killed
        return original(self)

    monkeypatch.setattr(Trainer, "train_step", killed)
    with pytest.raises(Killed):
        run([*TINY, section, f"train.output_dir={parts}"]).train()
    monkeypatch.undo()
    resumed = run([*TINY, section, f"train.output_dir={parts}"], resume=True)
    assert resumed.step == 3
    resumed.train()
    assert ranks(resumed.model) == used
    a, b = load_file(whole / "adapter" / "adapter.safetensors"), load_file(parts / "adapter" / "adapter.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert_close(a[key].float(), b[key].float(), rtol=1e-5, atol=1e-6, msg=key)
