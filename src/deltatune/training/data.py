"""Training records from CSV/JSONL files or built-in datasets, with a seeded train/eval split."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from deltatune import assets
from deltatune.engine.registry import did_you_mean


def reuters_rows(topic: str) -> list[dict]:
    """Both Reuters splits as one table (train rows first), so a recipe's eval_size holds out rows as for any source."""
    splits = assets.reuters(topic)
    return splits["train"] + splits["test"]


BUILTIN_DATASETS: dict[str, Callable[[], list[dict]]] = {
    "rotten_tomatoes": assets.rotten_tomatoes,
    "chatterbot": assets.chatterbot,
    "reuters_grain": functools.partial(reuters_rows, "grain"),  # 2,158 stories, 160 about grain
    "reuters_corn": functools.partial(reuters_rows, "corn"),  # the same stories, 69 about corn
}


@dataclass(frozen=True)
class Splits:
    """Train and eval records, plus the label names (index = int label) for classification data."""

    train: list[dict]
    eval: list[dict]
    label_names: list[str] | None = None


def read_table(source: str, encoding: str = "utf-8") -> list[dict]:
    """Rows of a built-in dataset (by name) or of a .csv / .jsonl file in `encoding`."""
    if source in BUILTIN_DATASETS:
        return BUILTIN_DATASETS[source]()
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"data source {source!r} is neither a file nor a built-in dataset ({', '.join(BUILTIN_DATASETS)})"
        )
    suffixes = path.suffixes
    if ".jsonl" not in suffixes and ".csv" not in suffixes:
        raise ValueError(f"unsupported data file {path.name!r}: expected .csv or .jsonl")
    try:
        if ".jsonl" in suffixes:
            return _read_jsonl(path, encoding)
        # also .csv.gz / .csv.bz2: pandas infers the compression;
        # keep_default_na=False: an empty cell stays "" instead of becoming a float NaN
        return pd.read_csv(path, keep_default_na=False, encoding=encoding).to_dict("records")
    except UnicodeDecodeError:
        raise ValueError(f"data file {str(path)!r} is not valid {encoding} ({_first_bad_byte(path, encoding)}): "
                         "set data.encoding to its encoding (e.g. data.encoding=latin-1) or save it as UTF-8") from None
    except pd.errors.EmptyDataError:
        raise ValueError(f"data file {str(path)!r} is empty: a CSV needs a header line naming its columns, "
                         "then one row per example") from None
    except pd.errors.ParserError as e:
        raise ValueError(f"data file {str(path)!r} is not a valid CSV: {str(e).strip()}") from None


def _first_bad_byte(path: Path, encoding: str) -> str:
    """Where `path` first fails to decode, as 'byte 0xe9 on line 2' (pandas reports offsets within its chunks)."""
    if path.suffix in (".csv", ".jsonl"):  # not compressed: the bytes on disk are the text
        raw = path.read_bytes()
        try:
            raw.decode(encoding)
        except UnicodeDecodeError as e:
            line = raw.count(b"\n", 0, e.start) + 1
            return f"byte {raw[e.start]:#04x} on line {line}"
    return "after decompression"


def _read_jsonl(path: Path, encoding: str = "utf-8") -> list[dict]:
    """One JSON object per non-blank line."""
    rows = []
    for lineno, line in enumerate(path.read_text(encoding=encoding).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path.name}:{lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path.name}:{lineno}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def select_columns(rows: list[dict], columns: dict[str, str], source: str) -> list[dict]:
    """Rename `columns` (field -> column in the data) to their fields, failing clearly on a missing one."""
    if not rows:
        raise ValueError(f"data source {source!r} has no rows")
    present = list(dict.fromkeys(key for row in rows for key in row))
    for field, column in columns.items():
        if column not in present:
            raise ValueError(f"column {column!r} (the {field} column) not found in {source!r}, "
                             f"which has columns {present}{did_you_mean(column, present)}")
        lacking = next((i for i, row in enumerate(rows) if column not in row), None)
        if lacking is not None:
            raise ValueError(f"row {lacking} of {source!r} has no column {column!r} (the {field} column)")
    return [{field: row[column] for field, column in columns.items()} for row in rows]


def encode_labels(
    rows: list[dict], names: list[str] | None = None, where: str = "the data"
) -> tuple[list[dict], list[str]]:
    """Int labels and their names: given `names` fix the order, else strings are sorted and ints 0..K-1 name
    themselves. Labels that cannot be classes (floats, sparse ints, a single class) are refused."""
    labels = {row["label"] for row in rows}
    fix = "set model.labels to the class names in order, or data.label_column to the column with the classes"
    if names is None:
        if floats := sorted(y for y in labels if isinstance(y, float)):
            raise ValueError(f"labels in {where} are floats ({', '.join(map(str, floats[:4]))}): classification "
                             f"needs int or string classes: map them to classes, or {fix}")
        if len(labels) < 2:
            raise ValueError(f"labels in {where} hold a single class ({next(iter(labels), None)!r}): classification "
                             f"needs at least 2: {fix}")
    if names is None and all(isinstance(y, (int, np.integer)) and not isinstance(y, bool) for y in labels):
        ints = sorted(int(y) for y in labels)
        if ints != list(range(len(ints))):
            shown = ", ".join(map(str, ints[:4])) + (", ..." if len(ints) > 4 else "")
            raise ValueError(f"integer labels in {where} must be 0..K-1 for K classes, got {{{shown}}} "
                             f"({len(ints)} distinct): remap them, or set model.labels to their names in order, "
                             f"e.g. model.labels={[str(i) for i in ints[:3]]}")
        return [{**row, "label": int(row["label"])} for row in rows], [str(i) for i in ints]
    names = names if names is not None else sorted({str(y) for y in labels})
    index = {name: i for i, name in enumerate(names)}
    if unknown := sorted({str(y) for y in labels} - index.keys()):
        raise ValueError(f"labels {unknown} are not among the label names {names}")
    return [{**row, "label": index[str(row["label"])]} for row in rows], names


def split(rows: list[dict], eval_size: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Seeded shuffle, then the first `eval_size` rows (a count, or a fraction when < 1) are held out."""
    n_eval = round(eval_size * len(rows)) if eval_size < 1 else int(eval_size)
    if not 0 < n_eval < len(rows):
        raise ValueError(f"eval_size {eval_size} leaves no train or no eval rows out of {len(rows)}")
    order = np.random.default_rng(seed).permutation(len(rows))
    shuffled = [rows[i] for i in order]
    return shuffled[n_eval:], shuffled[:n_eval]


def load_splits(
    source: str,
    columns: dict[str, str],
    eval_size: float,
    seed: int = 0,
    max_train: int | None = None,
    max_eval: int | None = None,
    label_names: list[str] | None = None,
    encoding: str = "utf-8",
) -> Splits:
    """Read `source`, keep and rename `columns`, map labels to ints (when there are any), split, subsample."""
    rows = select_columns(read_table(source, encoding), columns, source)
    if "label" in columns:
        rows, label_names = encode_labels(rows, label_names, f"column {columns['label']!r} of {source!r}")
    train, held_out = split(rows, eval_size, seed)
    # the split is already shuffled, so a prefix is a seeded random subsample
    return Splits(train[:max_train], held_out[:max_eval], label_names)
