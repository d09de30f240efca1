"""`deltatune bench --bases`: LoRA r=16 over fp32/bf16/int8/NF4 bases beside PEFT's QLoRA (bench/quantized.py)."""

import json

import pytest
import torch
from helpers import assert_close
from transformers import LlamaConfig, LlamaForCausalLM

from deltatune.bench import cases, quantized, suite
from deltatune.cli.main import main

pytest.importorskip("bitsandbytes")


def _tiny_case(tmp_path, train_steps=2) -> cases.Case:
    """A random two-block Llama saved to disk (PEFT's peers load it through BitsAndBytesConfig), real-shaped
    batches of token ids."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    model.save_pretrained(tmp_path / "tiny")
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    return cases.Case("tiny", model, batch, [batch] * train_steps, [batch], {"all_linear": list(cases.LM_LINEAR)},
                      "perplexity", [], tmp_path / "tiny")


def test_peft_stands_beside_the_quantized_bases_only():
    labels = [c.label for c in quantized.contenders(["fp32", "bf16", "int8", "nf4"], torch.float32, True, ["bf16"])]
    assert labels == ["deltatune fp32", "deltatune bf16", "deltatune int8", "peft int8", "deltatune nf4", "peft nf4"]
    by_label = {c.label: c for c in quantized.contenders(["bf16", "nf4"], torch.bfloat16, False, ["bf16"])}
    assert set(by_label) == {"deltatune bf16", "deltatune nf4"}
    assert not by_label["deltatune bf16"].steps and by_label["deltatune nf4"].steps
    assert by_label["deltatune nf4"].dtype == torch.bfloat16  # QLoRA's recipe when asked for
    with pytest.raises(ValueError, match=r"unknown base 'fp8'.*'nf4'"):
        quantized.contenders(["fp8"], torch.float32, True, [])


def test_checkpointing_covers_every_contender_but_the_fp32_reference():
    who = quantized.contenders(["fp32", "bf16", "nf4"], torch.bfloat16, True, [], checkpointing=True)
    assert [(c.label, c.checkpointing) for c in who] == [
        ("deltatune fp32", False), ("deltatune fp32 ckpt", True), ("deltatune bf16", True),
        ("deltatune nf4", True), ("peft nf4", True)]
    assert {c.dtype for c in who if c.base != "fp32"} == {torch.bfloat16}
    chunked = quantized.contenders(["fp32", "nf4"], torch.bfloat16, True, [], checkpointing=True, chunked_loss=64)
    assert [(c.label, c.chunked_loss) for c in chunked] == [
        ("deltatune fp32", None), ("deltatune fp32 ckpt", 64), ("deltatune nf4", 64), ("peft nf4", 64)]


def test_the_chunked_loss_gives_peft_s_model_its_own_loss_and_gradients(tmp_path):
    # the cells give PEFT's QLoRA model the same chunked loss as deltatune's: it must be PEFT's loss there too
    from deltatune.training.chunked_loss import chunked_causal_lm_loss

    case = _tiny_case(tmp_path)
    model = quantized.build(case, quantized.Contender("peft", "peft", "nf4", torch.float32)).train()
    batch = {k: v[:, :12] for k, v in case.batch.items()}
    runs = []
    for loss in (lambda: model(**batch).loss, lambda: chunked_causal_lm_loss(model, batch, 8)):
        model.zero_grad(set_to_none=True)
        value = loss()
        value.backward()
        runs.append((value.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    (plain, plain_grads), (chunked, chunked_grads) = runs
    assert_close(chunked, plain, rtol=1e-5)
    for a, b in zip(chunked_grads, plain_grads):
        assert_close(a, b)


def test_both_sides_build_checkpointed_and_get_the_same_lora_gradients(tmp_path):
    """The QLoRA setup the cells time: an NF4 base in bf16 with checkpointing, deltatune's and PEFT's alike; the
    recompute changes no gradient."""
    case = _tiny_case(tmp_path)
    case.batch = {k: v[:, :8] for k, v in case.batch.items()}
    grads = {}
    for side in ("deltatune", "peft"):
        for ckpt in (False, True):
            model = quantized.build(case, quantized.Contender(side, side, "nf4", torch.bfloat16, True, ckpt)).train()
            hf = model.base_model.model if side == "peft" else model.model
            assert [block.gradient_checkpointing for block in hf.model.layers] == [ckpt, ckpt]
            model(**case.batch).loss.backward()
            grads[side, ckpt] = [p.grad.clone() for n, p in model.named_parameters() if p.requires_grad]
            assert grads[side, ckpt][0].dtype == torch.float32  # fp32 LoRA weights on the bf16 base
    for side in ("deltatune", "peft"):
        for a, b in zip(grads[side, False], grads[side, True]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)  # the recompute redoes the same bf16 arithmetic


def test_tensor_bytes_count_packed_weights_and_shared_storage_once(tmp_path):
    case = _tiny_case(tmp_path)
    fp32 = quantized.build(case, quantized.Contender("deltatune fp32", "deltatune", "fp32", torch.float32))
    nf4 = quantized.build(case, quantized.Contender("deltatune nf4", "deltatune", "nf4", torch.float32))
    linear = sum(m.weight.numel() for n, m in case.model.named_modules()
                 if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head"))
    rest = sum(p.numel() for p in case.model.parameters()) - linear  # embedding (tied to lm_head) and norms
    lora = sum(p.numel() for p in fp32.parameters() if p.requires_grad)
    rotary = sum({b.data_ptr(): b.nbytes for b in case.model.buffers()}.values())  # RoPE's frequencies
    assert quantized.tensor_mib(fp32) * 2**20 == 4 * (linear + rest + lora) + rotary  # tied lm_head counted once
    # NF4: half a byte per weight, one fp32 scale per block of 64, and each layer's 16-entry NF4 code book
    layers = 2 * len(cases.LM_LINEAR)
    assert quantized.tensor_mib(nf4) * 2**20 == (linear // 2 + 4 * (linear // 64) + layers * 16 * 4
                                                  + 4 * (rest + lora) + rotary)


def test_targets_read_the_training_peaks_and_the_per_round_ratio():
    r = lambda v: {"min": v, "median": v, "max": v}  # noqa: E731
    held = {"deltatune fp32": 2500, "deltatune nf4": 700, "peft nf4": 700}
    step = {"deltatune fp32": 1500, "deltatune nf4": 800, "peft nf4": 700}
    cell = {"model": "qwen_coder", "contenders": {k: {"tensor_mib": v} for k, v in held.items()},
            "step_peak_mib": step, "ratios": {"deltatune nf4/peft nf4 time": r(0.9)}}
    met = {t: (v, ok) for _, t, v, ok in quantized.targets(cell)}
    assert met["NF4 training peak <= 0.4x fp32 LoRA's"] == ("0.375 (1500 / 4000 MiB)", True)
    assert met["NF4 training peak <= PEFT QLoRA's"][1] is False
    assert met["NF4 step time <= PEFT QLoRA's (median ratio)"] == ("0.900", True)


def test_a_tiny_real_cell_beside_peft_qlora(tmp_path):
    """Every contender built, stepped (bf16 weighed only), trained alike; PEFT trains exactly as many weights."""
    case = _tiny_case(tmp_path)
    lines = []
    cell = quantized.quantized_cell(case, list(quantized.BASES), torch.float32, rounds=2, warmup=0, memory_rounds=1,
                                    peft=True, resident_only=["bf16"], log=lines.append)
    stepped = ["deltatune fp32", "deltatune int8", "peft int8", "deltatune nf4", "peft nf4"]
    assert list(cell["time_s"]) == stepped and not cell["contenders"]["deltatune bf16"]["stepped"]
    trainable = {k: c["trainable"] for k, c in cell["contenders"].items()}
    per_block = 16 * (128 + 128) * 2 + 16 * (128 + 64) * 2 + 16 * (128 + 256) * 3  # q, o; k, v; gate, up, down
    assert set(trainable.values()) == {2 * per_block}
    for b in ("int8", "nf4"):  # each quantized base is timed against PEFT on the same base, round by round
        assert cell["ratios"][f"deltatune {b}/peft {b} time"]["median"] > 0
    for k in stepped:
        assert cell["train_peak_mib"][k] == cell["contenders"][k]["tensor_mib"] + cell["step_peak_mib"][k]
        assert 1.0 < cell["quality"][k] < 1e4  # a perplexity, finite
    # the same seed, data and schedule: deltatune and PEFT land close on the same base
    assert cell["quality"]["deltatune nf4"] == pytest.approx(cell["quality"]["peft nf4"], rel=0.05)
    md = "\n".join(quantized.markdown([cell]))
    assert "| deltatune bf16 | 65,536 | not run |" in md and "| peft nf4 | 65,536 |" in md
    assert "Built and weighed only (not stepped): deltatune bf16" in md


def test_cli_bases_alone_run_the_quantized_cells(tmp_path, monkeypatch, capsys):
    assert main(["bench", "--bases", "fp8"]) == 2
    assert "unknown base 'fp8'" in capsys.readouterr().err
    seen = {}
    monkeypatch.setattr(suite, "run", lambda cfg, log, command: seen.update(cfg=cfg, command=command))
    assert main(["bench", "--bases", "fp32", "nf4", "--resident-only", "bf16", "--out", str(tmp_path)]) == 0
    cfg = seen["cfg"]
    assert cfg.methods == [] and not cfg.inference and cfg.models == ["smollm2", "qwen_coder"]
    assert cfg.bases == ["fp32", "nf4"] and cfg.resident_only == ["bf16"] and cfg.quantized_dtype == "float32"
    assert seen["command"] == f"deltatune bench --out {tmp_path} --bases fp32 nf4 --resident-only bf16"
    json.dumps(suite.asdict(cfg))  # the config is written into the results
    assert not cfg.checkpointing
    assert main(["bench", "--bases", "nf4", "--checkpointing", "--out", str(tmp_path)]) == 0
    assert seen["cfg"].checkpointing and seen["command"] == f"deltatune bench --checkpointing --out {tmp_path} --bases nf4"
    assert main(["bench", "--bases", "nf4", "--chunked-loss", "128", "--out", str(tmp_path)]) == 0
    assert seen["cfg"].chunked_loss == 128 and "--chunked-loss 128" in seen["command"]
