"""The authors'-code structured TSC on gated networks: tree penalty, optax transforms, training."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tscnc_jax as tj
from tscnc_jax import training


def _gated_cnn_params(seed=0, width=4):
    model = tj.create_model("small_cnn", width=width, gated=True)
    variables = model.init({"params": jax.random.key(seed), "gates": jax.random.key(seed + 1)},
                           jnp.zeros((1, 28, 28, 1)))
    return model, variables["params"]


def _reference(kernel, log_alpha, *, form, a=100.0, n=50_000, wd=5e-4, lam0=1e-3, keep=0.7):
    """NumPy float64 transcription of docs/method.md section 4 (gated TSC)."""
    w = np.asarray(kernel, np.float64).reshape(-1, kernel.shape[-1])
    la = np.asarray(log_alpha, np.float64)
    beta, gamma, zeta = 2.0 / 3.0, -0.1, 1.1
    pi = 1.0 / (1.0 + np.exp(-(la - beta * np.log(-gamma / zeta))))
    pi = np.clip(pi, 1e-6, 1 - 1e-6)
    u = pi * (0.5 * (n * wd / keep) * np.sum(w**2, axis=0) + lam0 * w.shape[0])
    denom = a + u if form == "textbook" else a - u
    return np.sum((a + 1) * u / denom) / n


def test_small_cnn_gated_layout():
    model, params = _gated_cnn_params()
    assert set(params) == {"GatedConv_0", "GatedConv_1", "Dense_0", "Dense_1"}
    assert params["GatedConv_0"]["log_alpha"].shape == (4,)
    assert params["GatedConv_1"]["conv"]["kernel"].shape == (3, 3, 4, 8)
    x = jax.random.uniform(jax.random.key(3), (2, 28, 28, 1))
    # Evaluation is deterministic; training draws gates from the "gates" stream.
    np.testing.assert_array_equal(model.apply({"params": params}, x),
                                  model.apply({"params": params}, x))
    a = model.apply({"params": params}, x, train=True, rngs={"gates": jax.random.key(0)})
    b = model.apply({"params": params}, x, train=True, rngs={"gates": jax.random.key(1)})
    assert not np.allclose(a, b)


@pytest.mark.parametrize("form", ["textbook", "authors_code"])
def test_tree_penalty_matches_float64_reference(x64, form):
    del x64
    _, params = _gated_cnn_params()
    params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
    got = tj.gated_sparsity_penalty(params, form=form)
    want = sum(_reference(params[name]["conv"]["kernel"], params[name]["log_alpha"], form=form)
               for name in ("GatedConv_0", "GatedConv_1"))
    np.testing.assert_allclose(float(got), want, rtol=1e-10)
    # The two forms differ (the authors' denominator is a - u) but agree to first order in u/a.
    other = tj.gated_sparsity_penalty(params, form="authors_code" if form == "textbook"
                                      else "textbook")
    assert float(other) != float(got)


def test_tree_penalty_masks_and_errors():
    _, params = _gated_cnn_params()
    masks = jax.tree.map(lambda _: None, params)
    kernel = params["GatedConv_1"]["conv"]["kernel"]
    masks["GatedConv_1"]["conv"]["kernel"] = jnp.zeros_like(kernel)
    masked = tj.gated_sparsity_penalty(params, masks=masks)
    only_first = tj.gated_sparsity_penalty({"GatedConv_0": params["GatedConv_0"]})
    fully_pruned = tj.gated_tsc_penalty(jnp.zeros_like(kernel),
                                        params["GatedConv_1"]["log_alpha"])
    np.testing.assert_allclose(masked, only_first + fully_pruned, rtol=1e-6)
    assert float(tj.gated_sparsity_penalty({"Dense_0": params["Dense_0"]})) == 0.0
    with pytest.raises(ValueError, match="no kernel at 'G/conv/kernel'"):
        tj.gated_sparsity_penalty({"G": {"log_alpha": jnp.zeros(3)}})
    with pytest.raises(ValueError, match="form"):
        tj.add_gated_sparsity_penalty(1.0, form="paper")


def test_transform_adds_weighted_gradient_to_kernels_and_gates():
    _, params = _gated_cnn_params()
    tx = tj.add_gated_sparsity_penalty(0.5, form="authors_code")
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, state = tx.update(zeros, tx.init(params), params)
    grads = jax.grad(lambda p: tj.gated_sparsity_penalty(p, form="authors_code"))(params)
    for u, g in zip(jax.tree.leaves(updates), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(u, 0.5 * g, rtol=1e-6, atol=1e-12)
    assert np.any(np.asarray(updates["GatedConv_0"]["log_alpha"]) != 0)
    assert np.all(np.asarray(updates["Dense_0"]["kernel"]) == 0)
    np.testing.assert_allclose(tj.penalty_values(state)["tsc"],
                               tj.gated_sparsity_penalty(params, form="authors_code"), rtol=1e-6)


def test_clamp_log_alpha_updates_keeps_gates_in_range():
    params = {"g": {"log_alpha": jnp.array([0.0, 4.0, -4.0, 1.0]),
                    "conv": {"kernel": jnp.ones((1, 1, 1, 4))}}}
    updates = {"g": {"log_alpha": jnp.array([10.0, 1.0, -1.0, 0.5]),
                     "conv": {"kernel": jnp.full((1, 1, 1, 4), 7.0)}}}
    tx = tj.clamp_log_alpha_updates()
    new_updates, _ = tx.update(updates, tx.init(params), params)
    new = optax.apply_updates(params, new_updates)
    hi, lo = np.log(100.0), np.log(0.01)
    np.testing.assert_allclose(new["g"]["log_alpha"], [hi, hi, lo, 1.5], rtol=1e-6)
    np.testing.assert_array_equal(new_updates["g"]["conv"]["kernel"], 7.0)
    with pytest.raises(ValueError, match="lo < hi"):
        tj.clamp_log_alpha_updates(1.0, 0.0)


def test_make_optimizer_gated_trains_and_never_decays_gates():
    model, params = _gated_cnn_params()
    tx = training.make_optimizer(0.1, weight_decay=0.5, gated_tsc_weight=0.0, clamp_gates=True)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    np.testing.assert_array_equal(updates["GatedConv_0"]["log_alpha"], 0.0)
    assert np.any(np.asarray(updates["Dense_0"]["kernel"]) != 0)  # decayed

    tx = training.make_optimizer(
        0.05, gated_tsc_weight=1.0, gated_tsc_kwargs={"form": "authors_code"}, clamp_gates=True,
        cnc_weight=1.0, cnc_kwargs={"form": "log_det",
                                    "filter_fn": lambda path, _: path == "Dense_1/kernel"})
    state = training.create_train_state(model, tx, jax.random.key(1), (28, 28, 1), params=params)
    step = jax.jit(training.make_train_step(
        model, tx, loss="trades", attack=training.default_attack("trades", eps=0.1, steps=2)))
    rng = np.random.default_rng(0)
    batch = {"image": rng.uniform(size=(8, 28, 28, 1)).astype(np.float32),
             "label": rng.integers(0, 10, size=8).astype(np.int32)}
    for _ in range(3):
        state, metrics = step(state, batch)
    assert float(metrics["finite"]) == 1.0
    assert float(metrics["tsc"]) > 0 and float(metrics["cnc"]) > 0
    for name in ("GatedConv_0", "GatedConv_1"):
        la = np.asarray(state.params[name]["log_alpha"])
        assert np.all((la >= np.log(0.01) - 1e-6) & (la <= np.log(100.0) + 1e-6))
        assert not np.allclose(la, params[name]["log_alpha"])  # the gates are trained
