"""Data loading: files and built-ins, column errors, labels, the seeded split."""

from __future__ import annotations

import json

import pytest

from deltatune.training.data import encode_labels, load_splits, read_table, select_columns, split

CLASSIFICATION = {"text": "review", "label": "sentiment"}


@pytest.fixture
def csv_file(tmp_path):
    path = tmp_path / "reviews.csv"
    rows = [f"review number {i},{'pos' if i % 3 else 'neg'}" for i in range(30)]
    path.write_text("review,sentiment\n" + "\n".join(rows) + "\n")
    return path


@pytest.fixture
def jsonl_file(tmp_path):
    path = tmp_path / "chat.jsonl"
    rows = [{"question": f"q{i}", "answer": f"a{i}", "extra": i} for i in range(10)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")  # a trailing blank line is fine
    return path


def test_csv_rows_are_renamed_and_string_labels_numbered_in_sorted_order(csv_file):
    splits = load_splits(str(csv_file), CLASSIFICATION, eval_size=0.2)
    assert splits.label_names == ["neg", "pos"]
    assert len(splits.train) == 24 and len(splits.eval) == 6
    row = splits.train[0]
    assert set(row) == {"text", "label"}
    assert row["label"] == (0 if int(row["text"].split()[-1]) % 3 == 0 else 1)


def test_jsonl_rows_keep_only_the_asked_columns(jsonl_file):
    splits = load_splits(str(jsonl_file), {"prompt": "question", "response": "answer"}, eval_size=2)
    assert splits.label_names is None
    assert len(splits.eval) == 2
    assert all(set(r) == {"prompt", "response"} and r["response"] == "a" + r["prompt"][1:] for r in splits.train)


def test_missing_column_names_the_columns_present_and_the_closest(csv_file):
    with pytest.raises(ValueError) as e:
        load_splits(str(csv_file), {"text": "reviews", "label": "sentiment"}, eval_size=5)
    message = str(e.value)
    assert "'reviews'" in message and "['review', 'sentiment']" in message and "did you mean 'review'?" in message


def test_missing_column_without_a_close_match_has_no_suggestion(jsonl_file):
    with pytest.raises(ValueError, match="column 'zzz' \\(the prompt column\\)") as e:
        select_columns(read_table(str(jsonl_file)), {"prompt": "zzz"}, "chat.jsonl")
    assert "did you mean" not in str(e.value)


def test_a_row_lacking_a_column_is_named():
    rows = [{"text": "a", "label": 1}, {"text": "b"}]
    with pytest.raises(ValueError, match="row 1 .* has no column 'label'"):
        select_columns(rows, {"text": "text", "label": "label"}, "inline")


def test_missing_file_and_unknown_format_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a file nor a built-in dataset"):
        read_table(str(tmp_path / "nope.csv"))
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(ValueError, match="expected .csv or .jsonl"):
        read_table(str(tmp_path / "data.txt"))


def test_bad_jsonl_line_is_reported_with_its_number(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(ValueError, match="bad.jsonl:2: invalid JSON"):
        read_table(str(path))


def test_split_is_seeded_disjoint_and_complete():
    rows = [{"i": i} for i in range(100)]
    train, held = split(rows, 0.25, seed=3)
    again_train, again_held = split(rows, 0.25, seed=3)
    other_train, _ = split(rows, 0.25, seed=4)
    assert (train, held) == (again_train, again_held)
    assert train != other_train
    assert len(held) == 25 and sorted(r["i"] for r in train + held) == list(range(100))


def test_eval_size_must_leave_rows_on_both_sides():
    with pytest.raises(ValueError, match="leaves no train or no eval rows"):
        split([{"i": i} for i in range(10)], 10, seed=0)


def test_subsampling_takes_seeded_prefixes(csv_file):
    full = load_splits(str(csv_file), CLASSIFICATION, eval_size=10, seed=1)
    small = load_splits(str(csv_file), CLASSIFICATION, eval_size=10, seed=1, max_train=5, max_eval=3)
    assert small.train == full.train[:5] and small.eval == full.eval[:3]


def test_int_labels_name_themselves_and_given_names_fix_the_order():
    rows, names = encode_labels([{"label": 2}, {"label": 0}, {"label": 1}])
    assert names == ["0", "1", "2"] and [r["label"] for r in rows] == [2, 0, 1]
    with pytest.raises(ValueError, match=r"must be 0..K-1 for K classes, got \{0, 2\}"):
        encode_labels([{"label": 2}, {"label": 0}])  # class 1 absent: the head's size must be said
    rows, names = encode_labels([{"label": 2}, {"label": 0}], names=["0", "1", "2"])
    assert [r["label"] for r in rows] == [2, 0]
    rows, names = encode_labels([{"label": "pos"}, {"label": "neg"}], names=["pos", "neg"])
    assert [r["label"] for r in rows] == [0, 1]
    with pytest.raises(ValueError, match="not among the label names"):
        encode_labels([{"label": "meh"}], names=["pos", "neg"])


def test_builtin_datasets_load_by_name():
    splits = load_splits("rotten_tomatoes", {"text": "text", "label": "label"}, eval_size=1000, max_train=50)
    assert len(splits.eval) == 1000 and len(splits.train) == 50
    assert splits.label_names == ["0", "1"]
    chat = load_splits("chatterbot", {"prompt": "prompt", "response": "response"}, eval_size=0.1)
    assert all(isinstance(r["prompt"], str) and isinstance(r["response"], str) for r in chat.train)
