"""Which modules logra can log, and how it finds them.

A supported layer type is one `LayerAdapter` subclass: how to recognise the module, read its
(n_in, n_out) widths and, for references, its weight gradient. Subclasses register themselves,
so adding a type is one new class. `select_layers` picks the supported modules whose qualified
names match `LoGraConfig.modules` (fnmatch patterns) and not `exclude`, in `named_modules` order.
A model that is itself a supported layer (a bare `nn.Linear`) is logged under the name
`ROOT_LAYER` ("root"); `layer_module` finds a logged layer's module by name either way.
"""

from __future__ import annotations

import fnmatch
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from logra.errors import CaptureError

ROOT_LAYER = "root"
"""The layer name of a model that is itself a supported layer (its `named_modules` name is "")."""

# --------------------------------------------------------------------------------------------
# Adapters: which modules can be logged, and their (n_in, n_out) widths.


class LayerAdapter:
    """One supported layer type: how to recognise it and read its widths.

    A supported layer must compute y = x W' (+ b) over the last dimension of its first input,
    with y's last dimension n_out, so that the weight gradient is Σ_t g_t x_tᵀ.
    """

    registry: ClassVar[list[type[LayerAdapter]]] = []
    kind: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        LayerAdapter.registry.append(cls)

    @staticmethod
    def matches(module: nn.Module) -> bool:
        raise NotImplementedError

    @staticmethod
    def widths(module: nn.Module) -> tuple[int, int, bool]:
        """(n_in, n_out, has_bias)."""
        raise NotImplementedError

    @staticmethod
    def weight_grad_out_in(module: nn.Module) -> Tensor | None:
        """The module's accumulated weight gradient as an (n_out, n_in) matrix (for references)."""
        raise NotImplementedError


class LinearAdapter(LayerAdapter):
    """`torch.nn.Linear`: weight (n_out, n_in)."""

    kind = "Linear"

    @staticmethod
    def matches(module: nn.Module) -> bool:
        return isinstance(module, nn.Linear)

    @staticmethod
    def widths(module: nn.Module) -> tuple[int, int, bool]:
        assert isinstance(module, nn.Linear)
        return module.in_features, module.out_features, module.bias is not None

    @staticmethod
    def weight_grad_out_in(module: nn.Module) -> Tensor | None:
        return layer_weight(module).grad


class HFConv1DAdapter(LayerAdapter):
    """Hugging Face `Conv1D` (GPT-2 and kin): weight (n_in, n_out), y = x W + b.

    Recognised by class name and attributes so that the core does not import transformers.
    """

    kind = "Conv1D"

    @staticmethod
    def matches(module: nn.Module) -> bool:
        cls = type(module)
        return (
            cls.__name__ == "Conv1D"
            and cls.__module__.startswith("transformers")
            and isinstance(getattr(module, "weight", None), torch.Tensor)
            and layer_weight(module).dim() == 2
        )

    @staticmethod
    def widths(module: nn.Module) -> tuple[int, int, bool]:
        n_in, n_out = layer_weight(module).shape
        return int(n_in), int(n_out), getattr(module, "bias", None) is not None

    @staticmethod
    def weight_grad_out_in(module: nn.Module) -> Tensor | None:
        grad = layer_weight(module).grad
        return None if grad is None else grad.T


def layer_weight(module: nn.Module) -> Tensor:
    weight = module.weight
    if not isinstance(weight, Tensor):
        raise CaptureError(f"{type(module).__name__} has no weight tensor; it cannot be logged.")
    return weight


def layer_module(model: nn.Module, name: str) -> nn.Module:
    """The module of the logged layer `name` in `model` (`ROOT_LAYER` is the model itself)."""
    if name == ROOT_LAYER and adapter_for(model) is not None:
        return model
    return model.get_submodule(name)


def adapter_for(module: nn.Module) -> type[LayerAdapter] | None:
    for adapter in LayerAdapter.registry:
        if adapter.matches(module):
            return adapter
    return None


# --------------------------------------------------------------------------------------------
# Layer selection.


def select_layers(
    model: nn.Module,
    patterns: tuple[str, ...] | None,
    exclude: tuple[str, ...] = (),
) -> list[tuple[str, nn.Module, type[LayerAdapter]]]:
    """The supported modules whose qualified names match a pattern, in `named_modules` order.

    Raises CaptureError for a pattern that matches no supported layer, naming what it did match.
    """
    supported: list[tuple[str, nn.Module, type[LayerAdapter]]] = []
    unsupported: dict[str, str] = {}
    for name, module in model.named_modules():
        adapter = adapter_for(module)
        if not name and adapter is None:
            continue  # a container root: its layers are its submodules
        if adapter is not None:
            supported.append((name or ROOT_LAYER, module, adapter))
        elif any(True for _ in module.parameters(recurse=False)):
            unsupported[name] = type(module).__name__
    kinds = ", ".join(a.kind for a in LayerAdapter.registry)
    if patterns is None:
        chosen = supported
    else:
        chosen = []
        for pattern in patterns:
            hits = [s for s in supported if fnmatch.fnmatchcase(s[0], pattern)]
            if not hits:
                bad = [f"{n} ({t})" for n, t in unsupported.items() if fnmatch.fnmatchcase(n, pattern)]
                if bad:
                    raise CaptureError(
                        f"module pattern {pattern!r} matches only layers logra cannot log: {', '.join(bad[:5])}. "
                        f"Supported types are {kinds}; drop the pattern or register a LayerAdapter for the type."
                    )
                names = [s[0] for s in supported]
                raise CaptureError(
                    f"module pattern {pattern!r} matches no supported layer. Supported layers in this model "
                    f"({len(names)}): {', '.join(names[:12])}{' ...' if len(names) > 12 else ''}."
                )
            chosen.extend(hits)
        picked = {c[0] for c in chosen}
        chosen = [s for s in supported if s[0] in picked]  # model order, each layer once
    chosen = [s for s in chosen if not any(fnmatch.fnmatchcase(s[0], p) for p in exclude)]
    if not chosen:
        raise CaptureError(
            f"no layer to log in {type(model).__name__}: it has {len(supported)} supported layers ({kinds}) "
            f"and patterns={patterns!r}, exclude={exclude!r} leave none. Adjust LoGraConfig.modules/exclude."
        )
    return chosen
