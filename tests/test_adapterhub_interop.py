"""AdapterHub interop, live against `adapters` 1.3 (in its own .venv-adapters, built here when missing).

Both ways, on MiniLM in eval mode and float32: AdapterHub randomises its adapters and saves them
(use_safetensors=True), deltatune imports the folders and must give AdapterHub's last_hidden_state; then
deltatune moves every weight, exports the adapters, and AdapterHub's own load_adapter / load_adapter_fusion
of those folders must give deltatune's output. The peer runs every case of a direction in one process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_close
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForSequenceClassification

import deltatune as dt
from deltatune import assets
from deltatune.engine import DeltaLayer

ROOT = Path(__file__).resolve().parents[1]
VENV_PYTHON = ROOT / ".venv-adapters" / "bin" / "python"
PEER = ROOT / "benchmarks" / "adapterhub_peer.py"
SETUP = ROOT / "benchmarks" / "setup_adapters.sh"
TEXTS = ["a fine, moving film", "terrible, boring and far too long", "it is what it is"]
MAX_LENGTH = 16
RTOL = 1e-5  # the bound: float32, same torch build on both sides

# case -> (adapters [(name, AdapterHub config)], fused?, AdapterHub setup (peer JSON), deltatune setup)
# AdapterHub 1.3 crashes when a child of Parallel or BatchSplit (or a block's first adapter) is absent from a
# layer that holds another (KeyError, or torch.cat of None in pad_and_concat): those cases use Houlsby pairs
SERIAL_PAIR = [("a", "double_seq_bn"), ("b", "seq_bn")]
HOULSBY_PAIR = [("a", "double_seq_bn"), ("b", "double_seq_bn")]
CASES = {
    "houlsby": ([("a", "double_seq_bn")], False, "a", "a"),
    "pfeiffer": ([("a", "seq_bn")], False, "a", "a"),
    "par_bn": ([("a", "par_bn")], False, "a", "a"),
    "scaled_par_bn": ([("a", "scaled_par_bn")], False, "a", "a"),
    "compacter": ([("a", "compacter")], False, "a", "a"),
    "compacter++": ([("a", "compacter++")], False, "a", "a"),
    "leave_out": ([("a", {"base": "seq_bn", "leave_out": [1, 4], "reduction_factor": 8, "non_linearity": "gelu"})],
                  False, "a", "a"),
    "stack": (SERIAL_PAIR, False, {"Stack": ["a", "b"]}, dt.Stack("a", "b")),
    "fuse": ([("a", "seq_bn"), ("b", "seq_bn")], True, {"Fuse": ["a", "b"]}, dt.Fuse("a", "b")),
    "parallel": (HOULSBY_PAIR, False, {"Parallel": ["a", "b"]}, dt.Parallel("a", "b")),
    # AdapterHub's Average is (1/k) Σ wᵢ outᵢ with wᵢ normalised (1/4, 3/4); deltatune's is Σ wᵢ outᵢ
    "average": ([("a", "seq_bn"), ("b", "seq_bn")], False, {"Average": ["a", "b"], "weights": [1, 3]},
                dt.Average("a", "b", weights=[1 / 8, 3 / 8], normalize_weights=False)),
    "split": (HOULSBY_PAIR, False, {"Split": ["a", "b"], "splits": [6, 10]},
              dt.Split("a", "b", splits=[6, 10])),
    "batchsplit": (HOULSBY_PAIR, False, {"BatchSplit": ["a", "b"], "batch_sizes": [1, 2]},
                   dt.BatchSplit("a", "b", batch_sizes=[1, 2])),
}


def run_peer(requests: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "requests.json").write_text(json.dumps(requests))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([str(VENV_PYTHON), str(PEER), str(out / "requests.json"), str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode:
        pytest.fail(f"adapterhub_peer.py failed ({proc.returncode}):\n{proc.stderr[-3000:]}")


@pytest.fixture(scope="session")
def adapters_venv() -> Path:
    """.venv-adapters, built by benchmarks/setup_adapters.sh when missing; a failed build FAILS (never skips)."""
    if not VENV_PYTHON.exists():
        proc = subprocess.run(["bash", str(SETUP)], capture_output=True, text=True, timeout=1200,
                              env={**os.environ, "PYTHON": os.environ.get("PYTHON", sys.executable)})
        if proc.returncode or not VENV_PYTHON.exists():
            log = (proc.stdout + proc.stderr).strip().splitlines()
            pytest.fail("benchmarks/setup_adapters.sh could not build .venv-adapters (needs the PyPI registry):\n"
                        + "\n".join(log[-25:]))
    return VENV_PYTHON


def request(case: str, **extra) -> dict:
    adapters, fused, setup, _ = CASES[case]
    req = {"id": case, "model": str(assets.minilm_path()), "texts": TEXTS, "max_length": MAX_LENGTH,
           "adapters": [{"name": n, "config": c} for n, c in adapters], "setup": setup}
    if fused:
        req["fusions"] = [{"adapters": [n for n, _ in adapters]}]
    return {**req, **extra}


@pytest.fixture(scope="session")
def forward(adapters_venv, tmp_path_factory) -> Path:
    """AdapterHub's randomised adapters (std 0.05), its outputs and its saved folders, one subfolder per case."""
    out = tmp_path_factory.mktemp("adapterhub_forward")
    run_peer([request(case, seed=i, randomize_std=0.05) for i, case in enumerate(CASES)], out)
    return out


def fresh(model_class=AutoModel):
    return model_class.from_pretrained(assets.minilm_path()).eval()


def imported(case: str, folder: Path, model_class=AutoModel) -> dt.DeltaModel:
    """The case's adapters (then fusion) imported from AdapterHub's folders, with the case's setup active."""
    adapters, fused, _, setup = CASES[case]
    dm = dt.DeltaModel(fresh(model_class))
    for name, _ in adapters:
        dm.load_adapterhub(folder / "saved" / name)
    if fused:
        dm.load_adapterhub(folder / "saved" / f"fusion.{','.join(n for n, _ in adapters)}")
    dm.set_active(setup)
    return dm


def hidden(dm: dt.DeltaModel, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return dm(**inputs, output_hidden_states=True).hidden_states[-1]


@pytest.mark.parametrize("case", CASES)
def test_import_matches_adapterhub(forward, case):
    out = forward / case
    inputs, expected = load_file(out / "inputs.safetensors"), load_file(out / "outputs.safetensors")
    dm = imported(case, out)
    got = hidden(dm, inputs)
    with dm.disabled():
        base = hidden(dm, inputs)
    assert (base - expected["last_hidden_state"]).abs().max() > 1e-2, "the adapters must change the output"
    assert_close(got, expected["last_hidden_state"], rtol=RTOL, msg=case)


@pytest.fixture(scope="session")
def reverse(forward, tmp_path_factory) -> dict:
    """deltatune moves every imported weight, exports each adapter and fusion; AdapterHub loads those folders."""
    out = tmp_path_factory.mktemp("adapterhub_reverse")
    results, requests = {}, []
    for i, case in enumerate(CASES):
        adapters, fused, _, _ = CASES[case]
        inputs = load_file(forward / case / "inputs.safetensors")
        dm = imported(case, forward / case)
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for name in dm.adapters:
                for t in dm.adapter_state_dict(name).values():
                    t.add_(torch.randn(t.shape, generator=g) * 0.05)
        names = [n for n, _ in adapters]
        for name in dm.adapters:
            dm.export_adapterhub(out / case / "export" / name, name)
        req = request(case, randomize_std=0, save_adapters=False,
                      adapters=[{"name": n, "load": str(out / case / "export" / n)} for n in names])
        if fused:
            req["fusions"] = [{"adapters": names, "load": str(out / case / "export" / ",".join(names))}]
        requests.append(req)
        results[case] = (hidden(dm, inputs), out / case)
    run_peer(requests, out)
    return results


@pytest.mark.parametrize("case", CASES)
def test_export_loads_in_adapterhub(reverse, case):
    ours, out = reverse[case]
    theirs = load_file(out / "outputs.safetensors")["last_hidden_state"]
    assert_close(theirs, ours, rtol=RTOL, msg=case)


@pytest.mark.parametrize("case", [c for c, (adapters, *_) in CASES.items() if len(adapters) == 1])
def test_round_trip_is_exact(forward, tmp_path, case):
    """Imported then exported: AdapterHub's own config and tensors, unchanged."""
    saved = forward / case / "saved" / "a"
    dm = imported(case, forward / case)
    dm.export_adapterhub(tmp_path, "a")
    ours = json.loads((tmp_path / "adapter_config.json").read_text())
    theirs = json.loads((saved / "adapter_config.json").read_text())
    assert ours["config"] == theirs["config"]
    assert {k: ours[k] for k in ("hidden_size", "model_type", "name", "version")} == \
        {k: theirs[k] for k in ("hidden_size", "model_type", "name", "version")}
    mine, orig = load_file(tmp_path / "adapter.safetensors"), load_file(saved / "adapter.safetensors")
    assert sorted(mine) == sorted(orig)
    for key in orig:
        assert torch.equal(mine[key], orig[key]), key


def test_classification_model_and_unprefixed_names(forward, tmp_path):
    """AdapterHub's `bert.`-prefixed names onto a model whose paths have it (ForSequenceClassification), and
    names without it (an adapters.init(BertModel) save) onto one whose paths lack it."""
    out = forward / "compacter"
    inputs, expected = load_file(out / "inputs.safetensors"), load_file(out / "outputs.safetensors")
    dm = imported("compacter", out, AutoModelForSequenceClassification)
    assert all(p.startswith("bert.encoder.") for p in dm.adapters["a"].paths)
    assert_close(hidden(dm, inputs), expected["last_hidden_state"], rtol=RTOL)

    shutil.copy(out / "saved" / "a" / "adapter_config.json", tmp_path)
    tensors = load_file(out / "saved" / "a" / "adapter.safetensors")
    save_file({k.removeprefix("bert."): v for k, v in tensors.items()}, tmp_path / "adapter.safetensors")
    assert not any(k.startswith("bert.") for k in load_file(tmp_path / "adapter.safetensors"))
    dm = dt.load_adapterhub(fresh(), tmp_path)
    assert_close(hidden(dm, inputs), expected["last_hidden_state"], rtol=RTOL)


def copy_saved(forward, tmp_path, case="pfeiffer") -> Path:
    folder = tmp_path / "a"
    shutil.copytree(forward / case / "saved" / "a", folder)
    return folder


def edit_config(folder: Path, **changes) -> None:
    meta = json.loads((folder / "adapter_config.json").read_text())
    meta["config"].update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("changes, message", [
    ({"ln_after": True}, r"ln_after=True \(a trainable LayerNorm on the adapter's output\), which deltatune does not"),
    ({"use_gating": True}, r"use_gating=True .*only use_gating=False imports"),
    ({"adapter_residual_before_ln": True}, r"adapter_residual_before_ln=True"),
    ({"architecture": "prefix_tuning"}, r"is a 'prefix_tuning' adapter; deltatune imports AdapterHub's bottleneck"),
    ({"reduction_factor": {"default": 16, "3": 8}}, r"per-layer reduction factors"),
    ({"flux": 1}, r"sets \['flux'\], which AdapterHub 1.3's BnConfig does not have"),
])
def test_bad_configs_are_refused(forward, tmp_path, changes, message):
    folder = copy_saved(forward, tmp_path)
    edit_config(folder, **changes)
    model = fresh()
    with pytest.raises(ValueError, match=message):
        dt.load_adapterhub(model, folder)
    assert not any(isinstance(m, DeltaLayer) for m in model.modules()), "a refused import leaves the model alone"


@pytest.mark.parametrize("with_config", [True, False])
def test_pickled_adapter_is_refused(forward, tmp_path, with_config):
    """AdapterHub's default save (use_safetensors=False) is a pickle: refused, never loaded, with the re-save."""
    folder = copy_saved(forward, tmp_path)
    tensors = load_file(folder / "adapter.safetensors")
    (folder / "adapter.safetensors").unlink()
    if not with_config:
        (folder / "adapter_config.json").unlink()
    torch.save(tensors, folder / "pytorch_adapter.bin")
    with pytest.raises(ValueError, match=r"pytorch_adapter\.bin' is a pickle, which deltatune never loads.*"
                       r"save_adapter\(dir, name, use_safetensors=True\)"):
        dt.load_adapterhub(fresh(), folder)


def test_pickled_fusion_is_refused(forward, tmp_path):
    folder = tmp_path / "fusion"
    shutil.copytree(forward / "fuse" / "saved" / "fusion.a,b", folder)
    torch.save(load_file(folder / "model_adapter_fusion.safetensors"), folder / "pytorch_model_adapter_fusion.bin")
    (folder / "model_adapter_fusion.safetensors").unlink()
    dm = imported("pfeiffer", forward / "pfeiffer")
    with pytest.raises(ValueError, match=r"pytorch_model_adapter_fusion\.bin' is a pickle.*save_adapter_fusion"):
        dm.load_adapterhub(folder)


def test_fusion_needs_its_adapters_first(forward):
    with pytest.raises(ValueError, match=r"fuses \['a', 'b'\], and \['b'\] are not loaded: import their adapter"):
        imported("pfeiffer", forward / "pfeiffer").load_adapterhub(forward / "fuse" / "saved" / "fusion.a,b")


@pytest.mark.parametrize("version, given, expected", [(False, "gelu", "gelu_new"), (False, "gelu_orig", "gelu"),
                                                      (True, "gelu", "gelu")])
def test_old_configs_rename_gelu(forward, tmp_path, version, given, expected):
    """adapter-transformers v1/v2 configs (no "version") meant tanh GELU by 'gelu', as AdapterHub reads them."""
    folder = copy_saved(forward, tmp_path)
    edit_config(folder, non_linearity=given)
    if not version:
        meta = json.loads((folder / "adapter_config.json").read_text())
        del meta["version"]
        (folder / "adapter_config.json").write_text(json.dumps(meta))
    dm = dt.load_adapterhub(fresh(), folder)
    assert dm.adapters["a"].config.non_linearity == expected


def test_head_files_are_reported(forward, tmp_path):
    folder = copy_saved(forward, tmp_path)
    (folder / "head_config.json").write_text("{}")
    with pytest.warns(UserWarning, match=r"also holds an AdapterHub prediction head \(head_config\.json\)"):
        dt.load_adapterhub(fresh(), folder)


def test_export_refuses_what_adapterhub_cannot_hold(tmp_path):
    dm = dt.inject(fresh(), dt.LoRAConfig(r=4, targets=["query"]), name="lora")
    with pytest.raises(ValueError, match=r"adapter 'lora' is lora; AdapterHub export covers houlsby"):
        dm.export_adapterhub(tmp_path / "lora", "lora")
    dm.add_adapter("uneven", dt.make_config("houlsby", targets=[r"re:encoder\.layer\.[0-2]\.attention\.output",
                                                                 r"re:encoder\.layer\.[0-3]\.output"]))
    with pytest.raises(ValueError, match=r"covers different blocks after attention and after the FFN"):
        dm.export_adapterhub(tmp_path / "uneven", "uneven")
    dm.add_adapter("query", dt.make_config("pfeiffer", targets=["attention.self.query"], site="module"))
    with pytest.raises(ValueError, match=r"AdapterHub places bottleneck adapters only at"):
        dm.export_adapterhub(tmp_path / "query", "query")


def test_adapterhub_folder_given_to_load_peft(forward):
    """AdapterHub and PEFT both name their config adapter_config.json: the PEFT loader points to the right one."""
    with pytest.raises(ValueError, match=r"is an AdapterHub adapter config, not PEFT's: use dt.load_adapterhub"):
        dt.load_peft(fresh(), forward / "pfeiffer" / "saved" / "a")
