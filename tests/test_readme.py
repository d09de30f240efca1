"""The README's Python quickstart runs as written."""

import re
from pathlib import Path

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
