"""The exception hierarchy of logra.

Every error the library raises on bad input or a bad store derives from :class:`LograError`, so
callers can catch one type. Messages name the offending value, the cause and the fix.
"""

from __future__ import annotations


class LograError(Exception):
    """Base class of every error logra raises on purpose."""


class ConfigError(LograError, ValueError):
    """A configuration value is invalid, or two configurations disagree."""


class CaptureError(LograError, RuntimeError):
    """Gradients could not be captured as asked (no matching layer, no backward, NaN, ...)."""


class StoreError(LograError, OSError):
    """A gradient store cannot be opened, written or resumed as asked."""


class StoreCorruptedError(StoreError):
    """A store's files disagree with its manifest (truncated, altered, missing)."""


class DuplicateIdError(StoreError, ValueError):
    """An example id was logged twice."""


class NonFiniteGradientError(CaptureError, FloatingPointError):
    """A logged gradient contains NaN or Inf."""
