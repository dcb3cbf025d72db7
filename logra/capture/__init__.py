"""Capture: projected per-example gradients from hooks on a model's layers.

- `adapters`: the supported layer types (a registry of `LayerAdapter`s) and layer selection.
- `projection`: the projection matrices, pure functions of (seed, layer, side, shape, init).
- `hooks`: `LayerCapture`, the forward and tensor hooks that keep only projected tensors.
- `logger`: `GradientLogger`, one logging pass gluing capture, statistics and the store.
"""

from logra.capture.adapters import LayerAdapter, select_layers
from logra.capture.logger import GradientLogger
from logra.capture.projection import make_projection
from logra.capture.rows import Record

__all__ = ["GradientLogger", "LayerAdapter", "Record", "make_projection", "select_layers"]
