"""Shared fixtures: a small synthetic model with every supported layer kind, real MiniLM, tiny GPT-2 / Llama.

Real models are loaded once per session and handed out as fresh deep copies, so tests can inject,
merge and perturb them freely without paying for another `from_pretrained`.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

SENTENCES = [
    "A gripping, beautifully acted film.",
    "Dull, slow and far too long.",
    "The plot never quite comes together, but the cast is charming.",
    "An instant classic.",
]


class Synthetic(nn.Module):
    """Embedding -> Linear -> GPT-2 Conv1D -> Conv2d -> head: one of each layer kind deltatune adapts."""

    def __init__(self, vocab: int = 10, dim: int = 8, channels: int = 4, classes: int = 2):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.lin = nn.Linear(dim, dim)
        self.c1 = Conv1D(dim, dim)  # (nf, nx): weight stored (d_in, d_out)
        self.conv = nn.Conv2d(dim, channels, 3, padding=1)
        self.head = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c1(torch.tanh(self.lin(self.emb(x))))  # (B, T, dim)
        h = h.transpose(1, 2)[..., None].expand(-1, -1, -1, 3).contiguous()  # (B, dim, T, 3)
        return self.head(torch.tanh(self.conv(h)).mean((2, 3)))


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same global RNG state, whatever ran before it (adapter inits use it)."""
    torch.manual_seed(1234)


@pytest.fixture(scope="session")
def synthetic_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.clone() for k, v in Synthetic().state_dict().items()}


@pytest.fixture
def make_synthetic(synthetic_state):
    """Factory: a fresh Synthetic with the same (seeded) weights each call."""

    def make() -> Synthetic:
        m = Synthetic()
        m.load_state_dict(synthetic_state)
        return m.eval()

    return make


@pytest.fixture(scope="session")
def synthetic_input() -> torch.Tensor:
    return torch.randint(0, 10, (3, 5), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def _minilm():
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from deltatune import assets

    path = assets.minilm_path()
    torch.manual_seed(0)  # the classifier head is freshly initialised
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


@pytest.fixture(scope="session")
def make_minilm(_minilm):
    """Factory: a fresh deep copy of the session's MiniLM sequence classifier (eval mode)."""
    model, _ = _minilm

    def make() -> nn.Module:
        return copy.deepcopy(model).eval()

    return make


@pytest.fixture(scope="session")
def minilm_tokenizer(_minilm):
    return _minilm[1]


@pytest.fixture(scope="session")
def minilm_batch(minilm_tokenizer) -> dict[str, torch.Tensor]:
    return dict(minilm_tokenizer(SENTENCES, padding=True, return_tensors="pt"))


@pytest.fixture
def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64,
                                      bos_token_id=0, eos_token_id=0)).eval()


@pytest.fixture
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def minilm():
    """(all-MiniLM-L6-v2's path, a padded batch of two sentences): the activation-adapter tests build their own."""
    from transformers import AutoTokenizer

    from deltatune import assets

    path = assets.minilm_path()
    tok = AutoTokenizer.from_pretrained(path)
    batch = dict(tok(["a fine, moving film", "terrible, boring and far too long"], padding=True, return_tensors="pt"))
    return path, batch
