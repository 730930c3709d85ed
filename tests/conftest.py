"""Shared test fixtures."""

import jax
import numpy as np
import pytest


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


def random_mask(rng: np.random.Generator, shape, sparsity: float) -> np.ndarray:
    """A 0/1 float mask with exactly ``floor(sparsity * size)`` zeros."""
    size = int(np.prod(shape))
    mask = np.ones(size)
    mask[rng.permutation(size)[: int(np.floor(sparsity * size))]] = 0.0
    return mask.reshape(shape)
