"""Shared test fixtures, and a persistent XLA compilation cache for the whole suite."""

import os
import pathlib
import tempfile

# Many tests (and their subprocesses and notebook kernels, which inherit the environment) compile
# the same programs: small models, the same attacks. JAX's persistent cache turns a repeated
# compilation into a file read; entries are keyed by the program, the compile options and the
# jax/jaxlib versions, and an unreadable entry is recompiled with a warning. Set before jax loads.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      str(pathlib.Path(tempfile.gettempdir()) / f"tscnc_jax_xla_{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tscnc_jax

# The suite runs under the XLA:CPU configuration of the experiments and benchmarks (inherited by
# subprocesses and notebook kernels).
tscnc_jax.xla_cpu.set_fast_cpu_flags()


@pytest.fixture
def x64():
    """Runs the test body with float64 enabled (NumPy float64 references need it)."""
    with jax.enable_x64(True):
        yield


def random_with_spectrum(rng: np.random.Generator, m: int, n: int, s: np.ndarray) -> np.ndarray:
    """An ``m x n`` float64 matrix with the given singular values (random singular vectors)."""
    r = min(m, n)
    assert s.shape == (r,)
    u, _ = np.linalg.qr(rng.standard_normal((m, r)))
    v, _ = np.linalg.qr(rng.standard_normal((n, r)))
    return (u * s) @ v.T


def penalty_steps(tx, params, steps: int):
    """``params`` after ``steps`` updates of ``tx`` on zero loss gradients, so that only what
    ``tx`` adds (a penalty's gradient) moves them; one jitted ``lax.scan``."""
    zero = jax.tree.map(jnp.zeros_like, params)

    def body(carry, _):
        p, state = carry
        updates, state = tx.update(zero, state, p)
        return (optax.apply_updates(p, updates), state), None

    (params, _), _ = jax.jit(lambda c: jax.lax.scan(body, c, length=steps))(
        (params, tx.init(params)))
    return params


def random_mask(rng: np.random.Generator, shape, sparsity: float) -> np.ndarray:
    """A 0/1 float mask with exactly ``floor(sparsity * size)`` zeros."""
    size = int(np.prod(shape))
    mask = np.ones(size)
    mask[rng.permutation(size)[: int(np.floor(sparsity * size))]] = 0.0
    return mask.reshape(shape)
