"""Training runs never lose data: the run folder (ownership, --resume / --overwrite, one writer at a time),
resume validation, and one table of bad training input -> the one-line error the user gets."""

from __future__ import annotations

import json
import logging
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_cli import run
from test_training import TINY

import deltatune
from deltatune.training import rundir
from deltatune.training.loop import Trainer
from deltatune.training.recipe import load_recipe

SRC = Path(deltatune.__file__).resolve().parents[1]
SHORT = [*TINY, "train.steps=6", "train.eval_every=null"]  # checkpoints at steps 3 and 6


def trainer(out: Path, *extra: str, resume: bool = False, overwrite: bool = False) -> Trainer:
    t = Trainer(load_recipe(None, [*SHORT, *extra, f"train.output_dir={out}"]), resume=resume, overwrite=overwrite)
    t.setup()
    return t


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished SHORT run (checkpoints 3 and 6, metrics, adapter); copy it before changing it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    trainer(out).train()
    return out


def copy_of(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(run, out)
    return out


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- the run folder: whose files, --resume / --overwrite ------------------------------------------------
def test_a_folder_with_foreign_files_is_refused_even_with_overwrite(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "model.bin").write_bytes(b"not deltatune's")
    (tmp_path / "metrics.jsonl").write_text('{"mine": 1}\n')
    before = snapshot(tmp_path)
    for flags in ([], ["--overwrite"], ["--resume"]):
        code, _, err = run("train", *SHORT, f"train.output_dir={tmp_path}", *flags)
        assert code == 2 and "not a deltatune run" in err and "checkpoints, metrics.jsonl, notes.txt" in err, err
    assert snapshot(tmp_path) == before


def test_foreign_files_inside_a_run_are_refused_and_kept(finished, tmp_path):
    out = copy_of(finished, tmp_path)
    (out / "checkpoints" / "best.pt").write_bytes(b"user's")
    (out / "adapter" / "README.md").write_text("notes")
    code, _, err = run("train", *SHORT, f"train.output_dir={out}", "--overwrite")
    assert code == 2 and "files deltatune did not write: adapter/README.md, checkpoints/best.pt" in err
    assert (out / "checkpoints" / "best.pt").is_file() and (out / "checkpoints" / "ckpt-6").is_dir()


def test_an_earlier_run_is_refused_without_resume_or_overwrite(finished, tmp_path):
    out = copy_of(finished, tmp_path)
    before = snapshot(out)
    code, _, err = run("train", *SHORT, f"train.output_dir={out}")
    assert code == 2 and "already holds a deltatune run: pass --resume to continue it, --overwrite" in err
    code, _, err = run("train", *SHORT, "optimizer.lr=0.01", f"train.output_dir={out}")
    assert code == 2 and "run of a different recipe (changed: optimizer.lr): pass --resume" in err
    assert snapshot(out) == before


def test_overwrite_replaces_only_deltatunes_files(finished, tmp_path):
    out = copy_of(finished, tmp_path)
    (out / "checkpoints" / "ckpt-99").mkdir()  # would be resumed from if it survived
    t = trainer(out, "train.steps=2", "train.save_every=2", "train.keep_checkpoints=1", overwrite=True)
    t.train()
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "checkpoints", "deltatune_run.json", "metrics.jsonl"]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["ckpt-2"]
    assert max(json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()) == 2


def test_what_a_killed_atomic_write_leaves_is_deltatunes(finished, tmp_path):
    out = copy_of(finished, tmp_path)
    (out / ".metrics.jsonl.k2x_9q.tmp").write_text('{"step": 1')  # killed inside atomic_write_text
    (out / "adapter" / ".adapter.safetensors.a8b7.tmp").write_bytes(b"half")
    resumed = trainer(out, resume=True)
    resumed.close()
    assert resumed.step == 6 and not (out / ".metrics.jsonl.k2x_9q.tmp").exists()


def test_a_run_killed_while_writing_its_first_marker_starts_again(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".deltatune_run.json.x7k2.tmp").write_text('{"recipe": ')  # killed inside the marker's first write
    t = trainer(out, "train.steps=1", resume=True)
    t.train()
    assert not list(out.glob(".*.tmp")) and (out / rundir.MARKER).is_file()
    (out / "notes.txt").write_text("mine")  # anything else is still the user's, and refused
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a deltatune run"):
        trainer(other, "train.steps=1")


def test_an_unreadable_run_marker_needs_overwrite(finished, tmp_path):
    out = copy_of(finished, tmp_path)
    (out / rundir.MARKER).write_text("{")
    code, _, err = run("train", *SHORT, f"train.output_dir={out}", "--resume")
    assert code == 2 and "whose deltatune_run.json is unreadable" in err and "--overwrite to replace it" in err
    trainer(out, "train.steps=1", overwrite=True).close()
    assert json.loads((out / rundir.MARKER).read_text())["recipe"]["train"]["steps"] == 1


def test_resume_and_overwrite_together_are_refused(tmp_path):
    code, _, err = run("train", *SHORT, f"train.output_dir={tmp_path}", "--resume", "--overwrite")
    assert code == 2 and "pass one" in err


def test_a_copied_run_folder_resumes_where_it_stopped(finished, tmp_path):
    out = copy_of(finished, tmp_path)  # its recipe still names the old train.output_dir
    resumed = trainer(out, resume=True)
    resumed.close()
    assert resumed.step == 6


def test_resuming_a_finished_run_logs_its_final_eval_once(finished, tmp_path):
    out = copy_of(finished, tmp_path)
    rows = (out / "metrics.jsonl").read_text().splitlines()
    for _ in range(2):
        trainer(out, resume=True).train()  # from ckpt-6, the last step: only the final eval runs again
    again = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in again] == [json.loads(r)["step"] for r in rows]
    assert [json.loads(r).get("eval_loss") for r in again] == [json.loads(r).get("eval_loss") for r in rows]


def test_a_run_that_fails_before_writing_leaves_no_folder(tmp_path):
    out = tmp_path / "new"
    code, _, err = run("train", *SHORT, "data.text_column=txt", f"train.output_dir={out}")
    assert code == 2 and "column 'txt'" in err
    assert not out.exists()


# --- one writer per run folder ---------------------------------------------------------------------
HOLDER = """
import sys, time
from deltatune.training.rundir import RunLock
RunLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(120)
"""


def test_a_second_writer_is_refused_and_a_dead_owners_lock_taken_over(tmp_path, caplog):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              env={"PYTHONPATH": str(SRC), "PATH": ""})
    try:
        assert holder.stdout.readline() == "held\n"
        code, _, err = run("train", *SHORT, f"train.output_dir={tmp_path}")
        assert code == 2 and f"in use by another deltatune run (pid {holder.pid}" in err, err
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (tmp_path / rundir.LOCK).read_text().strip() == str(holder.pid)  # a kill -9 leaves the lock file
    with caplog.at_level(logging.WARNING, logger="deltatune"):
        t = trainer(tmp_path)
    assert f"stale lock {tmp_path / rundir.LOCK} of pid {holder.pid}" in caplog.text
    with pytest.raises(ValueError, match=r"in use by another deltatune run \(pid \d+"):
        trainer(tmp_path, resume=True)  # the same process, a second Trainer: refused as well
    t.close()
    assert not (tmp_path / rundir.LOCK).exists()


# --- resume validation -------------------------------------------------------------------------------
def edit_state(ckpt: Path, **changes) -> None:
    path = ckpt / "trainer_state.json"
    state = {**json.loads(path.read_text()), **changes}
    path.write_text(json.dumps({k: v for k, v in state.items() if v is not None}))


def edit_tensors(ckpt: Path, edit) -> None:
    tensors = load_file(ckpt / "adapter.safetensors")
    edit(tensors)
    save_file(tensors, ckpt / "adapter.safetensors")


def first_tensor_nan(tensors):
    key = sorted(tensors)[0]
    tensors[key] = tensors[key].clone().fill_(float("nan"))


def drop_a_tensor(tensors):
    del tensors[sorted(tensors)[0]]


def reshape_a_tensor(tensors):
    key = sorted(tensors)[0]
    tensors[key] = tensors[key].flatten()[1:]


def optimizer_inf(ckpt: Path):
    state = torch.load(ckpt / "optimizer.pt", weights_only=True)
    state["optimizer"]["state"][0]["exp_avg"].fill_(float("inf"))
    torch.save(state, ckpt / "optimizer.pt")


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda c: edit_tensors(c, first_tensor_nan), r"adapter tensors hold NaN or inf: \[."),
        (lambda c: edit_tensors(c, drop_a_tensor), r"adapter tensors do not match the model: missing \[."),
        (lambda c: edit_tensors(c, reshape_a_tensor), r"other shapes than the model's"),
        (lambda c: edit_state(c, batch_in_epoch=5), r"data position \(epoch 1, batch 5\) is not where step 6"),
        (lambda c: edit_state(c, epoch=None), r"trainer_state.json lacks \['epoch'\]"),
        (lambda c: edit_state(c, step=7), r"step 7 does not match the directory name"),
        (lambda c: edit_state(c, step="6"), r"invalid 'step': '6'"),
        (lambda c: (c / "optimizer.pt").unlink(), r"No such file"),
        (optimizer_inf, r"optimizer state 'exp_avg' of parameter 0 holds NaN or inf"),
        (lambda c: [p.unlink() for p in c.iterdir()], r"No such file"),  # an empty checkpoint folder
        (lambda c: (c / "trainer_state.json").write_text('{"step": 6, "ep'), r"Unterminated string"),  # torn
    ],
)
def test_resume_skips_an_invalid_checkpoint_to_the_previous_one_and_says_why(finished, tmp_path, caplog, damage,
                                                                              reason):
    out = copy_of(finished, tmp_path)
    damage(out / "checkpoints" / "ckpt-6")
    with caplog.at_level(logging.WARNING, logger="deltatune"):
        resumed = trainer(out, resume=True)
    resumed.close()
    assert resumed.step == 3
    assert re.search(rf"ignoring invalid checkpoint \S*ckpt-6: .*{reason}", caplog.text), caplog.text
    assert re.search(r"resuming from \S*ckpt-3, the newest valid checkpoint \(skipped: ckpt-6\)", caplog.text)


def test_resume_fails_when_no_checkpoint_is_valid(finished, tmp_path):
    out = copy_of(finished, tmp_path)
    for step in (3, 6):
        edit_tensors(out / "checkpoints" / f"ckpt-{step}", first_tensor_nan)
    with pytest.raises(ValueError, match=r"no valid checkpoint in \S+ to resume from .*pass --overwrite"):
        trainer(out, resume=True)
    assert not (out / rundir.LOCK).exists()


def test_resume_of_a_finished_run_without_checkpoints_is_refused(tmp_path):
    trainer(tmp_path, "train.steps=1", "train.save_every=null").train()
    with pytest.raises(ValueError, match="finished run without checkpoints, so there is nothing to resume"):
        trainer(tmp_path, "train.steps=1", "train.save_every=null", resume=True)


# --- bad input -> the one line the user gets ----------------------------------------------------------
@pytest.fixture(scope="module")
def files(tmp_path_factory, finished) -> dict[str, str]:
    """Data files for the table below, a trained run, and a plain file; by name."""
    root = tmp_path_factory.mktemp("files")
    texts = [f"review {i}" for i in range(20)]

    def csv(name: str, labels, data: bytes | None = None) -> str:
        path = root / name
        path.write_bytes(data if data is not None else
                         ("text,label\n" + "".join(f"{t},{y}\n" for t, y in zip(texts, labels))).encode())
        return str(path)

    return {
        "empty": csv("empty.csv", [], b""),
        "latin1": csv("latin1.csv", [], b"text,label\n" + "".join(
            f"café crème {i},{i % 2}\n" for i in range(20)).encode("latin-1")),
        "floats": csv("floats.csv", [0.5, 1.0] * 10),
        "sparse": csv("sparse.csv", [0, 1000] * 10),
        "single": csv("single.csv", ["pos"] * 20),
        "notes": csv("notes.txt", [], b"hello"),
        "run": str(finished),
        "plain_file": csv("out.bin", [], b"x"),
    }


OUT = "train.output_dir={tmp}/out"
BAD_INPUT = [
    # (argv, with {name} for the files above and {tmp} for a fresh folder) -> regex of the one-line error
    (["train", "train.bach_size=8"], r"unknown key 'train.bach_size'; did you mean 'train.batch_size'\?"),
    (["train", "trian.steps=3"], r"unknown key 'trian'; did you mean 'train'\?"),
    (["train", "method.rr=4"], r"unknown key 'method.rr'; did you mean 'method.r'\?"),
    (["train", "method.name=houlsby"], r"unknown key 'method.r' \(r is an option of .*replace the whole section: "
                                       r"'method=\{name: houlsby\}'\)"),
    (["train", "train.steps=abc"], r"invalid value 'abc' for 'train.steps'"),
    (["train", "train.steps=-5"], r"invalid value -5 for 'train.steps': Input should be greater than or equal to 1"),
    (["train", "optimizer.lr=-0.001"], r"invalid value -0.001 for 'optimizer.lr': Input should be greater than 0"),
    (["train", "train.keep_checkpoints=0"], r"invalid value 0 for 'train.keep_checkpoints'"),
    (["train", "method.name=lorra"], r"unknown method 'method.name=lorra'; did you mean 'lora'\?"),
    (["train", "model.task=regression"], r"invalid value 'regression' for 'model.task'"),
    (["train", "model.path=/nowhere"], r"'/nowhere' is neither a Hugging Face model folder"),
    (["train", "data.text_column=txt"], r"column 'txt' \(the text column\) not found in 'rotten_tomatoes'"),
    (["train", "data.source=missing.csv"], r"'missing.csv' is neither a file nor a built-in dataset"),
    (["train", "data.source={notes}"], r"unsupported data file 'notes.txt': expected .csv or .jsonl"),
    (["train", "data.eval_size=100000"], r"eval_size 100000 leaves no train or no eval rows out of 12808"),
    (["train", "missing.yaml"], r"recipe file 'missing.yaml' not found"),
    (["train", "train.steps", "3"], r"'train.steps' is neither a recipe .yaml file nor a key=value override"),
    (["train", "data.source={empty}"], r"data file '\S+empty.csv' is empty: a CSV needs a header line"),
    (["train", "data.source={latin1}"],
     r"'\S+latin1.csv' is not valid utf-8 \(byte 0xe9 on line 2\): set data.encoding .*data.encoding=latin-1"),
    (["train", "data.encoding=klingon"], r"unknown encoding 'data.encoding=klingon'"),
    (["train", "data.source={floats}"], r"labels in column 'label' of '\S+floats.csv' are floats \(0.5, 1.0\): "
                                        r"classification needs int or string classes: .*set model.labels"),
    (["train", "data.source={sparse}"], r"integer labels .* must be 0..K-1 for K classes, got \{0, 1000\} "
                                        r"\(2 distinct\): remap them, or set model.labels .*\['0', '1000'\]"),
    (["train", "data.source={single}"], r"hold a single class \('pos'\): classification needs at least 2: "
                                        r"set model.labels .* or data.label_column"),
    (["train", "model.labels=[pos]"], r"model.labels=\['pos'\] must name at least 2 distinct classes"),
    (["train", "train.max_length=1000"], r"train.max_length=1000 exceeds the model's 512 positions "
                                         r"\(max_position_embeddings in \S+config.json\): set train.max_length=512"),
    (["train", "--resume", "--overwrite"], r"--resume continues .* and --overwrite replaces it: pass one"),
    (["train", "train.output_dir={run}"], r"already holds a deltatune run .*pass --resume to continue it, "
                                          r"--overwrite to replace it"),
    (["train", "train.output_dir={plain_file}"], r"train.output_dir \S+out.bin is a file: choose a folder"),
    (["eval", "{run}", "method.r=16", "optimizer.lr=1"],
     r"cannot apply method.r, optimizer.lr to a trained adapter \(fixed when it was trained\); "
     r"eval applies: data.\*, eval.\*, train.max_length, model.path"),
    (["eval", "{run}", "data.max_eval"], r"'data.max_eval' is neither a recipe .yaml file nor a key=value override"),
    (["eval", "/nowhere"], r"no trained adapter in '/nowhere'"),
    (["export", "{run}", "--out", "{plain_file}"], r"--out \S+out.bin is a file: give a folder"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_INPUT, ids=[" ".join(a) for a, _ in BAD_INPUT])
def test_bad_input_gets_one_clear_line(files, tmp_path, argv, message):
    argv = [item.format(tmp=tmp_path, **files) for item in argv]
    if argv[0] == "train" and not any(a.startswith("train.output_dir=") for a in argv):
        argv.append(OUT.format(tmp=tmp_path))
    code, _, err = run(*argv)
    assert code == 2, err
    assert re.search(message, err) and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def test_the_encoding_option_reads_a_latin1_csv(files, tmp_path):
    code, out, err = run("validate", f"data.source={files['latin1']}", "data.encoding=latin-1", "data.eval_size=4")
    assert code == 0 and "16 train / 4 eval" in out, err


def test_eval_takes_only_the_evaluation_keys_of_another_recipe_or_overrides(finished, tmp_path):
    other = tmp_path / "other.yaml"
    other.write_text("data: {max_eval: 8}\nmethod: {name: lora, r: 64}\ntrain: {max_length: 20, steps: 99}\n")
    code, out, err = run("eval", str(finished), str(other))
    assert code == 0 and "eval on 8 held-out examples" in out, err  # the adapter's r=8 loads: method.r ignored
    code, out, err = run("eval", str(finished), "data.max_eval=4", "train.max_length=20")
    assert code == 0 and "eval on 4 held-out examples" in out, err


@pytest.mark.parametrize(("data", "labels"), [("floats", "['0.5', '1.0']"), ("sparse", "['0', '1000']"),
                                              ("single", "[neg, pos]")])
def test_the_fix_the_label_errors_name_works(files, data, labels):
    code, out, err = run("validate", f"data.source={files[data]}", f"model.labels={labels}", "data.eval_size=4")
    assert code == 0 and "16 train / 4 eval" in out, err
