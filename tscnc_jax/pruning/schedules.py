r"""Pruning schedules: when masks are recomputed and which sparsity they then have.

A schedule is a small immutable object with two methods, both jit-compatible (``step`` and
``target`` may be traced):

* ``get_sparsity_at_step(target, step)``: the sparsity the masks have *after* the optimizer update
  number ``step`` (0-based: the first update is step 0). It is piecewise constant: between two mask
  updates it keeps the value set at the last one, and it is 0 before the first one.
* ``is_mask_update_step(step)``: whether update number ``step`` recomputes the masks.

Sparsity is the fraction of weights *removed* (``0.99`` keeps 1 %). Every schedule returns exactly
``target`` (the same float32 number) from its last mask update on, so the final masks are computed
with the requested sparsity, not an approximation of it.

Schedules used with :func:`tscnc_jax.pruning.sparsify` must be non-decreasing (all three here are):
masks only shrink, and a pruned weight never comes back.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, Protocol

import jax
import jax.numpy as jnp

from tscnc_jax import _validation

Array = jax.Array


class PruningSchedule(Protocol):
    """What :func:`tscnc_jax.pruning.sparsify` needs from a schedule."""

    def get_sparsity_at_step(self, target: Any, step: Any) -> Array: ...

    def is_mask_update_step(self, step: Any) -> Array: ...


def concrete_float(x: Any, name: str = "value") -> float | None:
    """``float(x)`` for a Python or concrete array scalar; ``None`` for a traced value."""
    if isinstance(x, jax.core.Tracer):
        return None
    try:
        return float(x)
    except TypeError as e:
        raise ValueError(f"`{name}` must be a scalar number, got {x!r}.") from e


def check_sparsity(sparsity: Any, name: str = "sparsity") -> None:
    """Raises ``ValueError`` unless ``0 <= sparsity < 1``; traced values are not checked.

    Sparsity 1 would remove every weight of a layer (a dead network), so it is rejected.
    """
    value = concrete_float(sparsity, name)
    if value is None:
        return
    if not 0.0 <= value < 1.0:  # also rejects NaN
        raise ValueError(
            f"`{name}` is the fraction of weights removed and must satisfy 0 <= {name} < 1; "
            f"got {value!r}."
        )


def _as_float(target: Any) -> Array:
    check_sparsity(target, "target")
    return jnp.asarray(target, jnp.float32)


@dataclasses.dataclass(frozen=True)
class OneShotSchedule:
    """Prunes once, to the target, at update ``step`` (default: the first update).

    ``get_sparsity_at_step(target, t) = target if t >= step else 0``.
    """

    step: int = 0

    def __post_init__(self):
        _validation.check_int("step", self.step, 0)

    def get_sparsity_at_step(self, target: Any, step: Any) -> Array:
        target = _as_float(target)
        return jnp.where(jnp.asarray(step) >= self.step, target, jnp.zeros_like(target))

    def is_mask_update_step(self, step: Any) -> Array:
        return jnp.asarray(step) == self.step


@dataclasses.dataclass(frozen=True)
class IterativeSchedule:
    r"""``num_rounds`` pruning rounds, one every ``round_length`` updates from ``begin_step``.

    Round ``r = 1 .. n`` happens at update ``begin_step + (r - 1) * round_length`` and sets

    * ``spacing="geometric"`` (default): ``s_r = 1 - (1 - target) ** (r / n)``; every round removes
      the same fraction of the weights still alive, as in iterative magnitude pruning
      (Han et al. 2015, arXiv 1506.02626; Frankle and Carbin 2019, arXiv 1803.03635);
    * ``spacing="linear"``: ``s_r = target * r / n``.

    The last round sets exactly ``target``. Training between rounds is the fine-tuning phase.
    """

    num_rounds: int
    round_length: int
    begin_step: int = 0
    spacing: Literal["geometric", "linear"] = "geometric"

    def __post_init__(self):
        _validation.check_int("num_rounds", self.num_rounds, 1)
        _validation.check_int("round_length", self.round_length, 1)
        _validation.check_int("begin_step", self.begin_step, 0)
        if self.spacing not in ("geometric", "linear"):
            raise ValueError(f"`spacing` must be 'geometric' or 'linear', got {self.spacing!r}.")

    @property
    def end_step(self) -> int:
        """The update that runs the last round."""
        return self.begin_step + (self.num_rounds - 1) * self.round_length

    def _rounds_done(self, step: Any) -> Array:
        step = jnp.asarray(step, jnp.int32)
        done = (step - self.begin_step) // self.round_length + 1
        return jnp.where(step >= self.begin_step, jnp.clip(done, 0, self.num_rounds), 0)

    def get_sparsity_at_step(self, target: Any, step: Any) -> Array:
        target = _as_float(target)
        rounds = self._rounds_done(step)
        frac = rounds.astype(jnp.float32) / self.num_rounds
        if self.spacing == "geometric":
            s = 1.0 - jnp.power(1.0 - target, frac)
        else:
            s = target * frac
        s = jnp.where(rounds == 0, 0.0, s)
        return jnp.where(rounds >= self.num_rounds, target, s)

    def is_mask_update_step(self, step: Any) -> Array:
        step = jnp.asarray(step, jnp.int32)
        offset = step - self.begin_step
        return (offset >= 0) & (offset % self.round_length == 0) & (step <= self.end_step)


@dataclasses.dataclass(frozen=True)
class PolynomialSchedule:
    r"""Gradual pruning of Zhu and Gupta (2017, arXiv 1710.01878, eq. 1).

    Masks are recomputed every ``update_freq`` updates from ``begin_step`` (``t_0``) and at
    ``end_step`` (``t_0 + n Delta t``), with

    .. math:: s_t = s_f + (s_i - s_f) \left(1 - \frac{t - t_0}{\mathrm{end} - t_0}\right)^{p},

    ``s_f`` the target, ``s_i = initial_sparsity`` and ``p = power`` (3 in the paper). Between
    updates the sparsity stays at its value from the last update; from ``end_step`` on it is
    exactly ``target``; before ``begin_step`` it is 0 (nothing pruned yet).
    """

    begin_step: int
    end_step: int
    update_freq: int
    power: float = 3.0
    initial_sparsity: float = 0.0

    def __post_init__(self):
        _validation.check_int("begin_step", self.begin_step, 0)
        _validation.check_int("end_step", self.end_step, self.begin_step + 1)
        _validation.check_int("update_freq", self.update_freq, 1)
        if not self.power > 0:
            raise ValueError(f"`power` must be > 0, got {self.power!r}.")
        check_sparsity(self.initial_sparsity, "initial_sparsity")

    def _last_update(self, step: Any) -> Array:
        # The update step whose sparsity is in force at ``step`` (for begin <= step).
        step = jnp.asarray(step, jnp.int32)
        t = self.begin_step + (step - self.begin_step) // self.update_freq * self.update_freq
        return jnp.where(step >= self.end_step, self.end_step, t)

    def get_sparsity_at_step(self, target: Any, step: Any) -> Array:
        target = _as_float(target)
        t = self._last_update(step)
        progress = (t - self.begin_step).astype(jnp.float32) / (self.end_step - self.begin_step)
        s_i = jnp.asarray(self.initial_sparsity, jnp.float32)
        s = target + (s_i - target) * jnp.power(1.0 - progress, self.power)
        s = jnp.where(jnp.asarray(step) >= self.end_step, target, s)
        return jnp.where(jnp.asarray(step) < self.begin_step, jnp.zeros_like(s), s)

    def is_mask_update_step(self, step: Any) -> Array:
        step = jnp.asarray(step, jnp.int32)
        offset = step - self.begin_step
        in_range = (offset >= 0) & (step <= self.end_step)
        return in_range & ((offset % self.update_freq == 0) | (step == self.end_step))
