"""What a logging run will cost, said before it starts: row width, bytes, the corpus total, time.

    estimate = estimate_run(logger, examples=len(dataset))      # D, bytes per example, total bytes
    estimate = estimate.timed(examples=24, seconds=1.8)         # from the first timed batches
    print(estimate.describe())
    # 211 layers, row width D=864256, 3.30 MiB per example (bfloat16); 1000000 examples -> 3.14 TiB;
    # 0.075 s per example (timed on 24) -> about 20.8 h

Used by `logra log` (one line before every run, and `--dry-run`) and by `log_trainer`. The
bytes are those of the rows (D × the dtype's size per example); shard id lists, manifests and
Kronecker statistics add well under 1 % for any real corpus.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from logra.capture.logger import GradientLogger


@dataclass(frozen=True)
class RunEstimate:
    """The size (and, once timed, the duration) of logging `examples` examples.

    Attributes:
        layers: logged layers.  dim: the row width D.  itemsize: bytes per stored value.
        dtype: the stored dtype's name.  examples: the corpus size, None when unknown (a stream).
        seconds_per_example: measured on `timed_examples` examples, None before any timing.
    """

    layers: int
    dim: int
    itemsize: int
    dtype: str
    examples: int | None
    seconds_per_example: float | None = None
    timed_examples: int = 0

    @property
    def bytes_per_example(self) -> int:
        return self.dim * self.itemsize

    @property
    def total_bytes(self) -> int | None:
        return None if self.examples is None else self.examples * self.bytes_per_example

    @property
    def total_seconds(self) -> float | None:
        if self.examples is None or self.seconds_per_example is None:
            return None
        return self.examples * self.seconds_per_example

    def timed(self, examples: int, seconds: float) -> RunEstimate:
        """This estimate with the time per example measured on `examples` examples in `seconds`."""
        if examples < 1:
            return self
        return dataclasses.replace(self, seconds_per_example=seconds / examples, timed_examples=examples)

    def describe(self) -> str:
        """One line: layers, D, bytes per example, the corpus total and (when timed) the time."""
        line = (
            f"{self.layers} layers, row width D={self.dim}, {format_bytes(self.bytes_per_example)} per example "
            f"({self.dtype})"
        )
        if self.examples is None:
            line += "; corpus size unknown (a stream): the store grows by that much per example"
        else:
            line += f"; {self.examples} examples -> {format_bytes(self.total_bytes or 0)}"
        if self.seconds_per_example is not None:
            line += f"; {self.seconds_per_example:.3g} s per example (timed on {self.timed_examples})"
            total = self.total_seconds
            if total is not None:
                line += f" -> about {format_seconds(total)}"
        return line


def estimate_run(logger: GradientLogger, examples: int | None) -> RunEstimate:
    """The size of logging `examples` examples with `logger`'s layer table and dtype."""
    dtype = logger.config.dtype
    return RunEstimate(len(logger.layers), logger.dim, dtype.itemsize, dtype.value, examples)


def format_bytes(n: float) -> str:
    """1536 -> '1.50 KiB' (binary units)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024:
            return f"{n:.0f} B" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} PiB"


def format_seconds(s: float) -> str:
    """42 -> '42 s', 5400 -> '1.5 h'."""
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.1f} min"
    if s < 172800:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} days"
