"""The README's Python quickstart runs as written."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_quickstart_runs(tmp_path, monkeypatch):
    text = README.read_text()
    section = text[text.index("## Python quickstart"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    assert (tmp_path / "runs/my-adapter/deltatune_config.json").is_file()
    assert (tmp_path / "runs/my-adapter-peft/adapter_config.json").is_file()
    assert namespace["mixed"].logits.shape == (4, 2)


def test_readme_merge_config_is_valid(tmp_path):
    from deltatune.merging.config import load_merge_config

    text = README.read_text()
    block = re.search(r"```yaml\n(method: .*?)```", text[text.index("## Merging"):], re.S).group(1)
    (tmp_path / "merge.yaml").write_text(block)
    cfg = load_merge_config(tmp_path / "merge.yaml")
    assert [m.path for m in cfg.models] == ["ft-math", "ft-code", "ft-chat"]
    assert cfg.models[2].weight == 0.5 and cfg.models[2].parameters == {"density": 0.5}


def test_readme_composition_block_runs(tmp_path, monkeypatch):
    import torch
    from transformers import AutoModel, AutoTokenizer

    import deltatune as dt
    from deltatune import assets

    text = README.read_text()
    section = text[text.index("### Activation deltas and composition"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"dt": dt, "model": AutoModel.from_pretrained(assets.minilm_path())}
    exec(compile(code, str(README), "exec"), namespace)
    dm = namespace["dm"]
    assert dm.setup == dt.Fuse("topic", "sentiment")
    assert (tmp_path / "runs/set/deltatune_setup.json").is_file()
    tok = AutoTokenizer.from_pretrained(assets.minilm_path())
    out = dm(**tok(["a fine film"], return_tensors="pt")).last_hidden_state
    assert torch.isfinite(out).all()


@pytest.mark.slow  # about 45 s on 2 cores: bitsandbytes' CPU NF4 quantizer takes ~10 s for SmolLM2, a merge as much
def test_readme_quantized_block_runs(tmp_path, monkeypatch):
    import torch

    pytest.importorskip("bitsandbytes")
    text = README.read_text()
    section = text[text.index("### Quantized bases (QLoRA)"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    with pytest.warns(UserWarning, match="quantized layers"):
        exec(compile(code, str(README), "exec"), namespace)
    assert 0 < namespace["worst"]
    layer = namespace["merged"].model.layers[0].self_attn.q_proj
    assert type(layer) is torch.nn.Linear and layer.weight.dtype == torch.bfloat16
