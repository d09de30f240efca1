"""Exact adapter merging: combine the weight deltas dW_i = s_i B_i A_i, then re-compress with a truncated SVD.

Averaging A and B separately is wrong: (sum_i w_i B_i)(sum_j w_j A_j) carries cross terms w_i w_j B_i A_j
that no adapter learned. The deltas themselves add, and a sum of rank-r_i deltas has rank <= sum_i r_i,
so a truncated SVD (Eckart-Young) turns the merge back into LoRA factors:
    dW = sum_i w_i s_i B_i A_i = U S V^T,   B = U_k sqrt(S_k),   A = sqrt(S_k) V_k^T,   alpha = r (scale 1).
This is exact at the default rank k = sum_i r_i for linear merges and the best rank-k approximation
otherwise; PEFT's `add_weighted_adapter(combination_type="svd")` does the same (tested against it).
Each layer is stored at its own kept rank (LoRA's rank_pattern / alpha_pattern, PEFT's too), so an
`energy=` merge or layers of different input ranks cost no zero padding.
TIES, DARE, DELLA... run on the exact deltas through the task-vector pipeline (`TaskVectorMerge`).
LoRA: arXiv:2106.09685; task arithmetic: arXiv:2212.04089.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from deltatune.engine import io, peft_format
from deltatune.engine.kinds import LINEAR
from deltatune.engine.layer import DeltaLayer
from deltatune.engine.registry import MethodSpec, did_you_mean, get_method, make_config
from deltatune.merging.task_arithmetic import MERGE_METHODS, TaskVectorMerge, tensor_generator
from deltatune.methods.lowrank.lora import LoRA

FORMATS = ("auto", "deltatune", "peft")
_MERGE_FIRST = ("merge each such adapter into its base model (`deltatune merge-adapter`), then merge the "
                "checkpoints (TaskVectorMerge.merge_state_dicts)")


# --- reading ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerFactors:
    """One adapted layer: dW = scale * B A in the layer's d_out x d_in matrix view (see engine.kinds)."""

    A: Tensor  # (r, d_in)
    B: Tensor  # (d_out, r)
    scale: float
    bias: Tensor | None = None  # (d_out,): the change of the layer's bias, if the adapter trains one
    layout: str = "matrix"  # PEFT's key layout: "linear", "embedding", "conv"; "matrix" = not known (deltatune)
    kernel: tuple[int, ...] = ()  # conv: the kernel dims of A in PEFT's file, (C_in, k, ...)

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return self.B.shape[0], self.A.shape[1]

    def delta(self) -> Tensor:
        """dW = scale * B A, (d_out, d_in), float32."""
        return self.scale * (self.B.float() @ self.A.float())


@dataclass(frozen=True)
class AdapterDeltas:
    """The layer deltas of one adapter folder, plus what an output file needs to know about the base model."""

    path: Path
    format: str  # "deltatune" or "peft"
    layers: dict[str, LayerFactors]
    base_model: dict[str, Any]  # class, name_or_path, fingerprints (layer path -> hash; deltatune only)
    trains_bias: bool = False  # bias="lora_only": a layer without a bias delta has no bias at all
    fan_in_fan_out: bool = False


def read_adapter_deltas(path: str | Path) -> AdapterDeltas:
    """Read a deltatune or PEFT LoRA folder into per-layer factors; refuse adapters that are not additive."""
    path = Path(path)
    if (path / io.CONFIG_NAME).is_file():
        read = _read_deltatune
    elif (path / peft_format.CONFIG_NAME).is_file():
        read = _read_peft
    elif not path.is_dir():
        why = "it is a file; pass the adapter folder" if path.exists() else "it does not exist; check the path"
        raise FileNotFoundError(f"no adapter at '{path}': {why}")
    else:
        raise FileNotFoundError(f"no adapter at '{path}': expected {io.CONFIG_NAME} (deltatune) or "
                                f"{peft_format.CONFIG_NAME} (PEFT)")
    return read(path)


def _additive_lora(method: str, where: str) -> MethodSpec:
    spec = get_method(method)
    if not (issubclass(spec.delta, LoRA) and spec.delta.additive):
        raise ValueError(f"{where} is a {method} adapter, whose change is not a weight delta independent of W0 "
                         f"(DoRA rescales every row of W0 + dW), so it cannot be added to others; {_MERGE_FIRST}")
    return spec


def _factors(spec: MethodSpec, config: Any, state: dict[str, Tensor], where: str, path: str) -> LayerFactors:
    """(A, B, scale) through the method's own code: its Delta on a weightless stand-in layer of the same shape
    at `path` (where a rank_pattern applies)."""
    if "lora_A" not in state or "lora_B" not in state:
        raise ValueError(f"{where} lacks lora_A or lora_B (has {sorted(state)}); save the adapter again")
    if ints := sorted(f"{k} ({t.dtype})" for k, t in state.items() if not t.is_floating_point()):
        raise ValueError(f"{where} holds tensors that are not floating point: {', '.join(ints)}; the file is "
                         "damaged: save the adapter again")
    d_out, d_in = state["lora_B"].shape[0], state["lora_A"].shape[1]
    stand_in = DeltaLayer(nn.Linear(d_in, d_out, bias="lora_bias" in state, device="meta"), LINEAR)
    stand_in.path = path
    delta = spec.delta(config, stand_in, initialize=False)
    try:
        delta.load_state_dict(state, assign=True)
    except RuntimeError as err:
        raise ValueError(f"{where} does not fit a {spec.name} adapter: {err}") from None
    A, B = delta.factors()  # PiSSA: the rank-2r pair relative to W0
    bias = delta.bias_delta()
    return LayerFactors(A.detach(), B.detach(), float(delta.scale), None if bias is None else bias.detach())


def _read_deltatune(path: Path) -> AdapterDeltas:
    meta, tensors = io.read_adapter(path)
    where = f"adapter '{path}'"
    spec = _additive_lora(meta["method"], where)
    if meta["train_modules"]:
        raise ValueError(f"{where} trains whole modules {meta['train_modules']} (method `full`): their saved "
                         f"values replace W0 instead of adding to it, so they are no weight delta; {_MERGE_FIRST}")
    config = io.adapter_config(meta, path)
    per_layer: dict[str, dict[str, Tensor]] = defaultdict(dict)
    for key, t in tensors.items():
        layer, name = key.rsplit(".", 1)  # a delta's tensor names hold no dots
        per_layer[layer][name] = t
    layers = {p: _factors(spec, config, per_layer[p], f"{where}, layer '{p}',", p) for p in meta["targets"]}
    return AdapterDeltas(path, "deltatune", layers, meta["base_model"], trains_bias=config.bias == "lora_only")


def _read_peft(path: Path) -> AdapterDeltas:
    pc, tensors = peft_format._read(path)
    where = f"PEFT adapter '{path}'"
    if pc.get("use_dora"):
        _additive_lora("dora", where)
    if pc.get("modules_to_save"):
        raise ValueError(f"{where} trains whole modules {pc['modules_to_save']} (modules_to_save): their saved "
                         f"values replace W0 instead of adding to it, so they are no weight delta; {_MERGE_FIRST}")
    parts: dict[str, dict[str, Tensor]] = defaultdict(dict)
    layouts: dict[str, tuple[str, tuple[int, ...]]] = {}
    for key, value in tensors.items():
        key = key.removeprefix(peft_format.PREFIX)
        suffix = next((s for s in peft_format._LORA_KEYS if key.endswith("." + s)), None)
        role = peft_format._LORA_KEYS.get(suffix)
        if role not in ("A", "B"):
            why = "PEFT stores the trained bias itself, not its change from the base model's bias" \
                if role == "bias" else "it is not a LoRA factor"
            raise ValueError(f"cannot merge tensor '{key}' of {where}: {why}; load the adapter with "
                             "deltatune.load_peft, save it with DeltaModel.save and merge that folder")
        layer = key[: -len(suffix) - 1]
        parts[layer][role] = value
        if suffix == "lora_embedding_A":
            layouts[layer] = ("embedding", ())
        elif role == "A":
            layouts[layer] = ("conv", tuple(value.shape[1:])) if value.dim() > 2 else ("linear", ())
    spec, layers = get_method("lora"), {}
    for p in sorted(parts):
        # this layer's rank and alpha: PEFT's rank_pattern / alpha_pattern over r / lora_alpha
        r = int(peft_format.peft_pattern(pc.get("rank_pattern") or {}, p, pc["r"]))
        alpha = float(peft_format.peft_pattern(pc.get("alpha_pattern") or {}, p, pc["lora_alpha"]))
        config = make_config("lora", r=r, alpha=alpha, rslora=pc.get("use_rslora", False))
        state = {f"lora_{role}": t for role, t in parts[p].items()}
        if "lora_A" in state and "lora_B" in state:  # PEFT files keep conv factors as kernels
            if state["lora_A"].shape[0] != r:
                raise ValueError(f"{where}, layer '{p}', has rank {state['lora_A'].shape[0]} but its config says "
                                 f"{r} (r / rank_pattern); save the adapter again")
            state = {"lora_A": state["lora_A"].reshape(r, -1),
                     "lora_B": state["lora_B"].reshape(state["lora_B"].shape[0], r)}
        layout, kernel = layouts.get(p, ("linear", ()))
        layers[p] = replace(_factors(spec, config, state, f"{where}, layer '{p}',", p), layout=layout, kernel=kernel)
    base = {"class": None, "name_or_path": pc.get("base_model_name_or_path"), "fingerprints": {}}
    return AdapterDeltas(path, "peft", layers, base, fan_in_fan_out=bool(pc.get("fan_in_fan_out")))


# --- truncated SVD ---------------------------------------------------------------------------
@dataclass(frozen=True)
class LowRank:
    """B A ~ dW from a truncated SVD: B = U_k sqrt(S_k) (d_out, k), A = sqrt(S_k) V_k^T (k, d_in)."""

    A: Tensor
    B: Tensor
    energy: float  # sum_{j<=k} s_j^2 / sum_j s_j^2 (1.0 for a zero delta)
    rel_error: float  # ||dW - B A||_F / ||dW||_F, computed directly (0.0 for a zero delta)
    sq_norm: float  # ||dW||_F^2, which weights this layer in a report's totals

    @property
    def rank(self) -> int:
        return self.A.shape[0]


def _svd(W: Tensor, basis: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of a float64 W; through the small matrix Q^T W when W's columns lie in the span Q of `basis`."""
    if basis is not None:
        Q, _ = torch.linalg.qr(basis.double())  # (d_out, R), orthonormal
        C = Q.T @ W  # (R, d_in)
        if torch.linalg.matrix_norm(W - Q @ C) <= 1e-6 * torch.linalg.matrix_norm(W):
            U, S, Vh = torch.linalg.svd(C, full_matrices=False)
            return Q @ U, S, Vh
    # The merged deltas are float32 data, so a float32 SVD (2-3x faster) loses nothing they hold.
    U, S, Vh = torch.linalg.svd(W.float(), full_matrices=False)
    return U.double(), S.double(), Vh.double()


def truncated_svd(delta: Tensor, rank: int | None = None, energy: float | None = None,
                  basis: Tensor | None = None) -> LowRank:
    """The best rank-k approximation of a (d_out, d_in) delta (Eckart-Young): k = `rank` (capped by the
    number of singular values: min(d_out, d_in), or R with a basis) or the smallest k whose singular
    values keep the share `energy` of sum_j s_j^2 = ||delta||_F^2. An exact (not randomized) SVD; the
    energies and the directly computed relative error are summed in float64.

    `basis` (d_out, R), optional: columns whose span holds delta's columns, such as the stacked B_i of a
    linear merge; then the SVD runs on an R x d_in matrix (checked: if delta leaves the span by more
    than 1e-6 relative, the full SVD runs instead).
    """
    if (rank is None) == (energy is None):
        raise ValueError(f"pass exactly one of rank and energy (got rank={rank}, energy={energy})")
    if rank is not None and rank < 0:
        raise ValueError(f"rank must be >= 0, got {rank}")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise ValueError(f"energy is a fraction of sum s^2 in (0, 1], got {energy}")
    W = delta.detach().double()
    if not W.any():
        return LowRank(W.new_zeros(0, W.shape[1]).float(), W.new_zeros(W.shape[0], 0).float(), 1.0, 0.0, 0.0)
    U, S, Vh = _svd(W, basis)
    power = S.square()
    total = float(power.sum())
    if rank is not None:
        k = min(rank, S.numel())
    else:  # the first k whose cumulative share reaches the target; the slack absorbs rounding at energy=1
        share = power.cumsum(0) / total
        k = min(int(torch.searchsorted(share, torch.tensor([energy - 1e-12], dtype=W.dtype))) + 1, S.numel())
    root = S[:k].sqrt()
    B, A = U[:, :k] * root, root[:, None] * Vh[:k]
    sq_norm = float(W.square().sum())
    rel_error = float(torch.linalg.matrix_norm(W - B @ A)) / math.sqrt(sq_norm)
    return LowRank(A.float(), B.float(), float(power[:k].sum()) / total, rel_error, sq_norm)


# --- merging ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerReport:
    path: str
    shape: tuple[int, int]
    rank: int  # singular triplets kept; the file stores max(1, rank) (a zero delta as one zero pair)
    energy: float
    rel_error: float
    sq_norm: float  # ||merged dW||_F^2


@dataclass(frozen=True)
class AdapterMergeReport:
    """What merge_adapters wrote and how close the re-compressed adapter is to the exact merged deltas."""

    out: Path
    format: str
    method: str
    weights: tuple[float, ...]
    rank: int  # the largest rank stored in the file (each layer has its own: `layers`)
    layers: tuple[LayerReport, ...]

    @property
    def energy(self) -> float:
        """Retained energy over all layers: sum of kept s^2 / sum of all s^2."""
        total = sum(r.sq_norm for r in self.layers)
        return sum(r.energy * r.sq_norm for r in self.layers) / total if total else 1.0

    @property
    def rel_error(self) -> float:
        """||dW - B A||_F / ||dW||_F over all layers together."""
        total = sum(r.sq_norm for r in self.layers)
        return math.sqrt(sum(r.rel_error**2 * r.sq_norm for r in self.layers) / total) if total else 0.0

    @property
    def parameters(self) -> int:
        return sum(max(1, r.rank) * (r.shape[0] + r.shape[1]) for r in self.layers)

    def to_markdown(self) -> str:
        low = min(max(1, r.rank) for r in self.layers)
        ranks = f"rank {self.rank}" if low == self.rank else f"ranks {low}-{self.rank} per layer"
        lines = [f"merged {len(self.weights)} adapters ({self.method}, weights {list(self.weights)}) into "
                 f"'{self.out}' ({self.format}, {ranks}, {self.parameters:,} parameters)", "",
                 "| layer | shape | rank | energy | rel. error |", "|---|---|---:|---:|---:|"]
        lines += [f"| {r.path} | {r.shape[0]}x{r.shape[1]} | {r.rank} | {r.energy:.6f} | {r.rel_error:.2e} |"
                  for r in self.layers]
        lines.append(f"| **total** | | | {self.energy:.6f} | {self.rel_error:.2e} |")
        return "\n".join(lines)


def _merger(method: TaskVectorMerge | str) -> tuple[TaskVectorMerge, str]:
    if isinstance(method, TaskVectorMerge):
        return method, method.pretty_name or "custom"
    if method == "linear":  # sum_i w_i dW_i: task arithmetic with lambda = 1
        return MERGE_METHODS["task_arithmetic"], "linear"
    if method in MERGE_METHODS:
        return MERGE_METHODS[method], method
    names = ["linear", *MERGE_METHODS]
    raise ValueError(f"unknown merge method '{method}'{did_you_mean(method, names)} (known: {', '.join(names)})")


def prepare_out(out: str | Path, overwrite: bool, owned: Sequence[str]) -> Path:
    """Refuse a non-empty folder unless `overwrite`; then remove the files in `owned` first, so that a
    reader sees either no output or the whole new one (each file is then written atomically)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out '{out}' is a file; pass a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ValueError(f"out '{out}' is not empty; choose a new folder or pass overwrite=True")
        for name in owned:
            (out / name).unlink(missing_ok=True)
    return out


def _layer_paths(inputs: Sequence[AdapterDeltas]) -> list[str]:
    """Every adapted layer, in first-seen order; each must have one shape and one known layout."""
    paths = list(dict.fromkeys(p for a in inputs for p in a.layers))
    for p in paths:
        shapes = {a.layers[p].shape for a in inputs if p in a.layers}
        layouts = {a.layers[p].layout for a in inputs if p in a.layers} - {"matrix"}
        if len(shapes) > 1 or len(layouts) > 1:
            seen = ", ".join(f"'{a.path}': {a.layers[p].shape[0]}x{a.layers[p].shape[1]} {a.layers[p].layout}"
                             for a in inputs if p in a.layers)
            raise ValueError(f"layer '{p}' differs across the adapters ({seen}): they were trained on different "
                             "base models; merge adapters of one base model")
    return paths


def _check_same_base(inputs: Sequence[AdapterDeltas]) -> None:
    """Refuse adapters of different base models: by fingerprint where two deltatune adapters share a layer,
    else by the base model's name (its last path component: a hub id and a local copy agree)."""
    for i, a in enumerate(inputs):
        for b in inputs[:i]:
            fa, fb = a.base_model["fingerprints"], b.base_model["fingerprints"]
            if shared := sorted(fa.keys() & fb.keys()):
                differ = [p for p in shared if fa[p] != fb[p]]
                if differ:
                    raise ValueError(f"adapters '{b.path}' and '{a.path}' were trained on different base models "
                                     f"(layer '{differ[0]}' differs); merge adapters of one base model")
                continue
            na, nb = a.base_model.get("name_or_path"), b.base_model.get("name_or_path")
            if na and nb and Path(na).name != Path(nb).name:
                raise ValueError(f"adapters '{b.path}' (base '{nb}') and '{a.path}' (base '{na}') were trained on "
                                 "different base models; merge adapters of one base model (if both are the same "
                                 "model, load each onto it and save it again, which records that model's name)")


def _base_model(inputs: Sequence[AdapterDeltas]) -> dict[str, Any]:
    """Base-model identity for the output: from the first deltatune input, fingerprints from all of them."""
    _check_same_base(inputs)
    native = [a for a in inputs if a.format == "deltatune"]
    first = (native or list(inputs))[0].base_model
    fingerprints: dict[str, str] = {}
    owner: dict[str, Path] = {}
    for a in native:
        for p, fp in a.base_model["fingerprints"].items():
            if fingerprints.setdefault(p, fp) != fp:
                raise ValueError(f"adapters '{owner[p]}' and '{a.path}' were trained on different base models "
                                 f"(layer '{p}' differs); merge adapters of one base model")
            owner.setdefault(p, a.path)
    return {"class": first.get("class"), "name_or_path": first.get("name_or_path"), "fingerprints": fingerprints}


def _merge_layer(merger: TaskVectorMerge, factors: Sequence[LayerFactors | None], weights: Sequence[float],
                 seed: int, path: str, model_parameters: Sequence[Mapping[str, float]] | None = None
                 ) -> tuple[Tensor, Tensor | None]:
    """The merged (dW, bias change) of one layer; an adapter without this layer counts as zero."""
    d_out, d_in = next(f for f in factors if f is not None).shape
    zeros = torch.zeros(d_out, d_in)
    deltas = [f.delta() if f is not None else zeros for f in factors]
    merged = merger.merge_tensor(zeros, deltas, weights, tensor_generator(seed, path),
                                 model_parameters=model_parameters)
    if all(f is None or f.bias is None for f in factors):
        return merged, None
    biases = [f.bias.float() if f is not None and f.bias is not None else zeros[:, 0] for f in factors]
    return merged, merger.merge_tensor(zeros[:, 0], biases, weights, tensor_generator(seed, path + ".bias"),
                                       model_parameters=model_parameters)


def _pad(low: LowRank, r: int) -> tuple[Tensor, Tensor]:
    """(A, B) padded with zero rows/columns to rank r (a zero delta to rank 1): the same product."""
    k = low.rank
    A = torch.cat([low.A, low.A.new_zeros(r - k, low.A.shape[1])])
    B = torch.cat([low.B, low.B.new_zeros(low.B.shape[0], r - k)], dim=1)
    return A.contiguous(), B.contiguous()


def merge_adapters(
    adapters: Sequence[str | Path],
    weights: Sequence[float],
    method: TaskVectorMerge | str = "linear",
    *,
    rank: int | None = None,
    energy: float | None = None,
    out: str | Path,
    format: str = "auto",
    seed: int = 0,
    overwrite: bool = False,
    model_parameters: Sequence[Mapping[str, float]] | None = None,
) -> AdapterMergeReport:
    """Merge LoRA adapters exactly through their deltas and save the result as one LoRA adapter.

    Per layer: dW_i = s_i B_i A_i (float32, zero where adapter i lacks the layer), merged on those deltas
    (base = 0) by `method`, then re-factored by a truncated SVD. Bias deltas (bias="lora_only") merge
    the same way.

    Args:
        adapters: deltatune adapter folders (LoRA, rsLoRA, PiSSA) or PEFT LoRA folders, mixed freely.
        weights: one weight w_i per adapter.
        method: "linear" = sum_i w_i dW_i (task arithmetic with lambda = 1), a MERGE_METHODS name (TIES,
            DARE, ...: sparsify and elect signs on the exact deltas) or any TaskVectorMerge.
        rank: rank kept per layer (at most the layer's rank); default: the sum of the input ranks,
            which is exact for linear merges. TIES/DARE make deltas full rank: pass a rank or `energy`.
        energy: instead of rank, keep per layer the fewest singular values holding this share of sum s^2.
        out: output folder; refused when not empty unless `overwrite` (which replaces adapter files only).
        format: "deltatune" (deltatune.load), "peft" (PeftModel.from_pretrained) or "auto": PEFT when
            every input is a PEFT folder, else deltatune. Each layer is stored at its own kept rank (the
            most common one as r, the others in rank_pattern / alpha_pattern, which PEFT reads too), with
            alpha = rank, so scale 1. Deltatune inputs record layers only as d_out x d_in matrices, so
            PEFT output writes them with Linear keys; for their conv or embedding layers write "deltatune"
            and convert with deltatune.load(model, out).export_peft().
        seed: seeds random sparsifiers (DARE, DELLA) per layer.
        model_parameters: optional, one mapping per adapter with its own density, gamma or epsilon
            (mergekit's per-model parameters), over the method's; see TaskVectorMerge.merge_tensor.

    Refuses DoRA and `full` modules (train_modules / modules_to_save): their change depends on W0.
    """
    merger, method_name = _merger(method)
    if isinstance(adapters, (str, Path)) or isinstance(weights, (int, float, str)):
        raise ValueError(f"adapters and weights are lists (one weight per adapter folder), got {adapters!r} and "
                         f"{weights!r}")
    if not adapters or len(weights) != len(adapters):
        raise ValueError(f"need one weight per adapter, got {len(weights)} weights for {len(adapters)} adapters")
    try:
        finite = all(math.isfinite(float(w)) for w in weights)
    except (TypeError, ValueError):
        finite = False
    if not finite:
        raise ValueError(f"weights must be finite numbers, got {list(weights)}")
    if rank is not None and energy is not None:
        raise ValueError("pass rank or energy, not both")
    if rank is not None and rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise ValueError(f"energy is a fraction of sum s^2 in (0, 1], got {energy}")
    if format not in FORMATS:
        raise ValueError(f"unknown format '{format}'{did_you_mean(format, FORMATS)} (known: {', '.join(FORMATS)})")
    merger.for_models(model_parameters, len(adapters))  # bad per-model parameters fail before any work
    owned = (io.CONFIG_NAME, io.WEIGHTS_NAME, peft_format.CONFIG_NAME, peft_format.WEIGHTS_NAME)
    out = prepare_out(out, overwrite, ())  # check before the work; clear only right before writing
    inputs = [read_adapter_deltas(p) for p in adapters]
    if format == "auto":
        format = "peft" if all(a.format == "peft" for a in inputs) else "deltatune"
    base = _base_model(inputs)
    paths = _layer_paths(inputs)
    low: dict[str, LowRank] = {}
    biases: dict[str, Tensor] = {}
    for p in paths:
        factors = [a.layers.get(p) for a in inputs]
        merged, bias = _merge_layer(merger, factors, weights, seed, p, model_parameters)
        basis = torch.cat([f.B.float() for f in factors if f is not None], dim=1)  # spans a linear merge
        if energy is not None:
            low[p] = truncated_svd(merged, energy=energy, basis=basis)
        else:  # default: the sum of the input ranks, the most a linear merge can have
            low[p] = truncated_svd(merged, rank=rank or basis.shape[1], basis=basis)
        if bias is not None:
            biases[p] = bias
    ranks = {p: max(1, low[p].rank) for p in paths}  # LoRA needs r >= 1: a zero delta is one zero pair
    _check_storable(inputs, paths, biases, format)
    prepare_out(out, overwrite, owned)
    if format == "deltatune":
        _write_deltatune(out, paths, low, biases, ranks, base)
    else:
        _write_peft(out, inputs, paths, low, ranks, base)
    layers = tuple(LayerReport(p, (low[p].B.shape[0], low[p].A.shape[1]), low[p].rank, low[p].energy,
                               low[p].rel_error, low[p].sq_norm) for p in paths)
    return AdapterMergeReport(out, format, method_name, tuple(float(w) for w in weights), max(ranks.values()),
                              layers)


def _check_storable(inputs: Sequence[AdapterDeltas], paths: Sequence[str], biases: dict[str, Tensor],
                    format: str) -> None:
    """Refuse outputs that the loaders would reject, before anything is written."""
    if biases and format == "peft":
        raise ValueError("the adapters train bias deltas, but PEFT files store the trained bias itself, which "
                         "needs the base model; write format='deltatune'")
    if biases:  # the loader expects a bias delta on every target layer whose base has a bias
        unknown = [p for p in paths if not any(a.trains_bias for a in inputs if p in a.layers)]
        if unknown:
            raise ValueError(f"layers {unknown[:3]} come only from adapters without bias deltas, so whether their "
                             "base layer has a bias is unknown; merge adapters that all use bias='lora_only' "
                             "or all bias='none'")


def _common_rank(ranks: dict[str, int]) -> int:
    """The rank most layers have (the larger on a tie): the file's r, the others go in rank_pattern."""
    return max(Counter(ranks.values()).items(), key=lambda item: (item[1], item[0]))[0]


def _write_deltatune(out: Path, paths: Sequence[str], low: dict[str, LowRank], biases: dict[str, Tensor],
                     ranks: dict[str, int], base: dict[str, Any]) -> None:
    state: dict[str, Tensor] = {}
    for p in paths:
        state[f"{p}.lora_A"], state[f"{p}.lora_B"] = _pad(low[p], ranks[p])
        if p in biases:
            state[f"{p}.lora_bias"] = biases[p].contiguous()
    r = _common_rank(ranks)
    pattern = peft_format.layer_patterns(ranks, r)  # alpha = rank everywhere: scale 1
    config = make_config("lora", r=r, alpha=float(r), bias="lora_only" if biases else "none", targets=list(paths),
                         rank_pattern=pattern, alpha_pattern={p: float(k) for p, k in pattern.items()})
    meta = {"name": "merged", "method": "lora",
            "options": config.model_dump(mode="json", exclude={"targets", "exclude"}),
            "targets": list(paths), "train_modules": [], "base_model": base}
    io.write_adapter(out, state, meta)


def _write_peft(out: Path, inputs: Sequence[AdapterDeltas], paths: Sequence[str], low: dict[str, LowRank],
                ranks: dict[str, int], base: dict[str, Any]) -> None:
    layout = {p: (a.layers[p].layout, a.layers[p].kernel) for a in reversed(inputs) for p in a.layers
              if a.layers[p].layout != "matrix"}
    tensors: dict[str, Tensor] = {}
    for p in paths:
        A, B = _pad(low[p], ranks[p])
        kind, kernel = layout.get(p, ("linear", ()))
        key = f"{peft_format.PREFIX}{p}"
        if kind == "embedding":
            tensors[f"{key}.lora_embedding_A"], tensors[f"{key}.lora_embedding_B"] = A, B
        elif kind == "conv":  # A as a conv kernel with r outputs, B as a 1x1 conv
            tensors[f"{key}.lora_A.weight"] = A.reshape(ranks[p], *kernel)
            tensors[f"{key}.lora_B.weight"] = B.reshape(*B.shape, *[1] * (len(kernel) - 1))
        else:
            tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = A, B
    r = _common_rank(ranks)
    pattern = peft_format.layer_patterns(ranks, r)  # alpha = rank everywhere: scale 1
    config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base["name_or_path"],
        "r": r, "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
        "use_rslora": False, "use_dora": False, "lora_dropout": 0.0, "bias": "none",
        "target_modules": list(paths), "modules_to_save": None,
        "fan_in_fan_out": any(a.fan_in_fan_out for a in inputs), "init_lora_weights": True, "inference_mode": True,
    }
    peft_format.write_peft(out, tensors, config)
