"""FISH mask (Sung et al., 2021): a fixed sparse mask of the entries with the largest empirical Fisher information,
F_i = (1/N) Σ_b (∂L_b/∂θ_i)² over N calibration batches (L_b: the batch's mean negative log-likelihood, the
model's own loss), keeping the global top k = ceil(density · n) over all targeted parameters together.

The scores are data, not options: `dt.fisher_scores(model, batches, targets)` computes them on the base model,
and the config carries them (`scores=`, never saved: the chosen indices are in the adapter file, so a saved
adapter loads without data). `deltatune train` computes them itself from the recipe's first
`calibration_batches` training batches (FishMaskConfig.calibrate). The official code squares each batch's mean
gradient, as here; with batch size 1 this is the per-sample Fisher of the paper's definition.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from pydantic import Field, PrivateAttr
from torch import Tensor, nn

from ...engine.layer import DeltaLayer
from ...engine.registry import register
from ...engine.selection import SelectionConfig, SelectionDelta, global_top_k, resolve_parameters

DEFAULT_TARGETS = ["re:.*\\.weight"]


def _model_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    out = model(**batch)
    if getattr(out, "loss", None) is None:
        raise ValueError("fisher_scores needs batches with labels (the model's output has no .loss); pass "
                         "loss=lambda model, batch: ... for a model without one")
    return out.loss


def fisher_scores(model: nn.Module, batches: Iterable[Any], targets: Any = None, exclude: Any = None,
                  loss: Callable[[nn.Module, Any], Tensor] = _model_loss) -> dict[str, Tensor]:
    """Empirical Fisher per entry of the targeted parameters: mean over batches of the squared gradient of the
    batch's loss (the mean negative log-likelihood). Keys are full parameter names ('encoder.layer.0...weight').

    Run on the base model (before `dt.inject`); it is left as it was (modes, requires_grad, no .grad)."""
    chosen = resolve_parameters(model, DEFAULT_TARGETS if targets is None else targets, exclude)
    names = [f"{path}.{n}" for path, ns in chosen.items() for n in ns]
    params = [model.get_submodule(path).get_parameter(n) for path, ns in chosen.items() for n in ns]
    if bad := [name for name, p in zip(names, params) if not p.is_floating_point()]:
        raise ValueError(f"fisher_scores needs float parameters; {bad[0]} is {params[names.index(bad[0])].dtype} "
                         "(a quantized base): compute the scores on the float model")
    was_training, flags = model.training, [p.requires_grad for p in params]
    sums = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    count = 0
    model.eval()  # dropout off: the Fisher of the model as it is
    try:
        for p in params:
            p.requires_grad_(True)
        for batch in batches:
            grads = torch.autograd.grad(loss(model, batch), params, allow_unused=True)
            for s, g in zip(sums, grads):
                if g is not None:
                    s.add_(g.detach().float().square())
            count += 1
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        model.train(was_training)
    if count == 0:
        raise ValueError("fisher_scores got no batches: pass at least one calibration batch")
    return {name: s / count for name, s in zip(names, sums)}


class FishMaskConfig(SelectionConfig):
    density: float = Field(0.005, gt=0, le=1, description="fraction of all targeted entries to train, chosen "
                                                          "globally by Fisher score (the paper's 0.5%)")
    calibration_batches: int = Field(8, gt=0, description="training batches `deltatune train` scores on")
    scores: Any = Field(None, exclude=True, description="full parameter name -> Fisher scores of the targeted "
                        "parameters (dt.fisher_scores); not saved: a saved adapter holds its indices")
    _chosen: dict | None = PrivateAttr(None)  # the global selection, computed once for all layers

    def default_parameter_targets(self) -> Any:
        return DEFAULT_TARGETS

    def calibrate(self, model: nn.Module, batches: Iterable[Any]) -> FishMaskConfig:
        """This config with the Fisher scores of `model` on `batches` (the trainer's hook)."""
        targets = self.targets if self.targets is not None else self.default_parameter_targets()
        return self.model_copy(update={"scores": fisher_scores(model, batches, targets, self.exclude)})

    def chosen(self) -> dict[str, Tensor]:
        if self.scores is None:
            raise ValueError("fish_mask needs Fisher scores to choose its entries: "
                             "make_config('fish_mask', scores=dt.fisher_scores(model, batches, targets), ...), "
                             "or train through a recipe (deltatune train scores its first training batches)")
        if self._chosen is None:
            total = sum(s.numel() for s in self.scores.values())
            self._chosen = global_top_k(self.scores, max(1, math.ceil(self.density * total)))
        return self._chosen


@register("fish_mask", config=FishMaskConfig, family="selective", formula="global top ceil(density · n) by Fisher",
          paper="2111.09839", summary="fixed sparse mask of the entries with the largest empirical Fisher")
class FishMask(SelectionDelta):
    def select(self, layer: DeltaLayer, name: str, param: Tensor) -> Tensor | None:
        chosen, full = self.config.chosen(), f"{layer.path}.{name}"
        if full not in chosen:
            raise ValueError(f"fish_mask has no Fisher scores for '{full}': compute the scores with the adapter's "
                             "own targets (dt.fisher_scores(model, batches, targets))")
        if self.config.scores[full].shape != param.shape:
            raise ValueError(f"fish_mask's scores for '{full}' have shape {tuple(self.config.scores[full].shape)}, "
                             f"the parameter {tuple(param.shape)}: scores of another model")
        return chosen[full].to(param.device)
