"""BitFit (Ben Zaken et al., 2022): train only the bias terms. A selection delta on every `*.bias`."""

from __future__ import annotations

from typing import Any

from ...engine.registry import register
from ...engine.selection import SelectionConfig, SelectionDelta


class BitFitConfig(SelectionConfig):
    def default_parameter_targets(self) -> Any:
        return ["*.bias"]

    def no_match_hint(self) -> str:
        return ("BitFit trains biases only, and a model without them (Llama, SmolLM2, Qwen and most recent decoders "
                "build their layers with bias=False) would train nothing: use ln_tuning (the norm layers' weights), "
                "or a method with parameters of its own, e.g. ssf (a learned per-channel scale and shift) or lora")


@register("bitfit", config=BitFitConfig, family="selective", formula="d_out (the bias)",
          paper="2106.10199", summary="train only the biases")
class BitFit(SelectionDelta):
    pass
