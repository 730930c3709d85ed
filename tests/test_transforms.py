"""optax contracts of the penalty transformations."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import penalty_steps

import tscnc_jax as tj


def _params(seed=0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    return {
        "Conv_0": {"kernel": jax.random.normal(k1, (3, 3, 2, 8)), "bias": jnp.zeros(8)},
        "Dense_0": {"kernel": jax.random.normal(k2, (72, 16)) * 0.1, "bias": jnp.zeros(16)},
        "Dense_1": {"kernel": jax.random.normal(k3, (16, 10)) * 0.3},
    }


def _grads(params, seed=1):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves,
                                                                                        strict=True)])


CNC_KW = dict(temperature=0.2, delta=1e-2)


def _cnc(p):
    return tj.condition_number_penalty(p, **CNC_KW)


def _tsc(p):
    return tj.transformed_sparsity_penalty(p, a=0.5)


@pytest.mark.parametrize(
    "make_tx, penalty",
    [
        (lambda w: tj.add_condition_number_penalty(w, **CNC_KW), _cnc),
        (lambda w: tj.add_transformed_sparsity_penalty(w, a=0.5), _tsc),
    ],
)
def test_added_update_is_weight_times_penalty_gradient(make_tx, penalty):
    params, grads = _params(), _grads(_params())
    tx = make_tx(0.3)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    expected = jax.tree.map(lambda g, p: g + 0.3 * p, grads, jax.grad(penalty)(params))
    chex.assert_trees_all_close(updates, expected, rtol=1e-5, atol=1e-6)


def test_schedule_weight_is_evaluated_at_step_count():
    params, grads = _params(), _grads(_params())
    schedule = optax.linear_schedule(0.0, 1.0, transition_steps=10)
    tx = tj.add_condition_number_penalty(schedule, **CNC_KW)
    state = tx.init(params)
    update = jax.jit(tx.update)
    pen_grad = jax.grad(_cnc)(params)
    for step in range(4):
        updates, state = update(grads, state, params)
        expected = jax.tree.map(lambda g, p, s=step: g + schedule(s) * p, grads, pen_grad)
        chex.assert_trees_all_close(updates, expected, rtol=1e-5, atol=1e-6)
    assert int(state.count) == 4


def test_tscnc_adds_both_gradients():
    params, grads = _params(), _grads(_params())
    tx = tj.tscnc(0.2, 0.05, a=0.5, **CNC_KW)
    updates, _ = tx.update(grads, tx.init(params), params)
    gc, gs = jax.grad(_cnc)(params), jax.grad(_tsc)(params)
    expected = jax.tree.map(lambda g, c, s: g + 0.2 * c + 0.05 * s, grads, gc, gs)
    chex.assert_trees_all_close(updates, expected, rtol=1e-5, atol=1e-6)


def test_penalty_values_recorded_in_state():
    params, grads = _params(), _grads(_params())
    tx = optax.inject_hyperparams(optax.sgd)(0.1)
    tx = optax.chain(tj.tscnc(0.2, 0.05, a=0.5, **CNC_KW), tx)
    state = tx.init(params)
    assert {k: float(v) for k, v in tj.penalty_values(state).items()} == {"cnc": 0.0, "tsc": 0.0}
    _, state = jax.jit(tx.update)(grads, state, params)
    values = tj.penalty_values(state)
    np.testing.assert_allclose(values["cnc"], _cnc(params), rtol=1e-6)
    np.testing.assert_allclose(values["tsc"], _tsc(params), rtol=1e-6)


@pytest.mark.parametrize("weight", [0.0, optax.constant_schedule(0.0)])
def test_zero_weight_is_identity(weight):
    params, grads = _params(), _grads(_params())
    tx = tj.tscnc(weight, weight, a=0.5, **CNC_KW)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    chex.assert_trees_all_equal(updates, grads)


def test_state_stable_and_compiles_once():
    params = _params()
    tx = optax.chain(tj.tscnc(optax.exponential_decay(0.1, 5, 0.5), 1e-3, a=1.0, **CNC_KW),
                     optax.sgd(0.01, momentum=0.9))
    state = tx.init(params)
    struct0 = jax.tree.structure(state)
    dtypes0 = [x.dtype for x in jax.tree.leaves(state)]

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(params, state):
        updates, state = tx.update(_grads(params), state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(5):
        params, state = step(params, state)
    assert jax.tree.structure(state) == struct0
    assert [x.dtype for x in jax.tree.leaves(state)] == dtypes0
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))


def test_params_required():
    params = _params()
    txs = (tj.add_condition_number_penalty(0.1), tj.add_transformed_sparsity_penalty(0.1, a=1.0))
    for tx in txs:
        with pytest.raises(ValueError, match="params"):
            tx.update(params, tx.init(params))


def test_composes_with_masked_and_multi_transform():
    params, grads = _params(), _grads(_params())
    only_dense = jax.tree_util.tree_map_with_path(
        lambda path, _: tj.path_to_str(path).startswith("Dense"), params)
    tx = optax.masked(tj.add_condition_number_penalty(1.0, **CNC_KW), only_dense)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    dense_only = lambda path, w: path.startswith("Dense") and w.ndim >= 2
    expected_pen = jax.grad(lambda p: tj.condition_number_penalty(p, filter_fn=dense_only,
                                                                  **CNC_KW))(params)
    chex.assert_trees_all_close(
        updates, jax.tree.map(lambda g, p: g + p, grads, expected_pen), rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_equal(updates["Conv_0"], grads["Conv_0"])

    labels = jax.tree_util.tree_map_with_path(
        lambda path, _: "penalised" if tj.path_to_str(path).startswith("Dense") else "plain",
        params)
    tx = optax.multi_transform(
        {"penalised": optax.chain(tj.add_transformed_sparsity_penalty(1.0, a=0.5),
                                  optax.sgd(0.1)),
         "plain": optax.sgd(0.1)}, labels)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    tsc_dense = jax.grad(lambda p: tj.transformed_sparsity_penalty(p, a=0.5, filter_fn=dense_only)
                         )(params)
    expected = jax.tree.map(lambda g, p: -0.1 * (g + p), grads, tsc_dense)
    chex.assert_trees_all_close(updates, expected, rtol=1e-5, atol=1e-6)


def test_inject_hyperparams():
    params, grads = _params(), _grads(_params())
    factory = optax.inject_hyperparams(tj.add_condition_number_penalty, static_args=("filter_fn",))
    tx = factory(weight=optax.linear_schedule(1.0, 0.0, 4), temperature=0.2, delta=1e-2,
                 filter_fn=tj.is_kernel)
    state = tx.init(params)
    update = jax.jit(tx.update)
    updates, state = update(grads, state, params)
    chex.assert_trees_all_close(
        updates, jax.tree.map(lambda g, p: g + p, grads, jax.grad(_cnc)(params)),
        rtol=1e-5, atol=1e-6)
    # Hyperparameters can be changed between steps without recompiling.
    state.hyperparams["temperature"] = jnp.asarray(0.5)
    updates, state = update(grads, state, params)
    pen = jax.grad(lambda p: tj.condition_number_penalty(p, temperature=0.5, delta=1e-2))(params)
    chex.assert_trees_all_close(
        updates, jax.tree.map(lambda g, p: g + 0.75 * p, grads, pen), rtol=1e-5, atol=1e-6)


def test_fixed_masks():
    params, grads = _params(), _grads(_params())
    mask = (jax.random.uniform(jax.random.key(5), (72, 16)) > 0.9).astype(jnp.float32)
    masks = jax.tree.map(lambda _: None, params)
    masks["Dense_0"]["kernel"] = mask
    tx = tj.add_condition_number_penalty(1.0, masks=masks, **CNC_KW)
    updates, _ = tx.update(grads, tx.init(params), params)
    delta = np.asarray(updates["Dense_0"]["kernel"] - grads["Dense_0"]["kernel"])
    assert np.all(delta[np.asarray(mask) == 0] == 0)
    assert np.any(delta[np.asarray(mask) == 1] != 0)


def test_bad_hyperparameters_fail_at_construction():
    with pytest.raises(ValueError, match="temperature"):
        tj.add_condition_number_penalty(0.1, temperature=-1.0)
    with pytest.raises(ValueError, match="delta"):
        tj.add_condition_number_penalty(0.1, delta=-1.0)
    with pytest.raises(ValueError, match="weight"):
        tj.add_condition_number_penalty(-0.1)
    with pytest.raises(ValueError, match="`a`"):
        tj.add_transformed_sparsity_penalty(0.1, a=-1.0)
    with pytest.raises(ValueError, match="reduce"):
        tj.tscnc(0.1, 0.1, reduce="median")


def test_toy_run_drives_kappa_below_two():
    """SGD with only the CNC penalty on a random 64x64 matrix: kappa > 100 -> < 2 in 200 steps."""
    w = jax.random.normal(jax.random.key(0), (64, 64)) / 8.0
    params = {"w": w}
    kappa0 = float(tj.condition_number(w))
    assert kappa0 > 100
    tx = optax.chain(tj.add_condition_number_penalty(1.0, temperature=0.1, delta=1e-3),
                     optax.sgd(0.1))
    params = penalty_steps(tx, params, 200)
    kappa = tj.tree_condition_numbers(params)["w"]
    assert kappa < 2.0, (kappa0, kappa)
