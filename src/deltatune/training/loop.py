"""Single-device fine-tuning: one Trainer with setup / train / evaluate and a plain loop.

Modelled on torchtune's `lora_finetune_single_device` recipe. Everything that decides a run's numbers
(initialisation, data order, dropout) is seeded, and a checkpoint records the data position and RNG
states, so a resumed run continues exactly as if it had never stopped.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR
from tqdm import tqdm
from transformers import AutoModelForCausalLM

import deltatune as dt
from deltatune.engine.atomic import atomic_write_text

from . import checkpoint, distributed, rundir
from .allocator import return_freed_memory
from .data import Splits, load_splits
from .mezo import MeZO
from .optimizers import build_optimizer, freeze_lora_a, moment_tensors, remap_state
from .param_groups import param_groups
from .recipe import Recipe
from .rundir import ADAPTER, CHECKPOINTS, METRICS, RECIPE
from .tasks import TASKS, Task, resolve_model_path

logger = logging.getLogger(__name__)

__all__ = ["ADAPTER", "CHECKPOINTS", "METRICS", "RECIPE", "Trainer", "TrainResult"]


# --- building blocks shared with the CLI ---------------------------------------------------------
def load_data(recipe: Recipe) -> Splits:
    """The recipe's train/eval records, with the columns its task reads."""
    d = recipe.data
    columns = {field: getattr(d, f"{field}_column") for field in TASKS[recipe.model.task].fields}
    return load_splits(d.source, columns, d.eval_size, d.split_seed, d.max_train, d.max_eval, recipe.model.labels,
                       encoding=d.encoding)


def make_task(recipe: Recipe, label_names: list[str] | None) -> Task:
    """The recipe's task, with its tokenizer loaded."""
    path = resolve_model_path(recipe.model.path)
    return TASKS[recipe.model.task](path, recipe.train.max_length, label_names)


def build_model(recipe: Recipe, task: Task, adapter_dir: Path | None = None,
                calibration: Callable[[int], list[dict[str, Tensor]]] | None = None) -> dt.DeltaModel:
    """The base model (in model.dtype, quantized as model.quantize says) with the recipe's fresh adapter,
    or with the adapter saved in `adapter_dir`. A method that chooses its entries from data (FISH: a config
    with `calibrate(model, batches)`) gets `calibration(n)`: n training batches, on the base before injection."""
    torch.manual_seed(recipe.train.seed)  # a new head and LoRA's A start identically in every run
    dtype = getattr(torch, recipe.model.dtype)
    base = task.build_model(dtype)
    train_modules = recipe.train_modules if recipe.train_modules is not None else task.default_train_modules(base)
    if recipe.model.quantize != "none":
        # modules trained in full (a new head) stay in full precision, and so does lm_head, as transformers does
        dt.quantize(base, recipe.model.quantize, compute_dtype=dtype, skip=[*(train_modules or []), "lm_head"])
    if adapter_dir is not None:
        model = dt.load(base, adapter_dir)
    else:
        config = recipe.method.config()
        if hasattr(config, "calibrate"):
            if calibration is None:
                raise ValueError(f"{recipe.method.name} chooses its entries from training data: build it through "
                                 "`deltatune train` (or Trainer), or pass calibration batches")
            if recipe.model.quantize != "none":  # gradients of float weights: score before quantizing
                raise ValueError(f"{recipe.method.name} scores the base weights by gradients, which a quantized "
                                 "base does not have: train it with model.quantize=none")
            config = config.calibrate(base, calibration(config.calibration_batches))
        model = dt.inject(base, config, train_modules=train_modules or None)
    task.fit_prompt(model)  # a prompt adapter's virtual tokens take positions and shift the counted labels
    return model


def to_device(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def evaluate(model: torch.nn.Module, task: Task, examples: list[dict], batch_size: int) -> dict[str, float]:
    """The task's metrics on encoded `examples`, in eval mode (no dropout) and without gradients."""
    model.eval()
    device = next(model.parameters()).device
    batches = (to_device(task.collate(examples[i : i + batch_size]), device) for i in range(0, len(examples), batch_size))
    return task.evaluate(model, batches)


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """LR factor: linear warmup over `warmup` steps, then cosine decay from 1 to `min_ratio`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@functools.lru_cache(maxsize=2)
def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The seeded permutation of `n` examples for one epoch (the same whenever it is asked for)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


@dataclass(frozen=True)
class TrainResult:
    """What a finished run reports."""

    before: dict[str, float]
    after: dict[str, float]
    trainable: int
    total: int
    seconds: float
    steps: int
    adapter_dir: Path


class Trainer:
    """Fine-tune one adapter as a recipe says; `setup()`, then `train()`."""

    def __init__(self, recipe: Recipe, resume: bool = False, overwrite: bool = False):
        self.recipe = recipe
        self.resume = resume
        self.overwrite = overwrite
        self.output_dir = recipe.output_dir
        self.group = distributed.init(recipe.train.distributed)  # one process unless launched by torchrun
        self.device = self.group.device()
        self.lock = rundir.RunLock(self.output_dir)  # held by rank 0, the only rank that writes

    # --- setup ---------------------------------------------------------------------------------
    def setup(self) -> None:
        """Lock and claim the output folder, load data and model, build optimizer and schedule, and
        restore a checkpoint when resuming. The lock is held until `train()` ends (or `close()`)."""
        created = not self.output_dir.exists()
        self.group.on_main(lambda: self.lock.acquire() and None)
        try:
            recipe = self.recipe.model_dump(mode="json")
            self.group.on_main(lambda: rundir.claim(self.output_dir, recipe, self.resume, self.overwrite))
            self._setup()
        except BaseException:
            self.close()
            if self.group.main:
                rundir.discard_if_unused(self.output_dir, created)
            raise

    def close(self) -> None:
        """Release the output folder for the next run (and the process group, if this run started it)."""
        self.lock.release()
        self.group.close()

    def _setup(self) -> None:
        splits = load_data(self.recipe)
        # the resolved recipe records the label order, so eval/export can rebuild the same head
        self.recipe = self.recipe.model_copy(
            update={"model": self.recipe.model.model_copy(update={"labels": splits.label_names})}
        )
        self.task = make_task(self.recipe, splits.label_names)
        self.train_set, self.eval_set = self.task.encode(splits.train), self.task.encode(splits.eval)
        if self.recipe.train.return_freed_memory:
            return_freed_memory()  # before the weights load: the fixed threshold holds for what is allocated after
        self.model = build_model(self.recipe, self.task, calibration=self._calibration_batches).to(self.device)
        if self.recipe.train.gradient_checkpointing:
            dt.enable_gradient_checkpointing(self.model)
        self.step_module = self._training_forward()
        self.optimizer = self._optimizer()
        self.total_steps = self._total_steps()
        warmup = round(self.recipe.schedule.warmup_ratio * self.total_steps)
        factor = functools.partial(
            warmup_cosine, total=self.total_steps, warmup=warmup, min_ratio=self.recipe.schedule.min_lr_ratio
        )
        self.scheduler = LambdaLR(self.optimizer, factor)
        self.step, self.epoch, self.batch_in_epoch, self.elapsed = 0, 0, 0, 0.0
        self.initial_eval: dict[str, float] | None = None
        self.rows = 0  # metrics rows logged, so a resume keeps exactly those its checkpoint had seen
        if self.resume:
            self._restore()

    def _training_forward(self) -> torch.nn.Module:
        """The module each micro-batch runs through: wrapped in DDP, or over an FSDP-sharded base."""
        chunk = self.recipe.train.chunked_loss
        if chunk and self.task.auto_class is not AutoModelForCausalLM:
            raise ValueError(f"train.chunked_loss is a causal LM's loss; model.task={self.recipe.model.task} trains "
                             f"{self.task.auto_class.__name__}: turn train.chunked_loss off")
        if chunk and self.group.parallel and self.group.mode == "fsdp":
            raise ValueError("train.chunked_loss runs the lm_head after the model's forward, where FSDP has "
                             "resharded it: use train.distributed=ddp or turn train.chunked_loss off")
        step = distributed.LossStep(self.model, chunk)
        if self.group.parallel and self.group.mode == "ddp":
            return distributed.wrap_ddp(step, self.group)
        if self.group.parallel and self.group.mode == "fsdp":
            distributed.shard_base(self.model, self.group)
        return step

    def _optimizer(self) -> Optimizer:
        """optimizer.name (AdamW, bitsandbytes' 8-bit / paged AdamW, GaLore, MeZO, LoRA-FA, Adafactor) over the
        trainable parameters only, in the groups methods declare (DePT) and LoRA+'s."""
        o = self.recipe.optimizer
        if o.name == "mezo" and self.group.parallel:
            raise ValueError("optimizer.name=mezo runs in one process: its two probe losses would need summing "
                             "over the processes, which is not done yet; use train.distributed=none")
        if o.name == "lora_fa":
            freeze_lora_a(self.model)  # before the groups are formed: A gets no gradient and no moments
        groups = param_groups(self.model, o.lr, o.weight_decay, o.loraplus_ratio)
        extra = {**o.extra_options(), **({"seed": self.recipe.train.seed} if o.name == "mezo" else {})}
        return build_optimizer(o.name, groups, self.device, extra=extra, lr=o.lr, betas=o.betas,
                               weight_decay=o.weight_decay)

    def _batches_per_epoch(self) -> int:
        return math.ceil(len(self.train_set) / self.recipe.train.batch_size)

    def _total_steps(self) -> int:
        t = self.recipe.train
        if t.steps is not None:
            return t.steps
        return max(1, math.ceil(t.epochs * self._batches_per_epoch() / t.grad_accum))

    def _start_afresh(self) -> None:
        """A resume that found no checkpoint starts over: the killed run's metrics would be logged twice."""
        shutil.rmtree(self.output_dir / CHECKPOINTS, ignore_errors=True)  # at most partial `.tmp` ones
        (self.output_dir / METRICS).unlink(missing_ok=True)

    def _restore(self) -> None:
        """Continue from the newest valid checkpoint; invalid ones are skipped with a warning naming why.
        Rank 0 chooses and reads it, and every rank restores the same state."""
        ckpt = self.group.on_main(self._find_checkpoint)
        if ckpt is None:
            return
        state = ckpt.trainer_state
        self.model.load_adapter_state_dict(ckpt.params)
        self.optimizer.load_state_dict(ckpt.torch_state["optimizer"])
        self.scheduler.load_state_dict(ckpt.torch_state["scheduler"])
        checkpoint.set_rng_state(self._own_rng_state(ckpt))
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.elapsed, self.initial_eval = state["elapsed"], state["initial_eval"]
        if self.group.main:
            self._truncate_metrics(self.step, state.get("metrics_rows"))
            logger.info("resumed from %s", ckpt.path)

    def _own_rng_state(self, ckpt: checkpoint.Checkpoint) -> dict:
        """This rank's RNG state; a checkpoint of another number of processes gives rank 0's to every rank."""
        ranks = ckpt.torch_state.get("rng_ranks", [ckpt.torch_state["rng"]])
        if len(ranks) != self.group.world:
            if self.group.main:
                logger.warning("%s was written by %d processes, this run has %d: dropout draws will differ from "
                               "the uninterrupted run's", ckpt.path, len(ranks), self.group.world)
            return ckpt.torch_state["rng"]
        return ranks[self.group.rank]

    def _find_checkpoint(self) -> checkpoint.Checkpoint | None:
        """The checkpoint to resume from (None: start afresh), or a ValueError saying why there is none."""
        root = self.output_dir / CHECKPOINTS
        ckpt = checkpoint.load_latest(root, self._check_checkpoint)
        if ckpt is None and checkpoint.checkpoints(root):
            raise ValueError(f"no valid checkpoint in {root} to resume from (see the warnings above): "
                             "pass --overwrite to start afresh")
        if ckpt is None:
            if (self.output_dir / ADAPTER).exists():
                raise ValueError(f"{self.output_dir} holds a finished run without checkpoints, so there is "
                                 "nothing to resume: pass --overwrite to train it again")
            logger.warning("no checkpoint in %s to resume from: starting afresh", root)
            self._start_afresh()
            return None
        if changed := rundir.changed_keys(ckpt.trainer_state["recipe"], self.recipe.model_dump(mode="json")):
            raise ValueError(f"{ckpt.path} was written by a different recipe (changed: {', '.join(changed)}): "
                             "resume with that recipe, or pass --overwrite to start afresh")
        return ckpt

    def _check_checkpoint(self, ckpt: checkpoint.Checkpoint) -> None:
        """Raise ValueError unless `ckpt` fits this run: its tensors, data position, schedule and optimizer."""
        state, step = ckpt.trainer_state, ckpt.trainer_state["step"]
        own = self.model.adapter_state_dict()
        missing, unexpected = sorted(own.keys() - ckpt.params.keys()), sorted(ckpt.params.keys() - own.keys())
        if missing or unexpected:
            raise ValueError(f"its adapter tensors do not match the model: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}")
        if bad := [k for k, t in own.items() if t.shape != ckpt.params[k].shape]:
            raise ValueError(f"its adapter tensors have other shapes than the model's: {bad[:3]}")
        # micro-batches consumed so far; the epoch advances lazily, at the first batch of the next one
        consumed, per_epoch = step * self.recipe.train.grad_accum, self._batches_per_epoch()
        epoch, batch = state["epoch"], state["batch_in_epoch"]
        if epoch * per_epoch + batch != consumed or not (0 < batch <= per_epoch or consumed == 0):
            raise ValueError(f"its data position (epoch {epoch}, batch {batch}) is not where step {step} "
                             f"leaves {per_epoch} batches per epoch")
        if (last := ckpt.torch_state["scheduler"].get("last_epoch")) != step:
            raise ValueError(f"its schedule is at step {last}, its trainer state at step {step}")
        saved, ours = ckpt.torch_state["optimizer"], self.optimizer.state_dict()
        if [len(g["params"]) for g in saved.get("param_groups", [])] != [len(g["params"]) for g in ours["param_groups"]]:
            raise ValueError("its optimizer state holds other parameter groups than this run's optimizer")
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        for i, moments in saved.get("state", {}).items():
            for name, t, per_parameter in moment_tensors(moments):
                if per_parameter and (i >= len(params) or t.shape != params[i].shape):
                    raise ValueError(f"its optimizer state '{name}' of parameter {i} does not fit the parameter")
                if not torch.isfinite(t).all():
                    raise ValueError(f"its optimizer state '{name}' of parameter {i} holds NaN or inf")

    def _calibration_batches(self, n: int) -> list[dict[str, Tensor]]:
        """The first n training batches of epoch 0's seeded order (whole batches, on the CPU): the data a
        data-chosen selection (FISH) scores its entries on before training."""
        bs = self.recipe.train.batch_size
        order = epoch_order(self.recipe.train.seed, 0, len(self.train_set))[: n * bs]
        return [self.task.collate([self.train_set[i] for i in order[j : j + bs]]) for j in range(0, len(order), bs)]

    # --- data ----------------------------------------------------------------------------------
    def _next_batch(self) -> tuple[dict[str, Tensor], float, int]:
        """The next training micro-batch in the seeded order (the position survives a resume): this rank's
        slice of it, the weight of that slice's mean loss (distributed.rank_share), and the global batch size."""
        if self.batch_in_epoch == self._batches_per_epoch():
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        bs = self.recipe.train.batch_size
        order = epoch_order(self.recipe.train.seed, self.epoch, len(self.train_set))
        idx = order[self.batch_in_epoch * bs : (self.batch_in_epoch + 1) * bs]
        self.batch_in_epoch += 1
        examples = [self.train_set[i] for i in idx]
        mine, weight = distributed.rank_share(examples, self.task.loss_terms, self.group)
        return to_device(self.task.collate(mine), self.device), weight, len(examples)

    # --- the loop ------------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """The task's metrics on the held-out set. An FSDP forward needs every rank; otherwise rank 0 evaluates."""
        def run() -> dict[str, float]:
            return evaluate(self.model, self.task, self.eval_set, self.recipe.eval.batch_size)

        return run() if self.group.mode == "fsdp" else self.group.on_main(run)

    def train_step(self) -> tuple[float, int]:
        """One optimizer step over `grad_accum` micro-batches; returns (mean loss, samples)."""
        if isinstance(self.optimizer, MeZO):
            return self._zeroth_order_step()
        self.model.train()
        accum = self.recipe.train.grad_accum
        loss_sum, samples = 0.0, 0
        self.model.on_train_step(self.step)  # a function of the step, so --resume replays the same draws
        remap_state(self.optimizer, self.model.take_stale_state())  # entries a delta moved (SpIEL, HFT)
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        for i in range(accum):
            batch, weight, n = self._next_batch()
            # DDP averages gradients at the last micro-batch only
            last = i == accum - 1 or not hasattr(self.step_module, "no_sync")
            with contextlib.nullcontext() if last else self.step_module.no_sync():
                # methods' own terms (SORSA's orthonormality...) are in `total`; the logged loss stays the task's
                loss, total = self.step_module(batch, weight, accum)
                total.backward()
            loss_sum += (loss * (weight / self.group.world) / accum).item()
            samples += n
        if self.group.mode == "fsdp":
            distributed.sync_gradients(params, self.group)
        loss_sum = self.group.total(loss_sum)
        if self.recipe.optimizer.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, self.recipe.optimizer.grad_clip)
        self.optimizer.step()
        self.model.after_update(self.step, self.total_steps)  # AdaLoRA's budget: the step's gradients are still there
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum, samples

    def _zeroth_order_step(self) -> tuple[float, int]:
        """MeZO's step: the `grad_accum` micro-batches' loss at theta + eps z and at theta - eps z, forward passes
        only (no backward, no gradients, no dropout: eval mode, as the paper's code). grad_clip does not apply."""
        self.model.eval()
        self.model.on_train_step(self.step)
        batches = [self._next_batch() for _ in range(self.recipe.train.grad_accum)]
        accum = len(batches)
        task_losses: list[float] = []

        def objective() -> float:
            total_sum, loss_sum = 0.0, 0.0
            for batch, weight, _ in batches:
                loss, total = self.step_module(batch, weight, accum)
                total_sum += total.item()
                loss_sum += (loss * weight / accum).item()
            task_losses.append(loss_sum)
            return total_sum

        with torch.no_grad():
            self.optimizer.step(objective)
        self.scheduler.step()
        return sum(task_losses) / len(task_losses), sum(n for _, _, n in batches)

    def train(self) -> TrainResult:
        """Evaluate, run the remaining steps (evaluating and checkpointing as asked), evaluate, save;
        then release the output folder."""
        try:
            return self._train()
        finally:
            self.close()

    def _train(self) -> TrainResult:
        t = self.recipe.train
        start = time.perf_counter() - self.elapsed
        if self.initial_eval is None:
            self.initial_eval = self.evaluate()
            self._log({"step": 0, **_prefixed(self.initial_eval)}, start)
        progress = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step",
                        disable=None if self.group.main else True)
        while self.step < self.total_steps:
            lr = self.scheduler.get_last_lr()[0]  # the rate this step uses
            tick = time.perf_counter()
            loss, samples = self.train_step()
            self.step += 1
            speed = samples / (time.perf_counter() - tick)
            self._log({"step": self.step, "epoch": self.epoch, "loss": loss, "lr": lr, "samples_per_s": speed}, start)
            progress.update()
            progress.set_postfix(loss=f"{loss:.4f}", samples_s=f"{speed:.1f}")
            if t.eval_every and self.step % t.eval_every == 0 and self.step < self.total_steps:
                self._log({"step": self.step, **_prefixed(self.evaluate())}, start)
            if t.save_every and self.step % t.save_every == 0:
                self.save_checkpoint(time.perf_counter() - start)
        progress.close()
        for name, adapter in self.model.adapters.items():  # diff pruning projects to its sparsity
            if hasattr(adapter.config, "finish_training"):
                adapter.config.finish_training(self.model, name)
        final = self.evaluate()
        self._log({"step": self.step, **_prefixed(final)}, start)
        trainable = self.model.trainable_parameters()  # as trained: saving folds a prompt's reparameterisation
        adapter_dir = self.save_adapter()
        return TrainResult(
            before=self.initial_eval,
            after=final,
            trainable=trainable,
            total=self.model.total_parameters(),
            seconds=time.perf_counter() - start,
            steps=self.step,
            adapter_dir=adapter_dir,
        )

    # --- outputs -------------------------------------------------------------------------------
    def _log(self, row: dict, start: float) -> None:
        """Append one metrics row (with seconds since the run began) to metrics.jsonl; show eval rows (rank 0)."""
        if not self.group.main:
            return
        if "loss" not in row:
            logger.info("step %d: %s", row["step"], "  ".join(f"{k} {v:.4f}" for k, v in row.items() if k != "step"))
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with open(self.output_dir / METRICS, "a", encoding="utf-8") as f:
            f.write(json.dumps({**row, "time": round(time.perf_counter() - start, 3)}) + "\n")
        self.rows += 1

    def _truncate_metrics(self, step: int, rows: int | None) -> None:
        """Keep the `rows` metrics rows logged before the checkpoint (older checkpoints: those up to `step`);
        the resumed run logs the rest again. A finished run's final eval row shares the last step."""
        path = self.output_dir / METRICS
        # a line cut short by the kill has no newline, and is dropped with the rest of the tail
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True) if path.exists() else []
        complete = [line for line in lines if line.endswith("\n")]
        if rows is None:
            kept = [line for line in complete if json.loads(line)["step"] <= step]
        else:
            kept = complete[:rows]
            if len(kept) < rows:
                logger.warning("%s holds %d rows, fewer than the %d its checkpoint saw: the resumed run's "
                               "metrics will lack some", path, len(kept), rows)
        atomic_write_text(path, "".join(kept))
        self.rows = len(kept)

    def save_checkpoint(self, elapsed: float) -> Path:
        """A resumable checkpoint of the current step, written by rank 0 (the adapter and optimizer are
        replicated, so its copy is everyone's; each rank's RNG state is gathered)."""
        rng = self.group.gather(checkpoint.rng_state())
        torch_state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng[0],
            **({"rng_ranks": rng} if self.group.parallel else {}),
        }
        trainer_state = {
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "elapsed": elapsed,
            "initial_eval": self.initial_eval,
            "metrics_rows": self.rows,
            "recipe": self.recipe.model_dump(mode="json"),
        }
        return self.group.on_main(lambda: checkpoint.save_checkpoint(
            self.output_dir / CHECKPOINTS,
            self.step,
            self.model.adapter_state_dict(),
            torch_state,
            trainer_state,
            self.recipe.train.keep_checkpoints,
        ))

    def save_adapter(self) -> Path:
        """The trained adapter, with the resolved recipe that rebuilds its base model beside it. A prompt adapter's
        reparameterisation (prefix MLP, P-tuning encoder) serves training only: it is folded into its output first."""
        path = self.output_dir / ADAPTER
        for name in self.model.prompts:  # on every rank, so that all keep the same model
            self.model.fold_prompt(name)

        def write() -> Path:
            self.model.save(path)
            atomic_write_text(path / RECIPE, self.recipe.to_yaml())
            return path

        return self.group.on_main(write)  # the adapter is whole on every rank, even under FSDP


def _prefixed(metrics: dict[str, float]) -> dict[str, float]:
    return {f"eval_{k}": v for k, v in metrics.items()}
