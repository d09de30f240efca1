"""BitFit (Ben Zaken et al., 2022): train only the bias terms. A selection delta on every `*.bias`."""

from __future__ import annotations

from typing import Any

from ...engine.registry import register
from ...engine.selection import SelectionConfig, SelectionDelta


class BitFitConfig(SelectionConfig):
    def default_parameter_targets(self) -> Any:
        return ["*.bias"]


@register("bitfit", config=BitFitConfig, family="selective", formula="d_out (the bias)",
          paper="2106.10199", summary="train only the biases")
class BitFit(SelectionDelta):
    pass
