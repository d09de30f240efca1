"""Recipes: a YAML file plus dotted `key=value` overrides, validated by one frozen model per concern."""

from __future__ import annotations

import codecs
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

import deltatune as dt
from deltatune.engine.registry import did_you_mean

DEFAULT_RECIPE = "lora_minilm_rotten_tomatoes"
T = TypeVar("T", bound=BaseModel)
DTYPES = ("float32", "bfloat16")  # float16 trains without loss scaling here: its gradients under- and overflow
QUANTIZE = ("none", "nf4", "fp4", "int8")
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit", "galore", "mezo", "lora_fa",
              "adafactor")  # training/optimizers.py builds them


class Section(BaseModel):
    """A frozen recipe section that rejects unknown keys."""

    model_config = ConfigDict(frozen=True, extra="forbid")


def one_of(key: str, value: str, choices: tuple[str, ...]) -> None:
    """Raise a one-line ValueError naming `key=value`, the choices and the closest one, unless value is one."""
    if value not in choices:
        raise ValueError(f"unknown value '{key}={value}' (one of {', '.join(choices)}){did_you_mean(value, choices)}")


class ModelSection(Section):
    path: str = Field("minilm", description="Hugging Face model folder, or a built-in model: minilm, smollm2")
    task: Literal["classification", "causal_lm"] = Field("classification", description="what to train the model for")
    labels: list[str] | None = Field(
        None, description="class names in label order (classification); null = read from the data and recorded"
    )
    dtype: str = Field("float32", description="the base model's dtype: float32, or bfloat16 (half the memory; "
                       "the adapters and a trained head stay float32)")
    quantize: str = Field("none", description="store the base's linear layers in nf4, fp4 (4-bit) or int8 "
                          "(bitsandbytes) after loading, computing in model.dtype; none = as loaded")

    @model_validator(mode="after")
    def _valid_labels(self) -> ModelSection:
        if self.labels is not None and (len(self.labels) < 2 or len(set(self.labels)) < len(self.labels)):
            raise ValueError(f"model.labels={self.labels} must name at least 2 distinct classes")
        one_of("model.dtype", self.dtype, DTYPES)
        one_of("model.quantize", self.quantize, QUANTIZE)
        return self


class DataSection(Section):
    source: str = Field(
        "rotten_tomatoes", description="a .csv or .jsonl file, or a built-in dataset: rotten_tomatoes, chatterbot"
    )
    text_column: str = Field("text", description="column with the input text (classification)")
    label_column: str = Field("label", description="column with the class, a name or an int (classification)")
    prompt_column: str = Field("prompt", description="column with the user turn (causal_lm)")
    response_column: str = Field("response", description="column with the assistant turn (causal_lm)")
    eval_size: int | float = Field(1000, gt=0, description="held-out rows: a count, or a fraction when below 1")
    max_train: int | None = Field(None, ge=1, description="use at most this many training rows; null = all")
    max_eval: int | None = Field(None, ge=1, description="use at most this many eval rows; null = all")
    split_seed: int = Field(0, description="seed of the train/eval split, independent of the training seed")
    encoding: str = Field("utf-8", description="text encoding of a .csv/.jsonl file, e.g. latin-1, cp1252")

    @model_validator(mode="after")
    def _known_encoding(self) -> DataSection:
        try:
            codecs.lookup(self.encoding)
        except LookupError:
            raise ValueError(f"unknown encoding 'data.encoding={self.encoding}' (e.g. utf-8, latin-1, cp1252)") from None
        return self


class MethodSection(Section):
    """`name` plus the options of that method's config (validated by `dt.make_config`)."""

    model_config = ConfigDict(frozen=True, extra="allow")
    name: str = Field("lora", description="a method from `deltatune methods`")

    @model_validator(mode="after")
    def _valid_method(self) -> MethodSection:
        specs = {spec.name: spec for spec in dt.list_methods()}
        if self.name not in specs:
            raise ValueError(f"unknown method 'method.name={self.name}'{did_you_mean(self.name, specs)}")
        valid = ["name", *specs[self.name].config.model_fields]
        for key in self.model_extra:
            if key not in valid:
                others = [n for n, spec in specs.items() if key in spec.config.model_fields]
                hint = (f" ({key} is an option of {', '.join(others[:3])}{', ...' if len(others) > 3 else ''}: to switch "
                        f"methods from the command line, replace the whole section: 'method={{name: {self.name}}}')"
                        if others and not did_you_mean(key, valid) else "")  # a misspelling gets its suggestion
                raise ValueError(unknown_key("method", key, valid) + hint)
        try:
            self.config()
        except ValidationError as e:
            raise ValueError(describe(e, specs[self.name].config, ("method",))) from None
        return self

    def config(self) -> Any:
        """The method's validated config object."""
        return dt.make_config(self.name, **self.model_extra)


class GaLoreOptions(Section):
    rank: int = Field(128, ge=1, description="r: rank of the gradient projection (matrices with min(m, n) <= r "
                      "take plain AdamW steps)")
    update_proj_gap: int = Field(200, ge=1, description="T: recompute the projection (an SVD of the gradient) "
                                 "every T steps")
    scale: float = Field(0.25, gt=0, description="alpha: the projected-back update is scaled by it")


class MeZOOptions(Section):
    eps: float = Field(1e-3, gt=0, description="SPSA perturbation size: the probes are theta +- eps z")


class AdafactorOptions(Section):
    scale_parameter: bool = Field(False, description="scale the learning rate by the RMS of each parameter")
    clip_threshold: float = Field(1.0, gt=0, description="clip the RMS of each update to this")
    decay_rate: float = Field(-0.8, lt=0, description="second-moment decay beta2_t = 1 - t^decay_rate")
    beta1: float | None = Field(None, ge=0, lt=1, description="first-moment decay; null = no first moment "
                                "(the memory-lean default)")
    eps: tuple[float, float] = Field((1e-30, 1e-3), description="regularizers of the squared gradient and of "
                                     "the parameter scale")


# optimizer.name -> its own options section
OPTION_SECTIONS = {"galore": GaLoreOptions, "mezo": MeZOOptions, "adafactor": AdafactorOptions}


class OptimizerSection(Section):
    name: str = Field("adamw", description="adamw (torch); adamw_8bit (bitsandbytes: moments in 8 bits, a quarter "
                      "of the state memory); paged_adamw, paged_adamw_8bit (state paged to CPU memory; CUDA only); "
                      "galore (low-rank projected gradients, for full fine-tuning); mezo (zeroth-order, forward "
                      "passes only); lora_fa (LoRA's A frozen, B trained); adafactor (factored second moments)")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate (peak, after warmup)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW moment decay rates")
    grad_clip: float | None = Field(1.0, gt=0, description="clip the gradient norm to this; null = no clipping")
    loraplus_ratio: float | None = Field(
        None, gt=0, description="LoRA+ (arXiv:2402.12354): lora_B learns at lr * ratio (16 is typical); null = off"
    )
    galore: GaLoreOptions | None = Field(None, description="options of optimizer.name=galore; null = defaults")
    mezo: MeZOOptions | None = Field(None, description="options of optimizer.name=mezo; null = defaults")
    adafactor: AdafactorOptions | None = Field(None, description="options of optimizer.name=adafactor; "
                                               "null = defaults")

    @model_validator(mode="after")
    def _known_optimizer(self) -> OptimizerSection:
        one_of("optimizer.name", self.name, OPTIMIZERS)
        for key in OPTION_SECTIONS:
            if getattr(self, key) is not None and key != self.name:
                raise ValueError(f"optimizer.{key} holds the options of optimizer.name={key}, and this recipe has "
                                 f"optimizer.name={self.name}: set optimizer.name={key}, or remove optimizer.{key}")
        return self

    def extra_options(self) -> dict:
        """The chosen optimizer's own options (its section, or its defaults) as keyword arguments."""
        cls = OPTION_SECTIONS.get(self.name)
        if cls is None:
            return {}
        return (getattr(self, self.name) or cls()).model_dump()


class ScheduleSection(Section):
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="fraction of steps with a linear warmup from ~0")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="the cosine decay ends at lr * min_lr_ratio")


class TrainSection(Section):
    steps: int | None = Field(None, ge=1, description="optimizer steps; null = run `epochs` over the data")
    epochs: float = Field(1.0, gt=0, description="passes over the training data when steps is null")
    batch_size: int = Field(32, ge=1, description="examples per forward pass (higher: faster, more memory)")
    grad_accum: int = Field(1, ge=1, description="forward passes per optimizer step")
    max_length: int = Field(64, ge=2, description="truncate examples to this many tokens")
    eval_every: int | None = Field(None, ge=1, description="evaluate every N steps (always before and after)")
    save_every: int | None = Field(None, ge=1, description="write a resumable checkpoint every N steps")
    keep_checkpoints: int = Field(2, ge=1, description="how many of the newest checkpoints to keep")
    seed: int = Field(0, description="seed of initialisation, data order and dropout")
    gradient_checkpointing: bool = Field(
        False, description="recompute each block's activations in backward instead of keeping them: less memory "
        "(about one block's activations), one more forward's time; gradients unchanged"
    )
    chunked_loss: int | None = Field(
        None, ge=1, description="a causal LM's loss over chunks of about this many tokens, each chunk's lm_head "
        "and cross-entropy recomputed in backward: the (tokens x vocabulary) logits never exist at once (less "
        "memory with large vocabularies, e.g. 1024); loss and gradients unchanged; null = transformers' loss"
    )
    return_freed_memory: bool = Field(
        False, description="Linux/glibc: serve allocations of 1 MiB and more from mmap, so freed activations leave "
        "the process instead of holes in its heap (lower peak RSS on CPU; results unchanged; process-wide)"
    )
    distributed: Literal["none", "ddp", "fsdp"] = Field(
        "none", description="under torchrun / accelerate launch: ddp (replicated model) or fsdp (frozen base "
        "sharded over the processes, adapter replicated); none = one process"
    )
    output_dir: str | None = Field(None, description="where metrics, checkpoints and the adapter go; null = runs/<name>")


class EvalSection(Section):
    batch_size: int = Field(64, ge=1, description="examples per evaluation forward pass")


class Recipe(Section):
    """A whole training run."""

    name: str = Field(DEFAULT_RECIPE, description="the run's name; default output_dir is runs/<name>")
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    method: MethodSection = MethodSection()
    train_modules: list[str] | None = Field(
        None, description="modules trained in full beside the deltas; null = the task's head (if any)"
    )
    optimizer: OptimizerSection = OptimizerSection()
    schedule: ScheduleSection = ScheduleSection()
    train: TrainSection = TrainSection()
    eval: EvalSection = EvalSection()

    @model_validator(mode="before")
    @classmethod
    def _method_options_from_the_run(cls, data: Any) -> Any:
        """Fill method options that the run already knows where the method section leaves them out: DePT's S
        (`max_length`) is train.max_length, and prompt tuning's `init_text` is split by the model's tokenizer."""
        method = data.get("method") if isinstance(data, dict) else None
        if not isinstance(method, dict):
            return data
        spec = next((s for s in dt.list_methods() if s.name == method.get("name", "lora")), None)
        fields = spec.config.model_fields if spec is not None else {}
        known = {}
        if "max_length" in fields:
            known["max_length"] = (data.get("train") or {}).get("max_length", TrainSection.model_fields["max_length"].default)
        if "tokenizer" in fields and method.get("init_text") is not None:
            from .tasks import resolve_model_path  # transformers loads only for recipes that need a tokenizer

            known["tokenizer"] = str(resolve_model_path((data.get("model") or {}).get("path", "minilm")))
        return {**data, "method": {**known, **method}} if known.keys() - method.keys() else data

    @property
    def output_dir(self) -> Path:
        """The run's output directory."""
        return Path(self.train.output_dir or Path("runs") / self.name)

    def to_yaml(self) -> str:
        """The resolved recipe as YAML that `load_recipe` reads back to an equal recipe."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def unknown_key(section: str, key: str, valid: list[str]) -> str:
    """One line naming an unknown key by its dotted path and the closest valid key."""
    prefix = f"{section}." if section else ""
    return f"unknown key '{prefix}{key}'{did_you_mean(key, valid, prefix)}"


def _fields_at(model: type[BaseModel], loc: tuple[str, ...]) -> list[str]:
    """Field names of the section at `loc` inside `model`, stepping through list items (`models.0`)."""
    annotation: Any = model
    for key in loc:
        if key.isdigit():
            continue
        annotation = annotation.model_fields[key].annotation
        while typing.get_origin(annotation) in (list, typing.Union, types.UnionType):  # list[X], X | None
            annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    is_model = isinstance(annotation, type) and issubclass(annotation, BaseModel)
    return list(annotation.model_fields) if is_model else []


def describe(error: ValidationError, model: type[BaseModel], prefix: tuple[str, ...] = ()) -> str:
    """A pydantic error as one line: dotted key paths, close-key suggestions, our validators' own messages."""
    messages = []
    for e in error.errors():
        loc = tuple(str(part) for part in e["loc"])
        path = ".".join(prefix + loc)
        cause = e.get("ctx", {}).get("error")
        if e["type"] == "extra_forbidden":
            messages.append(unknown_key(".".join(prefix + loc[:-1]), loc[-1], _fields_at(model, loc[:-1])))
        elif e["type"] == "missing":
            messages.append(f"missing key '{path}'")
        elif isinstance(cause, ValueError):  # our own validators already say which key and why
            messages.append(str(cause))
        else:
            messages.append(f"invalid value {e['input']!r} for '{path}': {e['msg']}")
    return "; ".join(messages)


def read_mapping(path: str | Path, what: str) -> dict:
    """The YAML mapping in `path` (a recipe, merge or prune config), with one-line errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a {what} is a mapping of sections, got {type(data).__name__}")
    return data


def validated(model: type[T], data: dict) -> T:
    """`model` built from plain data, or a one-line ValueError."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ValueError(describe(e, model)) from None


def apply_override(data: dict, item: str) -> None:
    """Set `a.b.c=value` in the nested dict `data`; the value is parsed as a YAML scalar/flow value."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ValueError(f"override {item!r} must look like key=value, e.g. train.batch_size=16")
    *sections, leaf = key.split(".")
    node = data
    for i, part in enumerate(sections):
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise ValueError(f"cannot set '{key}': '{'.'.join(sections[: i + 1])}' is a value, not a section")
    try:
        node[leaf] = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ValueError(f"override {item!r}: value is not valid YAML ({e.problem})") from None


def builtin_recipe(name: str) -> Path:
    """Path of a recipe that ships inside the package."""
    return Path(str(resources.files("deltatune") / "recipes" / f"{name}.yaml"))


def load_recipe(path: str | Path | None = None, overrides: list[str] = ()) -> Recipe:
    """Read a recipe file (default: the embedded one), apply overrides, validate."""
    path = Path(path) if path is not None else builtin_recipe(DEFAULT_RECIPE)
    data = read_mapping(path, "recipe file")
    data.setdefault("name", path.stem)
    for item in overrides:
        apply_override(data, item)
    return validate(data)


def validate(data: dict) -> Recipe:
    """A `Recipe` from plain data, or a one-line ValueError."""
    return validated(Recipe, data)
