"""`deltatune bench`: configs on both sides, the targets check, the CLI's errors, and one tiny real run."""

import json

import peft
import pytest
import torch
from torch import nn

from deltatune.bench import cases, report, suite
from deltatune.bench.peers import PEERS, our_config, peer, peft_targets
from deltatune.cli.main import main


class _Tiny(nn.Module):
    base_model_prefix = "bert"


def _case() -> cases.Case:
    ffn = r"re:.*layer\.\d+\.output\.dense"
    return cases.Case("minilm", _Tiny(), {}, [], [], {"attention": ["query", "value"],
                      "ia3": ["key", "value", ffn], "ffn": [ffn]}, "accuracy", ["classifier"])


@pytest.mark.parametrize("method", list(PEERS))
def test_every_paired_method_builds_on_both_sides(method):
    p, case = PEERS[method], _case()
    ours = our_config(p, case)
    if p.role == "model":  # prompt methods: model-level, or their own default placement (adaption prompt)
        assert ours.targets is None
    else:
        assert ours.targets == (["bert"] if method == "full" else case.targets[p.role])
    if p.peft is not None:
        theirs = p.peft(case.targets.get(p.role, []), case)
        assert isinstance(theirs, peft.PeftConfig)
        if p.role == "model":  # the same prompt size on both sides
            size = "adapter_len" if method == "adaption_prompt" else "num_virtual_tokens"
            assert getattr(theirs, size) == getattr(ours, size)


def test_regex_targets_become_one_peft_regex():
    pattern = peft_targets(["key", "value", r"re:.*layer\.\d+\.output\.dense"])
    import re

    for name in ("bert.encoder.layer.0.attention.self.key", "bert.encoder.layer.3.output.dense"):
        assert re.fullmatch(pattern, name)
    assert not re.fullmatch(pattern, "bert.encoder.layer.3.attention.output.dense")
    assert peft_targets(["query", "value"]) == ["query", "value"]


def test_unknown_method_names_the_close_ones():
    with pytest.raises(ValueError, match="lora"):
        peer("lorra")


def test_cli_rejects_bad_methods_and_models_before_running(capsys):
    assert main(["bench", "--methods", "lorra"]) == 2
    assert "lora" in capsys.readouterr().err
    assert main(["bench", "--models", "bert-huge"]) == 2
    assert "minilm" in capsys.readouterr().err
    assert main(["bench", "--dtype", "fp8"]) == 2
    assert "bfloat16" in capsys.readouterr().err
    assert main(["bench", "--device", "tpu"]) == 2
    assert "use cpu or cuda" in capsys.readouterr().err


def _cell(method, ours_t, peft_t, ours_m, peft_m, floor_m=100.0):
    r = lambda v: {"min": v, "median": v, "max": v}  # noqa: E731
    return {"model": "minilm", "method": method, "peer": "peft",
            "time_s": {"floor": r(1.0), "deltatune": r(ours_t), "peft": r(peft_t)},
            "step_peak_mib": {"floor": floor_m, "deltatune": ours_m, "peft": peft_m},
            "ratios": {"deltatune/peft time": r(ours_t / peft_t), "deltatune/floor time": r(ours_t),
                       "peft/floor time": r(peft_t)}}


def test_targets_are_checked_from_the_measurements():
    results = {"config": {"mixed": [8]}, "train": [
        _cell("lora", 1.02, 1.05, 130, 190),  # time ok, floor ok, memory 30 <= 45
        _cell("lora_dropout", 1.10, 1.12, 150, 260),  # 1.10/1.12 = 0.982 > 0.97; memory 20 vs 70: ok
        _cell("dora", 1.08, 1.20, 200, 180),  # 1.08/1.02 = 1.059 > 1.05; memory above PEFT's
    ], "inference": [{"model": "minilm", "ratios": {
        "deltatune/peft unmerged": {"median": 0.99}, "merged/base": {"median": 1.03},
        "deltatune mixed 8/single": {"median": 1.04}}}]}
    met = {t: ok for _, t, _, ok in report.targets(results)}
    assert met == {
        "LoRA time <= PEFT (median ratio <= 1.00)": True, "LoRA time <= 1.03x floor": True,
        "LoRA memory above floor <= half of PEFT's": True, "LoRA dropout 0.1 time <= 0.97x PEFT": False,
        "dropout memory above LoRA <= half of PEFT's": True,
        "DoRA time <= 1.05x deltatune LoRA (each against its floor)": False, "DoRA step memory <= PEFT DoRA": False,
        "inference unmerged <= PEFT": True, "inference merged within 2% of base": False,
        "mixed batch of 8 adapters <= 1.05x single": True}


def test_a_tiny_real_run_writes_json_markdown_and_plots(tmp_path):
    """MiniLM, LoRA beside PEFT: one timed round, two training steps, a mixed batch of two adapters."""
    cfg = suite.BenchConfig(models=["minilm"], methods=["lora"], rounds=1, warmup=0, memory_rounds=1,
                            quality_steps={"minilm": 2}, eval_rows={"minilm": 50}, infer_rounds=1, mixed=[2],
                            out=str(tmp_path))
    results = suite.run(cfg, log=lambda line: None)
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["train"][0]["trainable"] == {"deltatune": 73_728, "peft": 73_728}
    cell = saved["train"][0]
    assert cell["adapter_bytes"]["deltatune"] > 73_728 * 4 and cell["adapter_bytes"]["peft"] > 73_728 * 4
    assert 0.0 <= cell["quality"]["deltatune"] <= 1.0 and cell["quality"]["steps"] == 2
    assert {"base", "deltatune merged", "deltatune unmerged", "peft unmerged", "deltatune mixed 2",
            "peft mixed 2"} == set(saved["inference"][0]["time_s"])
    md = (tmp_path / "bench.md").read_text()
    assert "| lora | peft | 73,728 |" in md and "## Targets" in md
    assert (tmp_path / "bench_minilm.png").stat().st_size > 10_000
    assert results["train"][0]["method"] == "lora"


def test_rounds_alternate_so_neighbours_follow_each_other_alike():
    # a step's peak depends on what the step before it left in the heap: deltatune and its peer sit side by side
    from deltatune.bench import measure

    for measured in (lambda fns: measure.peak_samples(fns, 4, torch.device("cpu")),
                     lambda fns: measure.interleaved_times(fns, 4, 0, torch.device("cpu"))):
        order: list[str] = []
        samples = measured({k: (lambda k=k, order=order: order.append(k)) for k in "abc"})
        assert {k: len(v) for k, v in samples.items()} == {"a": 4, "b": 4, "c": 4}
        follows = [(order[i - 1], order[i]) for i in range(1, len(order))]
        for x, y in (("a", "b"), ("b", "c")):
            assert follows.count((x, y)) == follows.count((y, x)) == 2, order
