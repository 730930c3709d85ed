"""The toy problem the evaluation tests attack: a 64-64-10 ReLU MLP on 8x8x1 inputs.

Ten classes, each a random prototype in [0.2, 0.8] plus Gaussian noise (sigma 0.3), clipped to
[0, 1]. :func:`train` fits the MLP with 200 Adam steps (clean accuracy about 0.95): robust
enough at eps ~0.06 for the attacks to have work, small enough to attack in seconds.
:data:`SMALL_AA` is the AutoAttack configuration the tests attack it with.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tscnc_jax import attacks

# A cheap AutoAttack configuration for the tests (the structure of "standard": all four members,
# smaller budgets).
SMALL_AA = attacks.AutoAttackConfig(
    apgd_ce_steps=10,
    apgd_t_steps=10,
    apgd_t_targets=2,
    fab_t_steps=10,
    fab_t_targets=2,
    square_queries=100,
    square_rescale_schedule=True,
)


def data(key: jax.Array, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` examples ``(x (n, 8, 8, 1) in [0, 1], y (n,))``; the prototypes are fixed."""
    protos = 0.2 + 0.6 * jax.random.uniform(jax.random.key(99), (10, 8, 8, 1))
    k_y, k_n = jax.random.split(key)
    y = jax.random.randint(k_y, (n,), 0, 10)
    x = jnp.clip(protos[y] + 0.3 * jax.random.normal(k_n, (n, 8, 8, 1)), 0.0, 1.0)
    return np.asarray(x), np.asarray(y)


def apply(params: dict, x: jax.Array) -> jax.Array:
    """The MLP's logits."""
    h = jax.nn.relu(x.reshape(x.shape[0], -1) @ params["w1"] + params["b1"])
    return h @ params["w2"] + params["b2"]


def train(seed: int = 0, steps: int = 200) -> dict:
    """Parameters after ``steps`` Adam steps (lr 1e-2, batch 64) on 2,048 examples drawn with
    ``key(seed)``, initialised with ``key(seed + 1)``, batches drawn with NumPy's ``seed``."""
    x_tr, y_tr = data(jax.random.key(seed), 2048)
    k1, k2 = jax.random.split(jax.random.key(seed + 1))
    params = {"w1": jax.random.normal(k1, (64, 64)) / 8.0, "b1": jnp.zeros(64),
              "w2": jax.random.normal(k2, (64, 10)) / 8.0, "b2": jnp.zeros(10)}
    return fit(apply, params, x_tr, y_tr, lr=1e-2, steps=steps, batch=64, seed=seed)


def fit(apply_fn, params, x: np.ndarray, y: np.ndarray, *, lr: float, steps: int, batch: int,
        seed: int):
    """``params`` after ``steps`` Adam steps of the cross-entropy of ``apply_fn(params, x)`` on
    minibatches of ``batch`` examples drawn with replacement (NumPy's ``seed``)."""
    tx = optax.adam(lr)
    opt = tx.init(params)

    @jax.jit
    def step(p, opt, xb, yb):
        g = jax.grad(
            lambda p: optax.softmax_cross_entropy_with_integer_labels(apply_fn(p, xb), yb).mean()
        )(p)
        u, opt = tx.update(g, opt, p)
        return optax.apply_updates(p, u), opt

    rng = np.random.default_rng(seed)
    for _ in range(steps):
        idx = rng.integers(0, len(y), batch)
        params, opt = step(params, opt, x[idx], y[idx])
    return params


def tanh_mlp(scale: float = 1.0):
    """A fixed random 64-32-10 tanh MLP's logits function on 8x8x1 inputs (``key(3)``), logits
    multiplied by ``scale``: an untrained model for the threat-model checks."""
    k1, k2 = jax.random.split(jax.random.key(3))
    w1 = jax.random.normal(k1, (64, 32)) / 8.0
    w2 = jax.random.normal(k2, (32, 10)) / 4.0

    def logits_fn(x):
        return scale * (jnp.tanh(x.reshape(x.shape[0], -1) @ w1 - 0.5) @ w2)

    return logits_fn
