"""Optimizer-aware gradients (TrackStar, Chang et al. 2024): Adam's second moments, factorised.

Adam updates a weight by m / sqrt(v̂), so the directions it actually moves in are gradients divided
elementwise by sqrt(v̂). TrackStar attributes through the same geometry: each per-example gradient
G (n_out, n_in) becomes G / sqrt(v̂ + eps) before projection. Dividing elementwise would need the
full gradient, which LoGra never forms; an Adafactor-style row x column factorisation keeps the
factorisation instead. With V = v̂ + eps (the bias column appended when it is logged),
r = V 1 (row sums, n_out), c = Vᵀ 1 (column sums, n_in) and S = Σ r:

    V ≈ r cᵀ / S,   so   G / sqrt(V) ≈ diag(a) G diag(b),   a = sqrt(S / r),   b = 1 / sqrt(c).

The logged row P_out diag(a) G diag(b) P_inᵀ is then ordinary LoGra with the projections
P_out' = P_out diag(a) and P_in' = P_in diag(b): the scalings are folded into the matrices and
logging costs nothing extra. Exact when V is a rank-one outer product (e.g. constant). A general
power (V^-p ≈ diag(a^2p) G diag(b^2p)) folds the same way; `power=0.25` scores g_qᵀ v̂^-1/2 g_i, the
geometry of one Adam step, where TrackStar's 0.5 gives g_qᵀ v̂⁻¹ g_i.

- `SecondMoments`: v̂ per parameter, from a live torch optimizer (`adam_second_moments`) or a
  Hugging Face Trainer checkpoint (`trainer_second_moments`, `optimizer.pt` read only with
  `torch.load(weights_only=True)`, never unpickled).
- `OptimizerCorrection`: {layer: (a, b)} for one model and `LoGraConfig`, with a content
  fingerprint. `configure(config)` records that fingerprint in `LoGraConfig.optimizer_correction`,
  so a store and its queries agree on the correction or are refused (`check_compatible`). A store
  keeps the correction in `optimizer-correction.npz` (read with `allow_pickle=False`, checked
  against the fingerprint in its manifest's config): `OptimizerCorrection.from_store(store)`.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from logra.capture.adapters import layer_weight, select_layers
from logra.config import LoGraConfig
from logra.errors import ConfigError, StoreCorruptedError, StoreError
from logra.store.files import read_regular, write_atomic
from logra.types import LayerInfo

DEFAULT_EPS = 1e-16
"""Added to v̂ before factorising: Adam's default eps (1e-8, added to sqrt(v̂)) squared, so a weight
that never got a gradient is divided by about Adam's own floor rather than by zero."""
TRACKSTAR_POWER = 0.5
"""Each side's gradient times (v̂ + eps)^-power; TrackStar divides by sqrt(v̂)."""
ADAM_STEP_POWER = 0.25
"""Half of TrackStar's: a score g_qᵀ v̂^-1/2 g_i, the first-order change of the query loss by one Adam
step on the training example (measured better on the LDS benchmarks: benchmarks/optimizer_parts.py)."""
CORRECTION_FILE = "optimizer-correction.npz"
MAX_CORRECTION_BYTES = 2**31


@dataclass(frozen=True)
class SecondMoments:
    """Adam's bias-corrected second moments v̂ = exp_avg_sq / (1 - β₂^step), one per parameter.

    values: {parameter name as in `model.named_parameters()`: float64 CPU tensor shaped like the
    parameter}. Parameters the optimizer holds no state for are absent.
    """

    values: dict[str, Tensor]


def _named_by_id(model: nn.Module) -> dict[int, str]:
    """{id(parameter): its first name in model.named_parameters()} (tied weights: the first name)."""
    return {id(p): name for name, p in model.named_parameters()}


def _bias_corrected(state: Mapping[str, Any], betas: Any, bias_correction: bool, where: str) -> Tensor:
    v = state.get("exp_avg_sq")
    if not isinstance(v, Tensor):
        raise ConfigError(
            f"{where} has no 'exp_avg_sq' tensor (keys {sorted(state)}); optimizer-aware scoring needs an Adam or "
            "AdamW optimizer (its second moments)."
        )
    v = v.detach().to("cpu", torch.float64)
    if not bias_correction:
        return v
    step = state.get("step")
    step_value = float(step.item() if isinstance(step, Tensor) else step) if step is not None else 0.0
    beta2 = float(betas[1]) if isinstance(betas, (tuple, list)) and len(betas) == 2 else None
    if beta2 is None or not step_value >= 1:
        raise ConfigError(
            f"{where}: cannot bias-correct v (step={step!r}, betas={betas!r}); take an optimizer that has made at "
            "least one Adam step, or pass bias_correction=False."
        )
    return v / (1.0 - beta2**step_value)


def adam_second_moments(
    optimizer: torch.optim.Optimizer, model: nn.Module, *, bias_correction: bool = True
) -> SecondMoments:
    """v̂ of every parameter of `model` that `optimizer` (Adam, AdamW) holds state for.

    Parameters are matched to names by identity (`model.named_parameters()`), so the optimizer's
    parameter groups may be in any order.
    """
    names = _named_by_id(model)
    values: dict[str, Tensor] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p)
            if not state or id(p) not in names:
                continue
            values[names[id(p)]] = _bias_corrected(state, group.get("betas"), bias_correction, names[id(p)])
    if not values:
        raise ConfigError(
            "the optimizer holds no state for any parameter of the model: it has not stepped yet, or it optimises "
            "another model. Take the optimizer after training (at least one step)."
        )
    return SecondMoments(values)


def trainer_second_moments(
    checkpoint: str | os.PathLike[str],
    model: nn.Module,
    *,
    decay_parameter_names: Iterable[str] | None = None,
    bias_correction: bool = True,
) -> SecondMoments:
    """v̂ from a Hugging Face Trainer checkpoint directory's `optimizer.pt` (or that file itself).

    The file is read with `torch.load(weights_only=True, map_location="cpu")` only: anything that
    is not plain tensors and containers is refused, nothing is executed. Saved indices are matched
    to parameters through the groups' `param_names` when saved; otherwise as `Trainer.create_optimizer`
    builds them: the weight-decay group, then the no-decay group, each in `named_parameters()` order
    among parameters with requires_grad. `decay_parameter_names`: the decay group's names
    (`trainer.get_decay_parameter_names(model)`); default: transformers' rule for `model`.
    Every matched state must have its parameter's shape, or ConfigError is raised.
    """
    path = Path(checkpoint)
    path = path / "optimizer.pt" if path.is_dir() else path
    if not path.is_file():
        raise ConfigError(f"{path} is not a file; pass a Trainer checkpoint directory holding optimizer.pt.")
    try:
        saved = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # an UnpicklingError for anything beyond tensors and containers
        raise ConfigError(
            f"{path} could not be read as a plain tensor state dict with torch.load(weights_only=True) ({exc}); "
            "logra never unpickles arbitrary objects. Re-save the optimizer state with torch.save(opt.state_dict())."
        ) from None
    if not isinstance(saved, dict) or not isinstance(saved.get("state"), dict) or "param_groups" not in saved:
        raise ConfigError(f"{path} is not an optimizer state dict (no 'state' and 'param_groups').")
    params = _group_parameters(saved["param_groups"], model, decay_parameter_names, path)
    names = _named_by_id(model)
    values: dict[str, Tensor] = {}
    for index, (p, betas) in params.items():
        state = saved["state"].get(index)
        if not state:
            continue
        v = _bias_corrected(state, betas, bias_correction, f"{path} state {index} ({names[id(p)]})")
        if tuple(v.shape) != tuple(p.shape):
            raise ConfigError(
                f"{path}: state {index} has shape {tuple(v.shape)} but is matched to {names[id(p)]} of shape "
                f"{tuple(p.shape)}; the checkpoint's parameter groups differ from this model's. Pass "
                "decay_parameter_names=trainer.get_decay_parameter_names(model) of the training run."
            )
        values[names[id(p)]] = v
    if not values:
        raise ConfigError(f"{path} holds no optimizer state for any parameter of the model.")
    return SecondMoments(values)


def _group_parameters(
    groups: Any, model: nn.Module, decay: Iterable[str] | None, path: Path
) -> dict[int, tuple[nn.Parameter, Any]]:
    """{saved index: (parameter, betas)} for every index the saved param_groups list."""
    named = dict(model.named_parameters())
    if not isinstance(groups, list) or not all(isinstance(g, dict) and "params" in g for g in groups):
        raise ConfigError(f"{path}: 'param_groups' is not a list of groups with 'params'.")
    if all("param_names" in g for g in groups):
        ordered = [[named.get(n) for n in g["param_names"]] for g in groups]
        unknown = [n for g in groups for n in g["param_names"] if n not in named]
        if unknown:
            raise ConfigError(f"{path} names parameters {unknown[:5]} that the model does not have.")
    else:
        if decay is None:
            from transformers import Trainer  # the rule of the installed transformers, as create_optimizer uses it

            decay = Trainer.get_decay_parameter_names(None, model)  # type: ignore[arg-type]  # reads no state
        decay_set = set(decay)
        trainable = [(n, p) for n, p in named.items() if p.requires_grad]
        ordered = [[p for n, p in trainable if n in decay_set], [p for n, p in trainable if n not in decay_set]]
        ordered = [g for g in ordered if g] if len(groups) != 2 else ordered
    sizes = [len(g["params"]) for g in groups]
    if sizes != [len(g) for g in ordered]:
        raise ConfigError(
            f"{path}: the saved parameter groups hold {sizes} parameters, but the model's decay / no-decay "
            f"groups hold {[len(g) for g in ordered]}; pass decay_parameter_names of the training run (or a "
            "checkpoint whose param_groups carry param_names)."
        )
    out: dict[int, tuple[nn.Parameter, Any]] = {}
    for group, members in zip(groups, ordered):
        for index, p in zip(group["params"], members):
            if p is not None:
                out[int(index)] = (p, group.get("betas"))
    return out


# --------------------------------------------------------------------------------------------
# The factorised correction.


@dataclass(frozen=True)
class OptimizerCorrection:
    """Per logged layer, the scalings (a (n_out,), b (n_in,)) folded into its projections.

    n_in counts the bias column when the config logs biases. float64 CPU. eps: what was added to
    v̂ before factorising. Build with `from_moments`; the logger checks it against the config.
    """

    scales: dict[str, tuple[Tensor, Tensor]]
    eps: float = DEFAULT_EPS
    power: float = TRACKSTAR_POWER

    @classmethod
    def from_moments(
        cls,
        moments: SecondMoments,
        model: nn.Module,
        config: LoGraConfig,
        *,
        eps: float = DEFAULT_EPS,
        power: float = TRACKSTAR_POWER,
    ) -> OptimizerCorrection:
        """The row x column factorisation of (v̂ + eps)^-power for every layer `config` selects in `model`.

        power: 1/2 divides each side's gradient by sqrt(v̂) (TrackStar, so a score carries v̂⁻¹);
        1/4 gives scores g_qᵀ v̂^-1/2 g_i, the geometry of one Adam step (`ADAM_STEP_POWER`).
        """
        if not isinstance(moments, SecondMoments):
            raise ConfigError(f"moments must be SecondMoments (adam_second_moments), got {type(moments).__name__}.")
        if not (isinstance(eps, (int, float)) and eps >= 0 and np.isfinite(eps)):
            raise ConfigError(f"eps={eps!r} must be a finite number >= 0.")
        if isinstance(power, bool) or not isinstance(power, (int, float)) or not 0 < power <= 1:
            raise ConfigError(f"power={power!r} must be in (0, 1]: 0.5 is TrackStar's, 0.25 one Adam step's.")
        names = _named_by_id(model)
        scales: dict[str, tuple[Tensor, Tensor]] = {}
        for name, module, adapter in select_layers(model, config.modules, config.exclude):
            v = _moment_of(moments, names, layer_weight(module), name)
            v = v.T if adapter.kind == "Conv1D" else v  # -> (n_out, n_in)
            if adapter.kind not in ("Linear", "Conv1D"):
                raise ConfigError(f"layer {name!r} ({adapter.kind}): the correction supports Linear and Conv1D.")
            bias = getattr(module, "bias", None)
            if config.include_bias and isinstance(bias, Tensor):
                v = torch.cat([v, _moment_of(moments, names, bias, name).reshape(-1, 1)], dim=1)
            a, b = factorise(v + float(eps))
            scales[name] = (a ** (2 * power), b ** (2 * power))
        return cls(scales, float(eps), float(power))

    def fingerprint(self) -> str:
        """A hash of eps and every scaling's name, shape and float64 bytes."""
        h = hashlib.sha256(f"logra-optimizer-correction/{self.eps!r}/{self.power!r}".encode())
        for name in sorted(self.scales):
            for side, t in zip(("out", "in"), self.scales[name]):
                h.update(f"|{name}|{side}|{tuple(t.shape)}|".encode())
                h.update(t.to(torch.float64).contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def configure(self, config: LoGraConfig) -> LoGraConfig:
        """`config` with `optimizer_correction` set to this correction's fingerprint."""
        return replace(config, optimizer_correction=self.fingerprint())

    def check(self, config: LoGraConfig, layers: Iterable[LayerInfo]) -> None:
        """Raise ConfigError unless this correction is the one `config` names and fits every layer."""
        if config.optimizer_correction != self.fingerprint():
            raise ConfigError(
                f"the correction has fingerprint {self.fingerprint()} but the config names "
                f"optimizer_correction={config.optimizer_correction!r}; log with correction.configure(config)."
            )
        for layer in layers:
            a, b = self.scales.get(layer.name, (None, None))
            if a is None or b is None or a.shape != (layer.n_out,) or b.shape != (layer.n_in,):
                got = None if a is None or b is None else (tuple(a.shape), tuple(b.shape))
                raise ConfigError(
                    f"the correction has scalings {got} for layer {layer.name!r}, which is logged at "
                    f"n_out={layer.n_out}, n_in={layer.n_in}; build it with OptimizerCorrection.from_moments(moments, "
                    "model, config) for this model and config."
                )

    # ------------------------------------------------------------ on disk

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write an .npz (float64 arrays, no pickle) atomically."""
        arrays: dict[str, np.ndarray] = {
            "eps": np.array(self.eps, dtype=np.float64),
            "power": np.array(self.power, dtype=np.float64),
        }
        for i, name in enumerate(sorted(self.scales)):
            a, b = self.scales[name]
            arrays[f"name_{i}"] = np.array(name)
            arrays[f"out_{i}"], arrays[f"in_{i}"] = a.numpy(), b.numpy()
        buf = io.BytesIO()
        np.savez(buf, **arrays)  # type: ignore[arg-type]  # numpy's stub reads the first ** as allow_pickle
        write_atomic(Path(path), buf.getvalue())

    @classmethod
    def load(cls, path: str | os.PathLike[str], fingerprint: str | None = None) -> OptimizerCorrection:
        """Read a saved correction; with `fingerprint`, raise StoreCorruptedError unless it matches."""
        raw = read_regular(path, MAX_CORRECTION_BYTES, "optimizer correction")
        try:
            with np.load(io.BytesIO(raw), allow_pickle=False) as data:
                count = sum(1 for k in data.files if k.startswith("name_"))
                scales = {
                    str(data[f"name_{i}"]): (torch.from_numpy(data[f"out_{i}"].copy()),
                                             torch.from_numpy(data[f"in_{i}"].copy()))
                    for i in range(count)
                }  # fmt: skip
                correction = cls(scales, float(data["eps"]), float(data["power"]))
        except (ValueError, KeyError, OSError) as exc:
            raise StoreCorruptedError(f"{path} is not a readable optimizer correction ({exc}).") from None
        if fingerprint is not None and correction.fingerprint() != fingerprint:
            raise StoreCorruptedError(
                f"{path} holds the optimizer correction {correction.fingerprint()}, not the {fingerprint} its store "
                "was logged with: the file was altered or replaced. Restore it, or log the store again."
            )
        return correction

    @classmethod
    def from_store(cls, store: Any) -> OptimizerCorrection:
        """The correction a `GradientStore` was logged with (its config must name one)."""
        expected = store.config.optimizer_correction
        if expected is None:
            raise ConfigError(f"the store at {store.root} was logged without an optimizer correction.")
        path = Path(store.root) / CORRECTION_FILE
        if not path.is_file():
            raise StoreError(f"the store at {store.root} names optimizer correction {expected} but has no {path.name}.")
        return cls.load(path, expected)


def _moment_of(moments: SecondMoments, names: dict[int, str], param: Tensor, layer: str) -> Tensor:
    name = names.get(id(param))
    v = moments.values.get(name) if name is not None else None
    if v is None:
        raise ConfigError(
            f"no optimizer second moment for parameter {name!r} of layer {layer!r}: the optimizer did not train it. "
            "Exclude the layer (LoGraConfig.exclude) or take the moments of the optimizer that trained it."
        )
    if tuple(v.shape) != tuple(param.shape):
        raise ConfigError(f"the second moment of {name!r} has shape {tuple(v.shape)}, not {tuple(param.shape)}.")
    return v.to(torch.float64)


def factorise(v: Tensor) -> tuple[Tensor, Tensor]:
    """(a (n_out,), b (n_in,)) with diag(a) G diag(b) = G / sqrt(r cᵀ / S) for v (n_out, n_in) > 0.

    r = row sums, c = column sums, S = Σ r (the module docstring).
    """
    if v.dim() != 2 or not bool((v > 0).all()) or not bool(torch.isfinite(v).all()):
        raise ConfigError(
            f"second moments of shape {tuple(v.shape)} must be a finite, positive matrix after adding eps; "
            "pass eps > 0 for weights whose second moment is exactly zero."
        )
    r, c = v.sum(dim=1), v.sum(dim=0)
    return (r.sum() / r).sqrt(), c.rsqrt()
