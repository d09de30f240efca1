"""The math of P-tuning, DePT and CPT on its own (no model): formulas, by-hand values and parity with peft's
modules (PromptEncoder, CPTEmbedding), which these files follow."""

import math

import pytest
import torch
from helpers import assert_close
from peft import CPTConfig, PromptEncoderConfig
from peft.tuners.cpt.model import CPTEmbedding
from peft.tuners.p_tuning.model import PromptEncoder as PeftPromptEncoder

from deltatune.methods.prompt import cpt, dept
from deltatune.methods.prompt.p_tuning import PromptEncoder, encoder_parameters

# ---- P-tuning's encoder ----

@pytest.mark.parametrize("kind,layers", [("MLP", 2), ("LSTM", 1), ("LSTM", 2), ("LSTM", 3)])
def test_encoder_parameter_formula(kind, layers):
    enc = PromptEncoder(5, 12, kind, hidden=7, num_layers=layers)
    assert sum(p.numel() for p in enc.parameters()) == encoder_parameters(5, 12, 7, kind, layers)


@pytest.mark.parametrize("kind,layers", [("MLP", 2), ("LSTM", 2)])
def test_encoder_matches_peft(kind, layers):
    cfg = PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=6, token_dim=16, encoder_hidden_size=10,
                              encoder_reparameterization_type=kind, encoder_num_layers=layers,
                              num_transformer_submodules=1)
    torch.manual_seed(0)
    peft_enc = PeftPromptEncoder(cfg)
    ours = PromptEncoder(6, 16, kind, hidden=10, num_layers=layers)
    ours.load_state_dict(peft_enc.state_dict())  # same names and shapes, strict
    assert_close(ours(), peft_enc(torch.arange(6).unsqueeze(0))[0])
    assert_close(ours.folded(), ours())


def test_encoder_mlp_by_hand():
    enc = PromptEncoder(3, 4, "MLP", hidden=5)
    E, (l1, _, l2, _, l3) = enc.embedding.weight, enc.mlp_head
    expected = l3(torch.relu(l2(torch.relu(E @ l1.weight.T + l1.bias))))
    assert_close(enc(), expected)


def test_folded_has_no_lstm_dropout():
    enc = PromptEncoder(4, 8, "LSTM", hidden=6, num_layers=2, dropout=0.9).train()
    torch.manual_seed(1)
    noisy = enc()
    enc.eval()
    clean = enc()
    assert (noisy - clean).abs().max() > 1e-3  # dropout acts in training
    assert_close(enc.train().folded(), clean)
    assert enc.training  # folded() leaves the mode as it was


# ---- DePT ----

def test_dept_budget_of_the_papers_setting():
    # official README: t5-base (d=768), max length 256, r=45 and m=40 match prompt tuning with 100 tokens
    assert dept.prompt_length(100, 768, 45, 256) == 40
    assert dept.dept_parameters(100, 768, 45, 256) == 100 * 768


@pytest.mark.parametrize("tokens,d,r,S", [(20, 384, 4, 64), (30, 576, 8, 128), (7, 16, 1, 5)])
def test_dept_budget_is_the_largest_m_within_l_d(tokens, d, r, S):
    m = dept.prompt_length(tokens, d, r, S)
    assert m * d + r * (S + d) <= tokens * d < (m + 1) * d + r * (S + d)


def test_dept_over_budget_names_the_fix():
    with pytest.raises(ValueError, match="lower rank"):
        dept.prompt_length(10, 64, 8, 128)


def test_dept_update_by_hand():
    A, B = torch.randn(4, 2), torch.randn(2, 3)
    pos = torch.tensor([[0, 1, 2, 3, 4, 5], [3, 0, 1, 0, 9, 2]])
    out = dept.embedding_update(A, B, 0.5, pos)
    for i in range(2):
        for j in range(6):
            p = pos[i, j].item()
            expected = 0.5 * A[p] @ B if p < 4 else torch.zeros(3)
            assert_close(out[i, j], expected)


def test_dept_init_is_prompt_tuning():
    A, B = dept.init_pair(16, 4, 8)
    assert torch.all(B == 0) and A.abs().max() <= 1 / math.sqrt(4) and A.std() > 0


# ---- CPT ----

TYPES = [1, 2, 2, 3, 4, 5, 6, 7, 8, 8, 0]  # two examples (1-4, 5-8) and an untyped token


def _peft_cpt(d=32):
    cfg = CPTConfig(task_type="CAUSAL_LM", cpt_token_ids=list(range(len(TYPES))), cpt_tokens_type_mask=TYPES,
                    opt_projection_epsilon=0.2, opt_projection_format_epsilon=0.05,
                    opt_weighted_loss_type="decay", opt_loss_decay_factor=0.5)
    cfg.token_dim = d
    return cfg, CPTEmbedding(cfg, torch.nn.Embedding(20, d))


def test_cpt_epsilons_and_projection_match_peft():
    cfg, emb = _peft_cpt()
    types = torch.tensor(TYPES)
    eps = cpt.epsilons(types, 32, 0.2, 0.05)
    assert_close(eps, emb.get_epsilon())
    with torch.no_grad():  # rows inside and outside their balls, and a zero row
        emb.delta_embedding.weight.copy_(torch.randn(len(TYPES), 32) * torch.logspace(-3, 0, len(TYPES))[:, None])
        emb.delta_embedding.weight[0] = 0
    ours = cpt.project(emb.delta_embedding.weight.detach(), eps)
    assert_close(ours, emb.get_projection())
    assert torch.all(ours.norm(dim=1) <= eps * (1 + 1e-6))
    assert_close(cpt.project(ours, eps), ours)  # a projection: idempotent


def test_cpt_trained_tokens_match_peft_gradient_mask():
    _, emb = _peft_cpt()
    emb(torch.arange(len(TYPES))).sum().backward()
    peft_trained = emb.delta_embedding.weight.grad.abs().sum(1) > 0
    assert cpt.trained_tokens(torch.tensor(TYPES)).tolist() == peft_trained.tolist()


def test_cpt_loss_matches_peft():
    cfg, _ = _peft_cpt()
    torch.manual_seed(0)
    b, n, V = 3, 6, 20
    labels = torch.randint(0, V, (b, n))
    input_types = torch.tensor([[1, 2, 3, 4, 4, 0], [1, 1, 2, 3, 4, 0], [1, 2, 3, 4, 0, 0]])
    types = torch.tensor(TYPES)
    full, all_types = cpt.full_labels(labels, input_types, torch.tensor(cfg.cpt_token_ids), types)
    logits = torch.randn(b, len(TYPES) + n, V)
    out = type("Out", (), {"logits": logits})()
    expected = CPTEmbedding.calculate_loss(out, full, all_types, cfg).loss
    assert_close(cpt.cpt_loss(logits, full, all_types, 0.5), expected)
    # labels: the context's label tokens (types 4, 8) carry their ids, the inputs' label positions theirs
    assert full[0, : len(TYPES)].tolist() == [-100] * 4 + [4] + [-100] * 3 + [8, 9, -100]
    assert full[0, len(TYPES):].tolist() == [-100, -100, -100, labels[0, 3].item(), labels[0, 4].item(), -100]


def test_cpt_decay_weights_by_hand():
    types = torch.tensor([[1, 4, 5, 8, 8, 9, 12, 0]])
    assert cpt.decay_weights(types, 0.5).tolist() == [[1, 0.25, 1, 0.5, 0.5, 1, 1, 1]]
