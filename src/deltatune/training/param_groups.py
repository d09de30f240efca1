"""AdamW parameter groups: methods that train parts of a delta at their own learning rate, then LoRA+.

A delta module may declare `lr_groups(lr) -> [(parameters, lr_of_those), ...]` (DePT: the prompt at lr, the
embedding pair A, B at its own rate). Its trainable parameters go in those groups; every other trainable
parameter keeps lr, or goes through LoRA+'s split when `loraplus_ratio` is set. Each group is scaled by the
same warmup/decay schedule, so a group's rate keeps its ratio to lr throughout.
"""

from __future__ import annotations

from torch import nn

from .loraplus import loraplus_param_groups


def declared_groups(model: nn.Module, lr: float) -> list[tuple[list[nn.Parameter], float]]:
    """The (trainable parameters, lr) groups that deltas in `model` declare, equal rates merged."""
    by_lr: dict[float, list[nn.Parameter]] = {}
    seen: set[int] = set()
    for module in model.modules():
        if callable(getattr(module, "lr_groups", None)):
            for params, group_lr in module.lr_groups(lr):
                fresh = [p for p in params if p.requires_grad and id(p) not in seen]
                seen.update(id(p) for p in fresh)
                by_lr.setdefault(float(group_lr), []).extend(fresh)
    return [(params, group_lr) for group_lr, params in by_lr.items() if params]


def param_groups(model: nn.Module, lr: float, weight_decay: float = 0.0,
                 loraplus_ratio: float | None = None) -> list[dict]:
    """Every trainable parameter of `model` exactly once, in the groups its methods ask for."""
    declared = declared_groups(model, lr)
    groups = [{"params": params, "lr": group_lr, "weight_decay": weight_decay} for params, group_lr in declared]
    claimed = {id(p) for params, _ in declared for p in params}
    if loraplus_ratio is not None:  # LoRA+'s split of what no method claimed
        plus = loraplus_param_groups(model, lr, loraplus_ratio, weight_decay)
        plus = [{**g, "params": [p for p in g["params"] if id(p) not in claimed]} for g in plus]
        return groups + [g for g in plus if g["params"]]
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in claimed]
    if rest:
        groups.insert(0, {"params": rest, "lr": lr, "weight_decay": weight_decay})
    return groups
