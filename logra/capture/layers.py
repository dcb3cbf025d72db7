"""The layer table and each layer's projections: what a GradientLogger logs, before any hook runs.

`layer_table` clips each selected layer's requested (k_in, k_out) to its widths and lays out the
columns of a row in model order; `draw_projections` draws a layer's (P_in, P_out), a pure
function of the config and the layer (shared input projections are seeded by width, not name);
`projection_grams` gives P Pᵀ per side, which full-size damping needs (None where it is the
identity); `pca_factors` reads the full-size factors a pca init takes its rows from.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from torch import Tensor, nn

from logra.capture.adapters import LayerAdapter
from logra.capture.projection import SHARED_INPUT, make_projection
from logra.config import LoGraConfig, ProjectionInit
from logra.errors import ConfigError
from logra.store.reader import GradientStore
from logra.types import LayerInfo


def layer_table(
    config: LoGraConfig, selected: list[tuple[str, nn.Module, type[LayerAdapter]]]
) -> tuple[list[LayerInfo], dict[str, Callable[[], tuple[Tensor, Tensor]]]]:
    """The layer table of the selected layers (k clipped to each width, columns in model order) and,
    per layer, the zero-argument function that draws its projections."""
    pca = pca_factors(config) if config.init is ProjectionInit.PCA else {}
    layers: list[LayerInfo] = []
    projections: dict[str, Callable[[], tuple[Tensor, Tensor]]] = {}
    offset = 0
    for name, module, adapter in selected:
        n_in, n_out, has_bias = adapter.widths(module)
        bias = config.include_bias and has_bias
        n_in += int(bias)
        k_in_req, k_out_req = config.k_for(name)
        info = LayerInfo(name, adapter.kind, n_in, n_out, min(k_in_req, n_in), min(k_out_req, n_out), bias, offset)
        offset += info.size
        f_in, f_out = pca.get(name, (None, None))
        source = functools.partial(draw_projections, config, info, f_in, f_out)
        if pca:
            source()  # validate the PCA factors now rather than at the first batch
        layers.append(info)
        projections[name] = source
    return layers, projections


def scaled_projections(
    source: Callable[[], tuple[Tensor, Tensor]], scale_in: Tensor, scale_out: Tensor
) -> tuple[Tensor, Tensor]:
    """(P_in diag(b) (k_in, n_in), P_out diag(a) (k_out, n_out)) from `source`'s (P_in, P_out), float64:
    an optimizer correction (`logra.curvature.optimizer`) folded into the projections. b = `scale_in`
    (n_in,), a = `scale_out` (n_out,)."""
    p_in, p_out = source()
    return p_in * scale_in.to(p_in.dtype), p_out * scale_out.to(p_out.dtype)


def shares_input_projection(config: LoGraConfig) -> bool:
    """Whether layers of equal (n_in, k_in) use one input projection (pca ones are always per layer)."""
    return config.share_input_projection and config.init is not ProjectionInit.PCA


def draw_projections(
    config: LoGraConfig, info: LayerInfo, f_in: Tensor | None, f_out: Tensor | None
) -> tuple[Tensor, Tensor]:
    """(P_in (k_in, n_in), P_out (k_out, n_out)) of one layer, float64 CPU: a pure function of its inputs.

    With a shared input projection, P_in is seeded by (seed, n_in, k_in) alone, not the layer name.
    """
    in_name = SHARED_INPUT if shares_input_projection(config) else info.name
    p_in = make_projection(config.init, config.seed, in_name, "in", info.k_in, info.n_in, f_in)
    p_out = make_projection(config.init, config.seed, info.name, "out", info.k_out, info.n_out, f_out)
    return p_in, p_out


def projection_grams(
    config: LoGraConfig, layers: list[LayerInfo] | tuple[LayerInfo, ...]
) -> dict[str, tuple[Tensor | None, Tensor | None]]:
    """{layer: (P_out P_outᵀ (k_out, k_out), P_in P_inᵀ (k_in, k_in))}, float64 CPU.

    A side is None where its Gram is the identity: orthogonal, identity and pca projections have
    orthonormal rows, and a side with k equal to its width is the identity. Damping in full-size
    units adds λ P Pᵀ to a projected curvature (`logra.curvature.precondition`).
    """
    if config.init.orthonormal_rows:  # gaussian, rademacher and sjlt rows are not orthonormal
        return {layer.name: (None, None) for layer in layers}
    grams: dict[str, tuple[Tensor | None, Tensor | None]] = {}
    for info in layers:
        p_in, p_out = draw_projections(config, info, None, None)
        grams[info.name] = (
            p_out @ p_out.T if info.k_out < info.n_out else None,
            p_in @ p_in.T if info.k_in < info.n_in else None,
        )
    return grams


def pca_factors(config: LoGraConfig) -> dict[str, tuple[Tensor, Tensor]]:
    """Full-size (A, S) factors per layer from the store named by `config.pca_statistics`."""
    assert config.pca_statistics is not None  # guaranteed by LoGraConfig validation
    source = GradientStore.open(config.pca_statistics)
    if source.config.init is not ProjectionInit.IDENTITY:
        raise ConfigError(
            f"pca_statistics={config.pca_statistics!r} was logged with init={source.config.init.value!r}; "
            "PCA projections need a store logged with init='identity' and k at least the layer sizes."
        )
    stats = source.statistics()
    factors = {}
    for layer in source.layers:
        if layer.k_in != layer.n_in or layer.k_out != layer.n_out:
            raise ConfigError(
                f"pca_statistics store logged layer {layer.name!r} at {layer.k_out}x{layer.k_in}, not its full size "
                f"{layer.n_out}x{layer.n_in}; log it with k_in/k_out at least the layer widths."
            )
        factors[layer.name] = (stats[layer.name].input_covariance(), stats[layer.name].grad_covariance())
    return factors
