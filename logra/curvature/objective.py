"""What the seeds' solvers differentiate: a model, a training loss, its batches and the chosen parameters.

The solvers (`logra.curvature.solvers`, `logra.curvature.arnoldi`) work in the space of an
*unprojected* logra row: the chosen layers (`LoGraConfig.modules` / `exclude`, the same fnmatch
selection as every logra store), each a (n_out, n_in [+ 1 bias column]) block flattened
row-major, concatenated in the layer table's order. A store logged with `full_config(config)`
(identity projections at full size) holds exactly these per-example gradients, so H⁻¹ can be
applied to its rows and the ordinary `Scorer` streams them.

- `ParameterSpace`: the chosen parameters of a model and the map between a [m, P] matrix of
  row-layout vectors and per-parameter tensors [m, *param.shape].
- A training loss is `loss(model, batch) -> scalar`, the *sum* of the batch's per-example losses
  (what is backpropagated inside `GradientLogger.record()`), or an `OutputLoss`: a cross-entropy
  or squared-error loss of the model's outputs, which also gives Gauss-Newton products.
- A batch is a tensor, or a tuple / list / dict of tensors, with the examples along dim 0.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from logra.capture.adapters import HFConv1DAdapter, adapter_for, layer_module, layer_weight
from logra.config import LoGraConfig, ProjectionInit
from logra.errors import CaptureError, ConfigError, LograError
from logra.types import LayerInfo, parse_enum

FULL_SIZE = 1 << 20  # a projection size larger than any layer: k is clipped to the layer's own size

Batch = Any  # a tensor, or a tuple / list / dict of tensors with the examples along dim 0


class SolverError(LograError, ArithmeticError):
    """A solver met numbers it cannot use (a NaN/Inf curvature product, a diverging recursion)."""


class Curvature(str, enum.Enum):
    """Which curvature the solvers invert.

    hessian: the true Hessian of the mean per-example training loss (double backward).
    ggn: its Gauss-Newton part Jᵀ ∇²_z ℓ J (needs an `OutputLoss`); positive semi-definite.
    """

    HESSIAN = "hessian"
    GGN = "ggn"


class LossKind(str, enum.Enum):
    """The loss of an `OutputLoss`, summed over the examples (and positions) of a batch.

    cross_entropy: Σ CE(z, y) over rows of logits z (..., C), targets equal to -100 ignored.
    mse: Σ (z - y)², as `F.mse_loss(reduction="sum")` (so ∇²_z ℓ = 2I).
    """

    CROSS_ENTROPY = "cross_entropy"
    MSE = "mse"


@dataclass(frozen=True)
class OutputLoss:
    """A training loss of the model's outputs: `forward(model, batch) -> (outputs, targets)`.

    Calling it gives the summed loss of the batch (a scalar); `curvature` applies ∇²_z ℓ to a
    batch of output-space vectors, for Gauss-Newton products.
    """

    kind: LossKind
    forward: Callable[[nn.Module, Batch], tuple[Tensor, Tensor]]

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", parse_enum(LossKind, self.kind, "OutputLoss.kind"))
        if not callable(self.forward):
            raise ConfigError(
                f"OutputLoss.forward={self.forward!r} must be callable: (model, batch) -> (outputs, targets)."
            )

    def __call__(self, model: nn.Module, batch: Batch) -> Tensor:
        return self.value(*self.forward(model, batch))

    def value(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """The summed loss of outputs (..., C) and their targets."""
        if self.kind is LossKind.CROSS_ENTROPY:
            return F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1), reduction="sum")
        return F.mse_loss(outputs, targets.to(outputs.dtype), reduction="sum")

    def curvature(self, outputs: Tensor, targets: Tensor, u: Tensor) -> Tensor:
        """∇²_z ℓ applied to u [m, *outputs.shape] -> [m, *outputs.shape] (outputs detached)."""
        if self.kind is LossKind.MSE:
            return 2.0 * u
        z = outputs.detach().reshape(-1, outputs.shape[-1])  # (M, C)
        p = torch.softmax(z, dim=-1) * (targets.reshape(-1, 1) != -100).to(z.dtype)  # ignored rows: no curvature
        uu = u.reshape(u.shape[0], *z.shape)  # (m, M, C)
        return (p * uu - p * (p * uu).sum(-1, keepdim=True)).reshape(u.shape)


LossFn = Callable[[nn.Module, Batch], Tensor] | OutputLoss


def batch_size(batch: Batch) -> int:
    """The number of examples of a batch: the common dim 0 of its tensors."""
    leaves = _leaves(batch)
    sizes = {t.shape[0] for t in leaves if t.dim() > 0}
    if len(sizes) != 1:
        raise ConfigError(
            f"a training batch must be a tensor or a tuple/list/dict of tensors with the examples along dim 0; got "
            f"{type(batch).__name__} with leading sizes {sorted(sizes)}. Pass batches of equal-length tensors."
        )
    return sizes.pop()


def concat_batches(batches: Sequence[Batch]) -> Batch:
    """The batches joined along dim 0 (one batch of every example)."""
    first = batches[0]
    if isinstance(first, Tensor):
        return torch.cat(list(batches))
    if isinstance(first, dict):
        return {k: concat_batches([b[k] for b in batches]) for k in first}
    if isinstance(first, (tuple, list)):
        return type(first)(concat_batches([b[i] for b in batches]) for i in range(len(first)))
    raise ConfigError(f"a training batch of type {type(first).__name__} is not a tensor, tuple, list or dict.")


def take(batch: Batch, index: Tensor) -> Batch:
    """The examples `index` (LongTensor) of a batch."""
    if isinstance(batch, Tensor):
        return batch[index.to(batch.device)]
    if isinstance(batch, dict):
        return {k: take(v, index) for k, v in batch.items()}
    return type(batch)(take(v, index) for v in batch)


def _leaves(batch: Batch) -> list[Tensor]:
    if isinstance(batch, Tensor):
        return [batch]
    if isinstance(batch, dict):
        return [t for v in batch.values() for t in _leaves(v)]
    if isinstance(batch, (tuple, list)):
        return [t for v in batch for t in _leaves(v)]
    return []


def check_batches(batches: Any) -> list[Batch]:
    """The batches as a list, each with a batch size (ConfigError otherwise)."""
    if isinstance(batches, (Tensor, dict)) or not isinstance(batches, Sequence) or not batches:
        raise ConfigError(
            f"batches must be a non-empty list of training batches, got {type(batches).__name__}; pass e.g. "
            "[x[i : i + 64] for i in range(0, len(x), 64)]."
        )
    out = list(batches)
    for b in out:
        batch_size(b)
    return out


def scalar_loss(loss: LossFn, model: nn.Module, batch: Batch) -> Tensor:
    """loss(model, batch), checked to be a finite-typed scalar tensor with a graph."""
    value = loss(model, batch)
    if not isinstance(value, Tensor) or value.dim() != 0:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ConfigError(
            f"the training loss returned {shape}, not a scalar tensor; return the SUM of the batch's per-example "
            "losses (e.g. F.cross_entropy(model(x), y, reduction='sum'))."
        )
    if not value.requires_grad:
        raise CaptureError(
            "the training loss does not depend on any parameter that requires grad (no autograd graph); compute it "
            "from the model's outputs, outside torch.no_grad()."
        )
    return value


def full_config(config: LoGraConfig | None = None) -> LoGraConfig:
    """`config` with identity projections at full size: its rows are the exact per-example gradients."""
    base = config if config is not None else LoGraConfig()
    d = base.to_dict()
    d.update(k_in=FULL_SIZE, k_out=FULL_SIZE, init=ProjectionInit.IDENTITY.value, layer_k={}, pca_statistics=None)
    return LoGraConfig.from_dict(d)


def is_full(config: LoGraConfig, layers: Sequence[LayerInfo]) -> bool:
    """Whether rows of this config and layer table are unprojected per-example gradients."""
    return config.init is ProjectionInit.IDENTITY and all(
        layer.k_in == layer.n_in and layer.k_out == layer.n_out for layer in layers
    )


class ParameterSpace:
    """The chosen parameters of `model` in the layout of an unprojected row of the layer table `layers`.

    Attributes:
        params: the parameter tensors, per layer its weight and (when `layer.bias`) its bias.
        names: their qualified names.  dim: P, the row width.  dtype: the parameters' dtype.
    """

    def __init__(self, model: nn.Module, layers: Sequence[LayerInfo]) -> None:
        self.layers = tuple(layers)
        self.params: list[Tensor] = []
        self.names: list[str] = []
        self._blocks: list[tuple[LayerInfo, bool]] = []  # (layer, weight stored transposed)
        for layer in self.layers:
            module = _find(model, layer.name)
            adapter = adapter_for(module) if module is not None else None
            if module is None or adapter is None or layer.k_in != layer.n_in or layer.k_out != layer.n_out:
                raise ConfigError(
                    f"layer {layer.name!r} ({layer.kind}, k {layer.k_out}x{layer.k_in} of {layer.n_out}x{layer.n_in}) "
                    "is not an unprojected layer of this model; the solvers need rows logged with "
                    "logra.curvature.full_config(config) on the same model."
                )
            self.params.append(layer_weight(module))
            self.names.append(f"{layer.name}.weight")
            if layer.bias:
                bias = module.bias
                assert isinstance(bias, Tensor)  # the layer table logs a bias column only for a layer with one
                self.params.append(bias)
                self.names.append(f"{layer.name}.bias")
            self._blocks.append((layer, adapter is HFConv1DAdapter))
        for name, p in zip(self.names, self.params):
            if not p.requires_grad:
                raise CaptureError(
                    f"parameter {name} does not require grad, so the loss has no curvature in it; call "
                    "requires_grad_(True) on it, or exclude its module (LoGraConfig.exclude)."
                )
        self.dim = sum(layer.size for layer in self.layers)
        self.dtype = self.params[0].dtype
        self.device = self.params[0].device

    def split(self, rows: Tensor) -> list[Tensor]:
        """[m, P] row-layout vectors -> per parameter [m, *param.shape] (in the parameters' dtype)."""
        m = rows.shape[0]
        rows = rows.to(device=self.device, dtype=self.dtype)
        out = []
        for layer, transposed in self._blocks:
            block = rows[:, layer.offset : layer.offset + layer.size].reshape(m, layer.n_out, layer.n_in)
            n_w = layer.n_in - int(layer.bias)
            weight = block[:, :, :n_w]
            out.append(weight.transpose(1, 2).contiguous() if transposed else weight.contiguous())
            if layer.bias:
                out.append(block[:, :, n_w].contiguous())
        return out

    def check_used(self, parts: Sequence[Tensor | None], what: str = "gradient") -> None:
        """Refuse a None among per-parameter results (a parameter the loss does not reach)."""
        for name, part in zip(self.names, parts):
            _used(name, part, what)

    def join(self, parts: Sequence[Tensor | None], what: str = "gradient") -> Tensor:
        """Per parameter [m, *param.shape] -> [m, P] float64 rows; None (unused parameter) is refused."""
        it = iter(zip(self.names, parts))
        blocks = []
        for layer, transposed in self._blocks:
            name, weight = next(it)
            cols = [_used(name, weight, what)]
            if transposed:
                cols[0] = cols[0].transpose(1, 2)
            if layer.bias:
                name, bias = next(it)
                cols.append(_used(name, bias, what)[:, :, None])
            blocks.append(torch.cat(cols, dim=2).reshape(cols[0].shape[0], -1))
        return torch.cat(blocks, dim=1).to(torch.float64)


def _find(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return layer_module(model, name)
    except AttributeError:
        return None


def _used(name: str, part: Tensor | None, what: str) -> Tensor:
    if part is None:
        raise CaptureError(
            f"the training loss does not depend on parameter {name} (its {what} is None); exclude its module "
            "(LoGraConfig.exclude) or compute the loss through it."
        )
    return part
