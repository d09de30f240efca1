"""Methods by family; importing this package registers them all (and their PEFT codecs)."""

from .adapters import bottleneck, compacter, fusion, mam  # noqa: F401
from .allocation import adalora, increlora  # noqa: F401
from .lowrank import (  # noqa: F401
    capaboost,
    dylora,
    edora,
    lamda,
    lora_mini,
    lora_xs,
    monteclora,
    mos,
    nola,
    sharelora,
    sira,
    sorsa,
    vblora,
    vera,
)
from .lowrank.dora import DoRA, DoRAConfig
from .lowrank.lora import LoRA, LoRAConfig
from .lowrank.masked_lora import MaskedLoRA, MaskedLoRAConfig  # noqa: F401
from .multiplicative import boft, ether, ia3, oft, qgoft, ssf  # noqa: F401
from .prompt import adaption_prompt, cpt, dept, p_tuning, prefix, prompt_tuning  # noqa: F401
from .selective import (  # noqa: F401
    bitfit,
    diff_pruning,
    fish_mask,
    hft,
    ln_tuning,
    paca,
    random_sparse,
    sara,
    shira,
    spiel,
    trainable_tokens,
)
from .selective.full import Full, FullConfig
from .structured import flora, loha, lokr, loretta, surm  # noqa: F401
from .subspace import intrinsic  # noqa: F401

__all__ = ["DoRA", "DoRAConfig", "Full", "FullConfig", "LoRA", "LoRAConfig"]
