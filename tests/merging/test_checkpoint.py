"""Out-of-core checkpoint IO: sharded round trips, the streamed writer's format, atomic output, low memory."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from deltatune.merging.checkpoint import (
    INDEX_NAME,
    WEIGHTS_NAME,
    CheckpointReader,
    ShardWriter,
    TensorSpec,
    copy_model_files,
    output_folder,
    parse_size,
    plan_shards,
    save_checkpoint,
)


def mixed_state() -> dict[str, torch.Tensor]:
    """Every dtype family and shape edge the writer must lay out: 0-d, empty, bool, ints, half types."""
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(6, 5, generator=g),
        "half": torch.randn(7, generator=g).half(),
        "bf16": torch.randn(3, 3, generator=g).bfloat16(),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "mask": torch.tensor([True, False, True]),
        "ids": torch.arange(9),
        "f64": torch.randn(2, generator=g).double(),
    }


def shard_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.safetensors"))


def test_hf_sharded_checkpoint_reads_back_tensor_by_tensor(tiny_llama, tmp_path) -> None:
    tiny_llama.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / INDEX_NAME).is_file() and len(shard_files(tmp_path)) > 2
    reader = CheckpointReader(tmp_path)
    state = tiny_llama.state_dict()
    assert set(reader.keys()) == set(state)
    for name in reader.keys():
        assert reader.specs[name] == TensorSpec(name, state[name].dtype, tuple(state[name].shape))
        assert torch.equal(reader.read(name), state[name])
    assert reader.nbytes == sum(t.numel() * t.element_size() for t in state.values())


def test_single_file_and_bare_safetensors_are_read(tmp_path) -> None:
    state = mixed_state()
    save_file(state, str(tmp_path / WEIGHTS_NAME))
    for path in (tmp_path, tmp_path / WEIGHTS_NAME):
        reader = CheckpointReader(path)
        for k, v in state.items():
            assert torch.equal(reader.read(k), v) and reader.read(k).dtype == v.dtype


@pytest.mark.parametrize("max_shard_size", [1, 60, 10**9])
def test_written_shards_are_valid_safetensors(tmp_path, max_shard_size: int) -> None:
    state = mixed_state()
    save_checkpoint(tmp_path, state, max_shard_size)
    files = shard_files(tmp_path)
    loaded = {k: v for f in files for k, v in load_file(str(tmp_path / f)).items()}  # the reference reader
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[k], v) and loaded[k].dtype == v.dtype for k, v in state.items())
    if len(files) == 1:
        assert files == [WEIGHTS_NAME] and not (tmp_path / INDEX_NAME).exists()
    else:
        index = json.loads((tmp_path / INDEX_NAME).read_text())
        assert files == [f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)]
        assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in state.values())
        assert all(k in load_file(str(tmp_path / f)) for k, f in index["weight_map"].items())
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind


def test_plan_fills_shards_in_order_up_to_the_limit() -> None:
    sizes = [10, 10, 30, 5, 5, 5]  # float32 entries: 4 bytes each
    specs = [TensorSpec(f"t{i}", torch.float32, (n,)) for i, n in enumerate(sizes)]
    shards = plan_shards(specs, 80)
    assert [[s.name for s in shard] for shard in shards] == [["t0", "t1"], ["t2"], ["t3", "t4", "t5"]]
    assert [s for shard in shards for s in shard] == specs
    assert plan_shards(specs, 1) == [[s] for s in specs]  # a tensor above the limit gets a shard of its own


def test_model_from_the_writer_loads_with_transformers(tiny_llama, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    tiny_llama.save_pretrained(tmp_path / "src")
    state = {k: v + 1 for k, v in tiny_llama.state_dict().items()}
    out = tmp_path / "out"
    with output_folder(out) as tmp:
        save_checkpoint(tmp, state, "30KB")
        copy_model_files(tmp_path / "src", tmp)
    reloaded = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert len(shard_files(out)) > 1
    assert all(torch.equal(reloaded[k], v) for k, v in state.items())


def test_tensors_stream_in_row_blocks(tmp_path) -> None:
    """A tensor written in consecutive row blocks is the same bytes as written whole; blocks read back."""
    state = mixed_state()
    specs = [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in state.items()]
    with ShardWriter(tmp_path, specs, 100) as writer:
        for name, tensor in state.items():
            blocks = torch.split(tensor, 2) if tensor.dim() and len(tensor) > 2 else [tensor]
            for block in blocks:
                writer.write(name, block)
    reader = CheckpointReader(tmp_path)
    assert all(torch.equal(reader.read(k), v) for k, v in state.items())
    assert torch.equal(reader.read("w", slice(1, 4)), state["w"][1:4])


@pytest.mark.parametrize("blocks, message", [
    ([torch.zeros(2, 3), torch.zeros(2, 3)], r"expected tensor 'a' torch.float32 \(3, 3\) from row 2 next"),
    ([torch.zeros(2, 4)], r"got 'a' torch.float32 \(2, 4\)"),
    ([torch.zeros(1, 3), ("b", torch.zeros(2))], r"expected tensor 'a' .* from row 1 next, got 'b'"),
])
def test_row_blocks_must_continue_the_tensor(tmp_path, blocks, message) -> None:
    specs = [TensorSpec("a", torch.float32, (3, 3)), TensorSpec("b", torch.float32, (2,))]
    with pytest.raises(ValueError, match=message):
        with ShardWriter(tmp_path, specs, "1GB") as writer:
            for block in blocks:
                writer.write(*(block if isinstance(block, tuple) else ("a", block)))
    assert list(tmp_path.iterdir()) == []


def test_writer_rejects_tensors_out_of_plan(tmp_path) -> None:
    specs = [TensorSpec("a", torch.float32, (2,)), TensorSpec("b", torch.float32, (3,))]
    with pytest.raises(ValueError, match="expected tensor 'a'"):
        with ShardWriter(tmp_path, specs, "1GB") as w:
            w.write("b", torch.zeros(3))
    with pytest.raises(ValueError, match=r"expected tensor 'a' torch.float32 \(2,\)"):
        with ShardWriter(tmp_path, specs, "1GB") as w:
            w.write("a", torch.zeros(2, dtype=torch.float16))
    with pytest.raises(ValueError, match="never written"):
        with ShardWriter(tmp_path, specs, "1GB") as w:
            w.write("a", torch.zeros(2))
    assert list(tmp_path.iterdir()) == []  # a failed write leaves neither a shard nor a temporary file


def test_output_folder_is_atomic_and_refuses_to_clobber(tmp_path) -> None:
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with output_folder(out) as tmp:
            (tmp / "x").write_text("partial")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []  # nothing published, temp folder gone
    with output_folder(out) as tmp:
        (tmp / "x").write_text("first")
    with pytest.raises(ValueError, match="not empty; choose a new folder or set output.overwrite=true"):
        with output_folder(out):
            pass
    with output_folder(out, overwrite=True) as tmp:
        (tmp / "y").write_text("second")
    assert sorted(p.name for p in out.iterdir()) == ["y"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_copy_model_files_takes_configs_not_weights_and_records_dtype(tiny_llama, tmp_path) -> None:
    tiny_llama.save_pretrained(tmp_path / "src", max_shard_size="20KB")
    (tmp_path / "src" / "tokenizer.json").write_text("{}")
    (tmp_path / "dst").mkdir()
    copied = copy_model_files(tmp_path / "src", tmp_path / "dst", torch.bfloat16)
    assert "config.json" in copied and "tokenizer.json" in copied and INDEX_NAME not in copied
    assert not any(name.endswith(".safetensors") for name in copied)
    config = json.loads((tmp_path / "dst" / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"


@pytest.mark.parametrize("size, expected", [(1000, 1000), ("2GB", 2 * 10**9), ("500MiB", 500 * 2**20),
                                            ("1.5kb", 1500), ("7", 7)])
def test_parse_size(size, expected) -> None:
    assert parse_size(size) == expected


@pytest.mark.parametrize("size", ["2XB", "-1", 0, "GB"])
def test_parse_size_rejects_nonsense(size) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size(size)


def test_missing_or_pickled_checkpoints_are_explained(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="expected model.safetensors or model.safetensors.index.json"):
        CheckpointReader(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="reads only safetensors"):
        CheckpointReader(tmp_path)


def test_reader_keeps_no_shard_mapped(tmp_path) -> None:
    """An open safetensors handle keeps every page it touched resident; the reader must not keep one."""
    save_checkpoint(tmp_path, {f"t{i}": torch.randn(256, 256) for i in range(6)}, "600KB")
    reader = CheckpointReader(tmp_path)
    for name in reader.keys():
        reader.read(name).sum()
    gc.collect()
    maps = Path("/proc/self/maps").read_text() if Path("/proc/self/maps").exists() else ""
    assert str(tmp_path) not in maps


def test_writer_holds_no_written_tensor(tmp_path) -> None:
    """Streaming: a tensor is on disk when write() returns, so nothing keeps it alive (no shard in memory)."""
    specs = [TensorSpec(f"t{i}", torch.float32, (64, 64)) for i in range(4)]
    refs = []
    with ShardWriter(tmp_path, specs, "1GB") as writer:
        for spec in specs:
            tensor = torch.randn(spec.shape)
            refs.append(weakref.ref(tensor))
            writer.write(spec.name, tensor)
            del tensor
            assert refs[-1]() is None
    assert len(load_file(str(tmp_path / WEIGHTS_NAME))) == 4


PEAK_SCRIPT = """
import sys, torch, yaml
from deltatune.merging import run
from deltatune.merging.config import validate_merge_config

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

config = validate_merge_config(yaml.safe_load(sys.argv[1]))
run.CHUNK_BYTES = int(sys.argv[2])
x = torch.randn(512, 512)
(x.abs().argsort().float() * x).sum()  # torch's one-off kernel and thread-pool setup is not the merge's
del x
before = rss("VmRSS:")
run.run_merge(config, progress=False)
print(rss("VmHWM:") - before)
"""


def peak_growth(folders: dict[str, Path], out: Path, chunk_bytes: int) -> int:
    """Peak RSS growth of a task-arithmetic merge of a, b, c onto base, run in a fresh interpreter."""
    config = {"method": "task_arithmetic", "base_model": str(folders["base"]),
              "models": [{"path": str(folders[m])} for m in "abc"], "output": {"path": str(out)}}
    script = textwrap.dedent(PEAK_SCRIPT)
    done = subprocess.run([sys.executable, "-c", script, json.dumps(config), str(chunk_bytes)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.strip().splitlines()[-1])


def checkpoints(root: Path, shapes: dict[str, tuple[int, ...]]) -> dict[str, Path]:
    g = torch.Generator().manual_seed(0)
    for model in ("base", "a", "b", "c"):
        save_checkpoint(root / model, {n: torch.randn(s, generator=g) for n, s in shapes.items()}, "1GB")
        (root / model / "config.json").write_text("{}")
    return {model: root / model for model in ("base", "a", "b", "c")}


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads peak RSS from /proc")
def test_merge_peak_memory_stays_below_one_model(tmp_path) -> None:
    """3 checkpoints of 64 x 1 MiB: a few tensors at a time, so peak growth stays below one model.

    Holding the output shard (64 MiB) or keeping the input shards mapped (4 x 64 MiB) would each exceed it;
    the merge of one tensor needs ~10 MiB (inputs, task vectors, sums).
    """
    folders = checkpoints(tmp_path, {f"layers.{i}.weight": (256, 1024) for i in range(64)})
    growth, model_bytes = peak_growth(folders, tmp_path / "out", 2**24), 64 * 2**20
    assert growth < model_bytes, f"peak grew {growth / 2**20:.0f} MiB for a 64 MiB model"
    assert CheckpointReader(tmp_path / "out").nbytes == model_bytes


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads peak RSS from /proc")
def test_entrywise_merge_of_a_large_tensor_stays_below_the_tensor(tmp_path) -> None:
    """One 64 MiB tensor merged in 1 MiB row blocks: peak growth (~30 MiB: blocks and their temporaries, plus
    one-off allocations) stays below the tensor itself; merged whole, its four inputs and the task vectors
    would take ~10x that. (That blocks give the same result is tested in test_merge_cli.)"""
    folders = checkpoints(tmp_path, {"embed.weight": (16384, 1024), "norm.weight": (1024,)})
    growth = peak_growth(folders, tmp_path / "out", 2**20)
    assert growth < 64 * 2**20, f"peak grew {growth / 2**20:.0f} MiB for a 64 MiB tensor"
    assert CheckpointReader(tmp_path / "out").nbytes == (16384 + 1) * 1024 * 4
