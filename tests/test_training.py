"""Training step: loss formulas, learning, clean-equivalence, modes, compile-once, NaN handling."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tscnc_jax as tj
from tscnc_jax import training


def _np_softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_trades_and_mart_losses_match_hand_computation():
    rng = np.random.default_rng(0)
    clean = rng.standard_normal((5, 4))
    adv = clean + 0.5 * rng.standard_normal((5, 4))
    y = np.array([0, 3, 1, 1, 2])
    p, q = _np_softmax(clean), _np_softmax(adv)
    ce = -np.mean(np.log(p[np.arange(5), y]))
    kl = np.sum(p * (np.log(p) - np.log(q)), axis=1)
    np.testing.assert_allclose(training.trades_loss(clean, adv, y, 6.0), ce + 6.0 * kl.mean(),
                               rtol=1e-5)
    # MART (Wang et al. 2020, eq. 7), written from the paper, without any numerical guard:
    # BCE(p(x'), y) = -log p_y(x') - log(1 - max_{k != y} p_k(x')), plus beta times
    # KL(p(x) || p(x')) (1 - p_y(x)). The implementation's guards (offsets of 1e-4 and below
    # inside the logs) move it by well under rtol.
    ce_adv = -np.log(q[np.arange(5), y])
    other = np.max(np.where(np.eye(4)[y] == 1, 0.0, q), axis=1)
    weighted_kl = kl * (1.0 - p[np.arange(5), y])
    expected = np.mean(ce_adv - np.log(1.0 - other)) + 5.0 * np.mean(weighted_kl)
    np.testing.assert_allclose(training.mart_loss(clean, adv, y, 5.0), expected, rtol=1e-3)
    # Each term matters: without the margin term, or with the KL unweighted, it is off.
    without_margin = np.mean(ce_adv) + 5.0 * np.mean(weighted_kl)
    unweighted = np.mean(ce_adv - np.log(1.0 - other)) + 5.0 * np.mean(kl)
    for wrong in (without_margin, unweighted):
        assert abs(float(training.mart_loss(clean, adv, y, 5.0)) - wrong) > 1e-2 * abs(wrong)


def test_trades_on_a_tiny_model_by_hand():
    """A 2-class linear model: the whole TRADES objective written out with NumPy."""
    w = np.array([[1.0, -1.0], [0.5, 2.0]], np.float32)
    x = np.array([[0.2, 0.7], [0.9, 0.1]], np.float32)
    x_adv = x + np.array([[0.1, -0.1], [-0.1, 0.1]], np.float32)
    y = np.array([1, 0])
    zc, za = x @ w, x_adv @ w
    pc, pa = _np_softmax(zc), _np_softmax(za)
    hand = (-np.log(pc[[0, 1], y]).mean()
            + 2.0 * np.sum(pc * np.log(pc / pa), axis=1).mean())
    np.testing.assert_allclose(training.trades_loss(zc, za, y, 2.0), hand, rtol=1e-5)


def _quadrant_batch(rng, n, side=8):
    """4 classes: which quadrant is bright. Robustly learnable at eps = 0.1."""
    y = rng.integers(0, 4, n)
    x = rng.uniform(0.0, 0.3, (n, side, side, 1)).astype(np.float32)
    h = side // 2
    for i, c in enumerate(y):
        r, q = divmod(int(c), 2)
        x[i, r * h:(r + 1) * h, q * h:(q + 1) * h] += 0.5
    return {"image": np.clip(x, 0, 1), "label": y.astype(np.int32)}


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["pgd_at", "trades", "mart"])
def test_each_loss_learns_robustly(loss):
    model = tj.create_model("mlp", features=(64,), num_classes=4)
    tx = training.make_optimizer(0.05, weight_decay=0.0)
    state = training.create_train_state(model, tx, jax.random.key(0), (8, 8, 1))
    attack = training.default_attack(loss, eps=0.1, steps=5)
    step = jax.jit(training.make_train_step(model, tx, loss=loss, attack=attack, beta=3.0,
                                            ema_decay=None))
    rng = np.random.default_rng(1)
    for _ in range(150):
        state, metrics = step(state, _quadrant_batch(rng, 64))
    assert float(metrics["finite"]) == 1.0
    eval_attack = training.default_attack("pgd_at", eps=0.1, steps=20)
    evaluate = jax.jit(training.make_eval_step(model, use_ema=False, attack=eval_attack))
    sums = evaluate(state, _quadrant_batch(np.random.default_rng(2), 512))
    robust = float(sums["adv_correct"] / sums["count"])
    assert robust > 0.8, (loss, robust)  # chance is 0.25


def test_trades_with_beta_zero_equals_clean_training():
    model = tj.create_model("small_cnn", width=4, num_classes=4)
    tx = training.make_optimizer(0.05, weight_decay=5e-4)
    state0 = training.create_train_state(model, tx, jax.random.key(0), (8, 8, 1))
    attack = training.default_attack("trades", eps=0.1, steps=3)
    clean = jax.jit(training.make_train_step(model, tx, loss="clean"))
    trades = jax.jit(training.make_train_step(model, tx, loss="trades", attack=attack, beta=0.0))
    rng = np.random.default_rng(3)
    a = b = state0
    for _ in range(5):
        batch = _quadrant_batch(rng, 16)
        a, ma = clean(a, batch)
        b, mb = trades(b, batch)
    chex.assert_trees_all_close(a.params, b.params, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(a.ema_params, b.ema_params, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ma["loss"], mb["loss"], rtol=1e-5)


def test_masked_finetuning_compiles_once_and_keeps_sparsity():
    model = tj.create_model("small_cnn", width=4, num_classes=4)
    params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]
    masks = tj.layerwise_magnitude_masks(params, 0.95)
    tx = training.make_optimizer(0.05, cnc_weight=0.01, tsc_weight=1e-4, masks=masks,
                                 cnc_kwargs={"temperature": 0.1, "delta": 1e-2})
    state = training.create_train_state(model, tx, jax.random.key(1), (8, 8, 1), params=params,
                                        masks=masks)
    attack = training.default_attack("trades", eps=0.1, steps=2)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(state, batch):
        return training.make_train_step(model, tx, loss="trades", attack=attack)(state, batch)

    rng = np.random.default_rng(4)
    expected = tj.summarize_sparsity(masks)
    for _ in range(4):
        state, metrics = step(state, _quadrant_batch(rng, 16))
        measured = tj.summarize_sparsity(tj.nonzero_masks(state.params))
        assert measured.num_pruned >= expected.num_pruned
        for tree in (state.params, state.ema_params):
            pruned = [p for _, p, m in tj.named_leaves(tree, masks) if m is not None]
            kept_masks = [m for _, _, m in tj.named_leaves(tree, masks) if m is not None]
            assert len(pruned) == 4
            for p, m in zip(pruned, kept_masks, strict=True):
                assert not np.any(np.asarray(p)[~np.asarray(m)])
    assert {"cnc", "tsc"} <= set(metrics)


def test_score_training_freezes_weights():
    model = tj.create_model("small_cnn", width=4, num_classes=4)
    params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]
    scores = tj.init_scores(params)
    tx = optax.sgd(0.1, momentum=0.9)
    state = training.create_train_state(model, tx, jax.random.key(1), (8, 8, 1), params=params,
                                        scores=scores)
    step = jax.jit(training.make_train_step(model, tx, loss="clean", mode="scores", sparsity=0.9))
    rng = np.random.default_rng(5)
    new = state
    for _ in range(3):
        new, _ = step(new, _quadrant_batch(rng, 16))
    chex.assert_trees_all_equal(new.params, params)
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), new.scores, scores)
    assert any(jax.tree.leaves(changed))
    # Evaluation in score mode is the network pruned by the trained scores' top-k mask.
    evaluate = training.make_eval_step(model, mode="scores", sparsity=0.9)
    batch = _quadrant_batch(rng, 64)
    out = evaluate(new, batch)
    masks = tj.scores_to_masks(new.scores, 0.9)
    logits = model.apply({"params": tj.apply_masks(params, masks)}, batch["image"])
    assert float(out["count"]) == 64
    assert float(out["clean_correct"]) == float(np.sum(np.argmax(logits, -1) == batch["label"]))
    dense = model.apply({"params": params}, batch["image"])
    assert not np.allclose(logits, dense)  # the mask matters: this is not the dense network


def test_non_finite_step_leaves_state_unchanged():
    model = tj.create_model("mlp", features=(8,), num_classes=4)
    tx = training.make_optimizer(0.05)
    state = training.create_train_state(model, tx, jax.random.key(0), (8, 8, 1))
    step = jax.jit(training.make_train_step(model, tx, loss="clean"))
    batch = _quadrant_batch(np.random.default_rng(6), 8)
    batch["image"][0, 0, 0, 0] = np.nan
    new, metrics = step(state, batch)
    assert float(metrics["finite"]) == 0.0
    assert int(new.step) == 1
    chex.assert_trees_all_equal(new.params, state.params)
    chex.assert_trees_all_equal(new.opt_state, state.opt_state)


def test_ema_update_rule():
    ema, params = {"w": jnp.zeros(3)}, {"w": jnp.ones(3)}
    # Warm-up: d = min(0.99, (1 + t) / (10 + t)) -> 0.1 at t = 0.
    np.testing.assert_allclose(training.ema_update(ema, params, jnp.asarray(0), 0.99)["w"], 0.9)
    np.testing.assert_allclose(training.ema_update(ema, params, jnp.asarray(10**6), 0.99)["w"],
                               0.01, rtol=1e-5)


def test_bad_arguments():
    model = tj.create_model("mlp")
    tx = optax.sgd(0.1)
    with pytest.raises(ValueError, match="loss"):
        training.make_train_step(model, tx, loss="fgsm_at")
    with pytest.raises(ValueError, match="attack"):
        training.make_train_step(model, tx, loss="trades")
    with pytest.raises(ValueError, match="sparsity"):
        training.make_train_step(model, tx, loss="clean", mode="scores")
    with pytest.raises(ValueError, match="beta"):
        training.make_train_step(model, tx, loss="clean", beta=-1.0)
    with pytest.raises(ValueError, match="eps"):
        training.default_attack("trades", eps=-0.1)
