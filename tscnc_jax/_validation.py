"""Argument checks shared by the library: each raises ``ValueError`` naming the argument.

Checks of *concrete* values only: a traced value (an argument under ``jit``, a schedule's
output) cannot be inspected and passes through, except for what its shape already tells.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def is_tracer(value: Any) -> bool:
    """Whether ``value`` is a JAX tracer (its value is unknown until run)."""
    return isinstance(value, jax.core.Tracer)


def check_int(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` as a Python int; ``ValueError`` unless it is an integer (not a bool) >=
    ``minimum``."""
    if isinstance(value, bool):
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")
    try:
        as_int = operator.index(value)
    except TypeError:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}.") from None
    if as_int < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")
    return as_int


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    """``value`` lower-cased; ``ValueError`` unless it is one of ``choices`` (any case)."""
    if not isinstance(value, str) or value.lower() not in choices:
        raise ValueError(f"`{name}` must be one of {choices}; got {value!r}.")
    return value.lower()


def check_positive_float(name: str, value: Any) -> float:
    """``value`` as a float; ``ValueError`` unless it is finite and > 0."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"`{name}` must be a positive float; got {value!r}.") from None
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"`{name}` must be a positive finite float; got {value!r}.")
    return v


def check_nonnegative(name: str, value: Any, *, strict: bool = False) -> None:
    """Raises ``ValueError`` if a concrete scalar ``value`` is negative (or zero when ``strict``).

    Traced values (e.g. a schedule's output under ``jit``) and callables (schedules) pass.
    """
    if value is None or is_tracer(value) or callable(value):
        return
    v = np.asarray(value)
    if v.ndim != 0:
        raise ValueError(f"`{name}` must be a scalar, got shape {v.shape}.")
    if not np.isfinite(v) or v < 0 or (strict and v == 0):
        bound = "> 0" if strict else ">= 0"
        raise ValueError(f"`{name}` must be finite and {bound}, got {float(v)!r}.")


def check_kernel(kernel: Any, name: str = "kernel") -> jax.Array:
    """``kernel`` as an array; ``ValueError`` unless it is floating with ndim >= 2."""
    kernel = jnp.asarray(kernel)
    if not jnp.issubdtype(kernel.dtype, jnp.floating):
        raise ValueError(f"`{name}` must have a floating dtype, got {kernel.dtype}.")
    if kernel.ndim < 2:
        raise ValueError(
            f"`{name}` must have ndim >= 2 (a Dense (in, out) or Conv (..., c_in, c_out) kernel), "
            f"got shape {tuple(kernel.shape)}."
        )
    return kernel
