"""Each benchmarked method as deltatune and PEFT configure it, with the same hyperparameters.

Options follow each library's defaults where the two agree (they were checked by the parity tests), and
are set explicitly where they differ (OFT: PEFT's default 5-term Cayley-Neumann series). Methods PEFT lacks
run on the deltatune side only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import deltatune as dt

from .cases import Case


@dataclass(frozen=True)
class Peer:
    ours: dict[str, Any]  # deltatune method options (name included); "role" picks the case's targets
    peft: Callable[[list[str], Case], Any] | None = None  # PEFT config from the targets, or None
    lr: float = 3e-3  # quality runs: the methods table's rate for this method
    role: str = "attention"
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _lora(**kw: Any) -> Callable[[list[str], Case], Any]:
    def make(targets: list[str], case: Case) -> Any:
        import peft

        return peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets, **kw)
    return make


def _peft(cls: str, **kw: Any) -> Callable[[list[str], Case], Any]:
    def make(targets: list[str], case: Case) -> Any:
        import peft

        return getattr(peft, cls)(target_modules=targets, **kw)
    return make


def _ia3(targets: list[str], case: Case) -> Any:
    import peft

    return peft.IA3Config(target_modules=peft_targets(targets), feedforward_modules=peft_targets(case.targets["ffn"]))


def _prompt(cls: str, **kw: Any) -> Callable[[list[str], Case], Any]:
    """A PEFT prompt-learning config: model-level, so no targets; the task type from the case's model."""
    def make(targets: list[str], case: Case) -> Any:
        import peft

        task = "SEQ_CLS" if case.metric == "accuracy" else "CAUSAL_LM"
        return getattr(peft, cls)(task_type=task, **kw)
    return make


def peft_targets(targets: list[str]) -> list[str] | str:
    """deltatune's 're:' regex targets as PEFT's regex string (PEFT full-matches a str target)."""
    regex = [t[3:] for t in targets if t.startswith("re:")]
    if not regex:
        return targets
    names = [rf".*\.{t}" for t in targets if not t.startswith("re:")]
    return "|".join(f"(?:{p})" for p in names + regex)


PEERS: dict[str, Peer] = {
    "lora": Peer({"name": "lora", "r": 8, "alpha": 16}, _lora()),
    "lora_dropout": Peer({"name": "lora", "r": 8, "alpha": 16, "dropout": 0.1}, _lora(lora_dropout=0.1)),
    "dora": Peer({"name": "dora", "r": 8, "alpha": 16}, _lora(use_dora=True)),
    "vera": Peer({"name": "vera", "r": 256}, _peft("VeraConfig", r=256), lr=1e-1),
    "loha": Peer({"name": "loha", "r": 4, "alpha": 8}, _peft("LoHaConfig", r=4, alpha=8), lr=3e-2),
    "lokr": Peer({"name": "lokr"}, _peft("LoKrConfig"), lr=3e-2),
    "ia3": Peer({"name": "ia3"}, _ia3, lr=3e-2, role="ia3"),
    "oft": Peer({"name": "oft", "neumann_terms": 5}, _peft("OFTConfig", oft_block_size=32), lr=3e-3),
    "boft": Peer({"name": "boft"}, _peft("BOFTConfig", boft_block_size=4), lr=3e-2),
    "vblora": Peer({"name": "vblora", "vector_length": 64}, _peft("VBLoRAConfig", vector_length=64), lr=1e-2),
    "full": Peer({"name": "full"}, None, lr=2e-4),
    # prompt methods (role "model": no targets), 20 virtual tokens; each library's defaults otherwise agree
    # (P-tuning's MLP width = d, prefix tuning's reparameterisation on; PEFT's prefix default is off)
    "prompt_tuning": Peer({"name": "prompt_tuning", "num_virtual_tokens": 20},
                          _prompt("PromptTuningConfig", num_virtual_tokens=20), lr=3e-1, role="model"),
    "p_tuning": Peer({"name": "p_tuning", "num_virtual_tokens": 20},
                     _prompt("PromptEncoderConfig", num_virtual_tokens=20), lr=3e-3, role="model"),
    "prefix_tuning": Peer({"name": "prefix_tuning", "num_virtual_tokens": 20},
                          _prompt("PrefixTuningConfig", num_virtual_tokens=20, prefix_projection=True), lr=1e-2,
                          role="model"),
    "adaption_prompt": Peer({"name": "adaption_prompt", "adapter_len": 10, "adapter_layers": 8},
                            _prompt("AdaptionPromptConfig", adapter_len=10, adapter_layers=8), lr=9e-3, role="model",
                            notes="llama-style decoders only (SmolLM2)"),
}
PROMPT_METHODS = ["prompt_tuning", "p_tuning", "prefix_tuning", "adaption_prompt"]


def peer(method: str) -> Peer:
    """A method benchmarked against PEFT, or any registered deltatune method (deltatune side only)."""
    if method in PEERS:
        return PEERS[method]
    dt.get_method(method)  # raises with the close names for a misspelt method
    return Peer({"name": method})


def our_config(p: Peer, case: Case) -> Any:
    options = dict(p.ours)
    name = options.pop("name")
    if p.role == "model":  # a model-level delta (or its own default placement): no targets
        return dt.make_config(name, **options)
    targets = [case.model.base_model_prefix] if name == "full" else case.targets[p.role]
    extra = {"feedforward": case.targets["ffn"]} if name == "ia3" else {}
    return dt.make_config(name, targets=targets, **extra, **options)
