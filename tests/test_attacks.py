"""Tests of tscnc_jax.attacks: analytical worst cases, threat-model contracts, strength, errors."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import toy_mlp
from toy_mlp import SMALL_AA

from tscnc_jax import attacks as A
from tscnc_jax.evaluation import GradientMaskingWarning, check_adversarial, evaluate_robustness

# ------------------------------------------------------------------------------------------------
# Models.
# ------------------------------------------------------------------------------------------------


def _linear_problem(eps_robust: float = 0.05):
    """A 10-class linear classifier on 4x4x1 inputs in [0.3, 0.7] whose only competitor of the label
    (class 0) is class 1; every example keeps margin 0.3 against L-inf eps_robust."""
    d, k, b = 16, 10, 32
    rng = np.random.default_rng(0)
    w_dxk = rng.normal(size=(d, k)).astype(np.float32)
    bias = np.full(k, -50.0, np.float32)
    bias[0] = 0.0
    x = rng.uniform(0.3, 0.7, size=(b, 4, 4, 1)).astype(np.float32)
    diff = w_dxk[:, 0] - w_dxk[:, 1]
    bias[1] = (x.reshape(b, -1) @ diff).min() - eps_robust * np.abs(diff).sum() - 0.3

    def logits_fn(z):
        return z.reshape(z.shape[0], -1) @ w_dxk + bias

    def worst_margin(eps, norm):
        z = x.reshape(b, -1) @ w_dxk + bias
        dw = w_dxk[:, :1] - w_dxk
        pen = np.abs(dw).sum(0) if norm == "linf" else np.linalg.norm(dw, axis=0)
        m = z[:, :1] - z - eps * pen
        m[:, 0] = np.inf
        return m.min(1)

    return logits_fn, jnp.asarray(x), jnp.zeros(b, jnp.int32), worst_margin


def _margin(logits_fn, x, y):
    return -np.asarray(A.margin_loss(logits_fn(x), y))


def _pool(x):  # 2x2 max pooling by reshape (faster backward on XLA:CPU than nn.max_pool)
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class SmallCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = _pool(nn.relu(nn.Conv(8, (3, 3))(x)))
        x = _pool(nn.relu(nn.Conv(16, (3, 3))(x)))
        x = nn.relu(nn.Dense(32)(x.reshape(x.shape[0], -1)))
        return nn.Dense(10)(x)


def _synthetic(key, n, size=16, noise=0.35):
    """10 classes: smooth random prototypes in [0.3, 0.7] plus Gaussian noise, clipped to [0, 1]."""
    protos = 0.3 + 0.4 * jax.random.uniform(jax.random.key(1234), (10, size // 4, size // 4, 1))
    protos = jax.image.resize(protos, (10, size, size, 1), "linear")
    k_y, k_n = jax.random.split(key)
    y = jax.random.randint(k_y, (n,), 0, 10)
    x = jnp.clip(protos[y] + noise * jax.random.normal(k_n, (n, size, size, 1)), 0.0, 1.0)
    return x, y


@pytest.fixture(scope="module")
def cnn():
    """A small CNN trained 300 Adam steps on synthetic 16x16 data (about 92 % clean accuracy)."""
    model = SmallCNN()
    x_tr, y_tr = _synthetic(jax.random.key(0), 4096)
    params = model.init(jax.random.key(1), x_tr[:1])
    params = toy_mlp.fit(model.apply, params, x_tr, y_tr, lr=3e-3, steps=300, batch=64, seed=0)
    x_te, y_te = _synthetic(jax.random.key(7), 128)
    logits_fn = jax.jit(lambda x: model.apply(params, x))
    acc = float(jnp.mean(jnp.argmax(logits_fn(x_te), -1) == y_te))
    assert acc > 0.8, acc
    return logits_fn, x_te, y_te


def _robust_count(logits_fn, x_adv, y):
    return int(jnp.sum(jnp.argmax(logits_fn(x_adv), -1) == y))


# ------------------------------------------------------------------------------------------------
# Analytical worst case of a linear classifier.
# ------------------------------------------------------------------------------------------------

LINF_ATTACKS = {
    "pgd-ce": functools.partial(A.pgd, steps=20),
    "pgd-cw": functools.partial(A.pgd, steps=20, loss="cw"),
    "apgd-ce": functools.partial(A.apgd, steps=30),
    "apgd-cw": functools.partial(A.apgd, steps=30, loss="cw"),
    "apgd-t": functools.partial(A.apgd, steps=30, loss="dlr-targeted", n_target_classes=2),
}


@pytest.mark.parametrize("eps", [0.05, 0.2], ids=["robust", "broken"])
@pytest.mark.parametrize("name", list(LINF_ATTACKS))
def test_linf_reaches_linear_worst_case(name, eps):
    # min over ||d||_inf <= eps of z_y - z_j is  z_y - z_j - eps * ||w_y - w_j||_1.
    logits_fn, x, y, worst = _linear_problem()
    x_adv = LINF_ATTACKS[name](logits_fn, x, y, key=jax.random.key(0), eps=eps)
    np.testing.assert_allclose(_margin(logits_fn, x_adv, y), worst(eps, "linf"), atol=1e-4)
    assert (worst(eps, "linf") > 0).all() == (eps == 0.05)  # both regimes are exercised


@pytest.mark.parametrize("eps", [0.2, 0.5])
def test_l2_apgd_reaches_linear_worst_case(eps):
    logits_fn, x, y, worst = _linear_problem()
    x_adv = A.apgd(logits_fn, x, y, key=jax.random.key(0), eps=eps, norm="l2", steps=50)
    np.testing.assert_allclose(_margin(logits_fn, x_adv, y), worst(eps, "l2"), atol=1e-4)


def test_fgsm_is_exact_on_linear_model():
    # With a single competitor, the CE gradient sign is -sign(w_y - w_1): one step is optimal.
    logits_fn, x, y, worst = _linear_problem()
    x_adv = A.fgsm(logits_fn, x, y, eps=0.05)
    np.testing.assert_allclose(_margin(logits_fn, x_adv, y), worst(0.05, "linf"), atol=1e-4)


# ------------------------------------------------------------------------------------------------
# Threat model: eps-ball and bounds, under jit.
# ------------------------------------------------------------------------------------------------


_mlp_logits_fn = toy_mlp.tanh_mlp


ALL_ATTACKS = {
    "fgsm": A.fgsm,
    "pgd": functools.partial(A.pgd, steps=5, restarts=2),
    "pgd-kl": functools.partial(A.pgd, steps=5, loss="kl", init="normal"),
    "pgd-dlr": functools.partial(A.pgd, steps=5, loss="dlr"),
    "apgd-ce": functools.partial(A.apgd, steps=10, restarts=2),
    "apgd-t": functools.partial(A.apgd_t, steps=10, n_target_classes=2),
    "square": functools.partial(A.square, n_queries=40),
}


@pytest.mark.parametrize(
    ("norm", "eps", "bounds"),
    [("linf", 0.03, (0.0, 1.0)), ("linf", 0.5, (-1.0, 1.0)), ("l2", 0.7, (0.0, 1.0))],
)
@pytest.mark.parametrize("name", list(ALL_ATTACKS))
def test_outputs_in_ball_and_bounds_under_jit(name, norm, eps, bounds):
    lo, hi = bounds
    x = lo + (hi - lo) * jax.random.uniform(jax.random.key(1), (16, 8, 8, 1))
    x = x.at[:4].set(lo).at[4:8].set(hi)  # examples on the faces of the box
    logits_fn = _mlp_logits_fn()
    y = jnp.arange(16, dtype=jnp.int32) % 10
    attack = ALL_ATTACKS[name]
    run = jax.jit(
        lambda x, y, key: attack(logits_fn, x, y, key=key, eps=eps, norm=norm, bounds=bounds)
    )
    x_adv = run(x, y, jax.random.key(0))
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    check_adversarial(x, x_adv, eps=eps, norm=norm, bounds=bounds)
    # The attack moved the points (eps > 0): it is not a no-op.
    assert float(jnp.max(jnp.abs(x_adv - x))) > 0


@pytest.mark.parametrize("name", ["fgsm", "pgd", "apgd-t", "square"])
def test_eps_zero_returns_clean_input(name):
    logits_fn = _mlp_logits_fn()
    x = jax.random.uniform(jax.random.key(1), (8, 8, 8, 1))
    y = jnp.arange(8, dtype=jnp.int32)
    x_adv = ALL_ATTACKS[name](logits_fn, x, y, key=jax.random.key(0), eps=0.0)
    np.testing.assert_array_equal(np.asarray(x_adv), np.asarray(x))


def test_eps_may_be_traced():
    logits_fn = _mlp_logits_fn()
    x = jax.random.uniform(jax.random.key(1), (8, 8, 8, 1))
    y = jnp.arange(8, dtype=jnp.int32)
    run = jax.jit(lambda x, y, key, eps: A.apgd(logits_fn, x, y, key=key, eps=eps, steps=5))
    for eps in (0.01, 0.1):
        check_adversarial(x, run(x, y, jax.random.key(0), eps), eps=eps)


@pytest.mark.parametrize("attack", [A.pgd, A.apgd])
def test_x_init_is_the_first_start(attack):
    logits_fn = _mlp_logits_fn()
    x = jax.random.uniform(jax.random.key(1), (8, 8, 8, 1))
    y = jnp.arange(8, dtype=jnp.int32)
    x_init = x + 0.3 * jax.random.normal(jax.random.key(2), x.shape)  # projected by the attack
    kw = {"key": jax.random.key(0), "eps": 0.1, "steps": 1, "x_init": x_init}
    expected = np.asarray(A.project(x_init, x, 0.1, "linf", (0.0, 1.0)))
    if attack is A.pgd:  # a zero step keeps the start: the output is the projected x_init
        out = attack(logits_fn, x, y, step_size=0.0, init="none", **kw)
        np.testing.assert_array_equal(np.asarray(out), expected)
    else:  # the first APGD step from x_init differs from the one from a random start
        out = attack(logits_fn, x, y, **kw)
        other = attack(logits_fn, x, y, **(kw | {"x_init": None}))
        assert not np.array_equal(np.asarray(out), np.asarray(other))
        check_adversarial(x, out, eps=0.1)
    with pytest.raises(ValueError, match="x_init"):
        attack(logits_fn, x, y, key=jax.random.key(0), eps=0.1, x_init=x_init[:4])


def test_square_flat_inputs():
    logits_fn = _mlp_logits_fn()
    x = jax.random.uniform(jax.random.key(1), (8, 64))
    y = jnp.arange(8, dtype=jnp.int32)
    flat_fn = lambda z: logits_fn(z.reshape(-1, 8, 8, 1))
    x_adv = A.square(flat_fn, x, y, key=jax.random.key(0), eps=0.1, n_queries=30)
    check_adversarial(x, x_adv, eps=0.1)


# ------------------------------------------------------------------------------------------------
# Monotonicity in eps, and eps = 1.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["pgd", "apgd-ce", "square"])
def test_success_monotone_in_eps_and_total_at_eps_one(name):
    logits_fn = _mlp_logits_fn(scale=3.0)
    x = jax.random.uniform(jax.random.key(5), (64, 8, 8, 1))
    y = jnp.argmax(logits_fn(x), -1)  # all clean-correct
    attack = {
        "pgd": functools.partial(A.pgd, steps=20),
        "apgd-ce": functools.partial(A.apgd, steps=20),
        "square": functools.partial(A.square, n_queries=300),
    }[name]
    run = jax.jit(lambda x, y, key, eps: attack(logits_fn, x, y, key=key, eps=eps))
    robust = []
    for eps in (0.0, 0.01, 0.03, 0.1, 0.3, 1.0):
        robust.append(_robust_count(logits_fn, run(x, y, jax.random.key(0), eps), y))
    assert robust[0] == 64
    assert all(a >= b for a, b in zip(robust, robust[1:], strict=False)), robust
    assert robust[-1] == 0, robust  # at eps = 1 on [0, 1] every input is reachable
    assert robust[2] < 64  # the attacks do something at small eps


# ------------------------------------------------------------------------------------------------
# Strength on a small trained CNN.
# ------------------------------------------------------------------------------------------------


def test_apgd_ce_at_least_as_strong_as_pgd_same_budget(cnn):
    # Same budget: 10 gradient steps, 1 restart. On this small, nearly linear model both attacks
    # are close (1-2 examples per setting), so robust counts are summed over 3 radii x 2 keys.
    logits_fn, x, y = cnn
    steps = 10
    pgd_run = jax.jit(lambda x, y, k, e: A.pgd(logits_fn, x, y, key=k, eps=e, steps=steps))
    apgd_run = jax.jit(lambda x, y, k, e: A.apgd(logits_fn, x, y, key=k, eps=e, steps=steps))
    n_pgd = n_apgd = 0
    for eps in (0.03, 0.05, 0.06):
        for s in range(2):
            n_pgd += _robust_count(logits_fn, pgd_run(x, y, jax.random.key(s), eps), y)
            n_apgd += _robust_count(logits_fn, apgd_run(x, y, jax.random.key(s), eps), y)
    clean = _robust_count(logits_fn, x, y)
    assert n_apgd <= n_pgd, (n_apgd, n_pgd)
    assert n_apgd < 6 * clean * 0.5  # the attacks are effective at these radii


def test_ensemble_not_weaker_than_members(cnn):
    logits_fn, x, y = cnn
    eps = 0.03
    key = jax.random.key(0)
    res = jax.jit(lambda x, y, k: A.auto_attack(logits_fn, x, y, key=k, eps=eps, version=SMALL_AA))(
        x, y, key
    )
    members = dict(A.autoattack_members(SMALL_AA, n_classes=10))
    assert list(members) == list(A.AUTOATTACK_ATTACKS)
    n_ens = int(res.robust.sum())
    check_adversarial(x, res.x_adv, eps=eps)
    # Robust flag agrees with the returned inputs; broken_by is consistent.
    pred = jnp.argmax(logits_fn(res.x_adv), -1)
    np.testing.assert_array_equal(np.asarray(res.robust), np.asarray(pred == y))
    np.testing.assert_array_equal(
        np.asarray(res.clean_correct), np.asarray(jnp.argmax(logits_fn(x), -1) == y)
    )
    assert np.all((np.asarray(res.broken_by) >= 0) == np.asarray(res.clean_correct & ~res.robust))
    # Each member alone (same key folding as the ensemble) is no stronger than the ensemble.
    for i, (name, attack) in enumerate(members.items()):
        x_m = attack(
            logits_fn, x, y, key=jax.random.fold_in(key, i), eps=eps, norm="linf", bounds=(0.0, 1.0)
        )
        assert n_ens <= _robust_count(logits_fn, x_m, y), name
    assert n_ens < int(res.clean_correct.sum())


def test_square_breaks_without_gradients(cnn):
    logits_fn, x, y = cnn
    # Gradients of this model are zero: gradient attacks are blind, Square is not.
    no_grad_fn = lambda z: logits_fn(jax.lax.stop_gradient(z))
    clean = _robust_count(logits_fn, x, y)
    x_sq = A.square(no_grad_fn, x, y, key=jax.random.key(0), eps=0.05, n_queries=300)
    x_pgd = A.pgd(no_grad_fn, x, y, key=jax.random.key(0), eps=0.05, steps=10, init="none")
    check_adversarial(x, x_sq, eps=0.05)
    assert _robust_count(logits_fn, x_sq, y) < 0.6 * clean
    assert _robust_count(logits_fn, x_pgd, y) == clean


def test_evaluate_masked_model_warns(cnn):
    logits_fn, x, y = cnn
    no_grad_fn = lambda z: logits_fn(jax.lax.stop_gradient(z))
    with pytest.warns(GradientMaskingWarning):
        report = evaluate_robustness(
            no_grad_fn,
            [(x, y)],
            eps=0.05,
            attacks={
                "pgd": functools.partial(A.pgd, steps=10),
                "square": functools.partial(A.square, n_queries=200),
            },
        )
    text = " ".join(report.warnings)
    assert "black-box 'square'" in text and "square_restarts=2" in text
    assert "did not increase" in text
    assert report.robust_accuracy["square"] < report.robust_accuracy["pgd"]
    # What the warning suggests: a second Square run on the survivors (its first run is the one
    # above, the same keys) can only break more.
    again = evaluate_robustness(
        no_grad_fn, [(x, y)], eps=0.05, sanity_checks=False,
        attacks={"pgd": functools.partial(A.pgd, steps=10),
                 "square": functools.partial(A.square, n_queries=200, restarts=2)})
    robust_once = report.clean_correct & (report.broken_by < 0)
    robust_twice = again.clean_correct & (again.broken_by < 0)
    assert robust_twice.sum() > 0 and not np.any(robust_twice & ~robust_once)


# ------------------------------------------------------------------------------------------------
# Determinism and compilation.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["pgd", "apgd-ce", "apgd-t", "square"])
def test_deterministic_for_fixed_key(name):
    logits_fn = _mlp_logits_fn()
    x = jax.random.uniform(jax.random.key(1), (8, 8, 8, 1))
    y = jnp.arange(8, dtype=jnp.int32)
    attack = ALL_ATTACKS[name]
    run = jax.jit(lambda x, y, key: attack(logits_fn, x, y, key=key, eps=0.05))
    a = np.asarray(run(x, y, jax.random.key(0)))
    b = np.asarray(run(x, y, jax.random.key(0)))
    c = np.asarray(attack(logits_fn, x, y, key=jax.random.key(0), eps=0.05))  # eager
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, c, atol=1e-6)  # eager and jitted runs agree
    d = np.asarray(run(x, y, jax.random.key(1)))
    assert not np.array_equal(a, d)  # the key matters


def test_compiles_once_per_shape():
    traces = []
    base = _mlp_logits_fn()

    def logits_fn(x):
        traces.append(x.shape)
        return base(x)

    run = jax.jit(
        lambda x, y, key: A.auto_attack(logits_fn, x, y, key=key, eps=0.05, version=SMALL_AA)
    )
    y = jnp.arange(8, dtype=jnp.int32)
    run(jax.random.uniform(jax.random.key(1), (8, 8, 8, 1)), y, jax.random.key(0))
    n_first = len(traces)
    assert n_first > 0
    for s in range(2, 4):
        run(jax.random.uniform(jax.random.key(s), (8, 8, 8, 1)), y, jax.random.key(s))
    assert len(traces) == n_first
    run(jax.random.uniform(jax.random.key(1), (4, 8, 8, 1)), y[:4], jax.random.key(0))
    assert len(traces) == 2 * n_first  # a new shape traces again, once


# ------------------------------------------------------------------------------------------------
# Pieces.
# ------------------------------------------------------------------------------------------------


def test_apgd_checkpoints_reference_schedule():
    is_ckpt, window = A.apgd_checkpoints(100)
    # Intervals 22, 19, 16, 13, 10, 7, then 6 (p_1 = 0.22, shrinking by 0.03 down to 0.06).
    ends = np.flatnonzero(is_ckpt)
    np.testing.assert_array_equal(ends[:8], [21, 40, 56, 69, 79, 86, 92, 98])
    np.testing.assert_array_equal(window[ends[:8]], [22, 19, 16, 13, 10, 7, 6, 6])
    assert A.apgd_checkpoints(1)[0].tolist() == [True]


def test_square_p_schedule():
    p = A.square_p_schedule(10000, 0.8, rescale=False)
    assert p[10] == 0.8 and p[11] == 0.4 and p[51] == 0.2 and p[9999] == 0.8 / 512
    q = A.square_p_schedule(1000, 0.8, rescale=True)
    assert q[1] == 0.8 and q[2] == 0.4 and q[999] == 0.8 / 512
    assert A.square_p_schedule(5000, 0.8, rescale=False)[4999] == 0.8 / 128


def test_losses_match_definitions():
    z = jnp.array([[3.0, 1.0, 2.0, -1.0, 0.5], [0.0, 4.0, 1.0, 2.0, -3.0]])
    y = jnp.array([0, 0])
    np.testing.assert_allclose(A.margin_loss(z, y), [2.0 - 3.0, 4.0 - 0.0])
    np.testing.assert_allclose(
        A.cross_entropy_loss(z, y), jax.nn.logsumexp(z, axis=1) - z[:, 0], rtol=1e-6
    )
    # DLR: -(z_y - max_other) / (z_pi1 - z_pi3); invariant to shift and scale.
    np.testing.assert_allclose(A.dlr_loss(z, y), [-(3 - 2) / (3 - 1), -(0 - 4) / (4 - 1)])
    np.testing.assert_allclose(A.dlr_loss(5 * z + 7, y), A.dlr_loss(z, y), rtol=1e-5)
    t = jnp.array([2, 3])
    np.testing.assert_allclose(
        A.dlr_loss(z, y, t), [-(3 - 2) / (3 - (1 + 0.5) / 2), -(0 - 2) / (4 - (1 + 0) / 2)]
    )
    np.testing.assert_allclose(A.kl_loss(z, z), [0.0, 0.0], atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Bad input.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"eps": -0.1}, "eps"),
        ({"eps": float("nan")}, "eps"),
        ({"steps": 0}, "steps"),
        ({"steps": 2.5}, "steps"),
        ({"restarts": 0}, "restarts"),
        ({"norm": "l1"}, "norm"),
        ({"loss": "hinge"}, "loss"),
        ({"bounds": (1.0, 0.0)}, "bounds"),
        ({"init": "zeros"}, "init"),
        ({"step_size": -1.0}, "step_size"),
    ],
)
def test_pgd_bad_arguments(kwargs, match):
    logits_fn = _mlp_logits_fn()
    x = jax.random.uniform(jax.random.key(1), (4, 8, 8, 1))
    y = jnp.arange(4, dtype=jnp.int32)
    args = {"key": jax.random.key(0), "eps": 0.1} | kwargs
    with pytest.raises(ValueError, match=match):
        A.pgd(logits_fn, x, y, **args)


def test_bad_data_and_other_attacks():
    logits_fn = _mlp_logits_fn()
    x = jax.random.uniform(jax.random.key(1), (4, 8, 8, 1))
    y = jnp.arange(4, dtype=jnp.int32)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="labels"):
        A.apgd(logits_fn, x, y.at[0].set(10), key=key, eps=0.1)
    with pytest.raises(ValueError, match="labels"):
        A.pgd(logits_fn, x, y.at[0].set(-1), key=key, eps=0.1)
    with pytest.raises(ValueError, match="bounds"):
        A.pgd(logits_fn, x + 1.5, y, key=key, eps=0.1)
    with pytest.raises(ValueError, match="bounds"):
        A.square(logits_fn, x - 0.5, y, key=key, eps=0.1)
    with pytest.raises(ValueError, match="`y`"):
        A.fgsm(logits_fn, x, y[:3], eps=0.1)
    with pytest.raises(ValueError, match="integer"):
        A.fgsm(logits_fn, x, y.astype(jnp.float32), eps=0.1)
    with pytest.raises(ValueError, match="n_target_classes"):
        A.apgd_t(logits_fn, x, y, key=key, eps=0.1, n_target_classes=10)
    with pytest.raises(ValueError, match="rho"):
        A.apgd(logits_fn, x, y, key=key, eps=0.1, rho=1.5)
    with pytest.raises(ValueError, match="n_queries"):
        A.square(logits_fn, x, y, key=key, eps=0.1, n_queries=0)
    with pytest.raises(ValueError, match="version"):
        A.auto_attack(logits_fn, x, y, key=key, eps=0.1, version="plus")
    with pytest.raises(ValueError, match="logits"):
        A.pgd(lambda z: z.reshape(4, -1)[:, :1], x, y, key=key, eps=0.1)
    with pytest.raises(ValueError, match="classes"):  # targeted DLR needs 4 classes
        A.apgd_t(lambda z: logits_fn(z)[:, :3], x, y % 3, key=key, eps=0.1)
    with pytest.raises(ValueError, match="unknown attack"):
        A.get_attack("fab-l1")
    # Under jit the data-dependent checks are skipped (no error, no host sync).
    jax.jit(lambda x, y: A.pgd(logits_fn, x, y, key=key, eps=0.1, steps=2))(x + 1.5, y)


@pytest.mark.parametrize("loss", ["ce", "dlr-targeted"])
def test_apgd_run_stops_once_the_whole_batch_is_broken(loss):
    """Forward passes counted by a callback: the full budget while an example is robust, only the
    starting point's once every example is misclassified from the start."""
    logits_fn, x, y_robust, _ = _linear_problem(eps_robust=0.05)
    calls = []

    def counted(z):
        jax.debug.callback(lambda: calls.append(1))
        return logits_fn(z)

    steps = 12
    attack = jax.jit(lambda yy: A.apgd(counted, x, yy, key=jax.random.key(0), eps=0.01,
                                       steps=steps, loss=loss, n_target_classes=1))
    x_adv = jax.block_until_ready(attack(y_robust))  # label 0: robust at eps 0.01
    clean_calls = 1 if loss == "dlr-targeted" else 0  # APGD-T reads the clean logits first
    assert len(calls) == clean_calls + 1 + steps
    np.testing.assert_array_less(np.abs(np.asarray(x_adv - x)), 0.01 + 1e-6)
    calls.clear()
    y_wrong = jnp.full_like(y_robust, 2)  # class 0 wins everywhere: misclassified at the start
    jax.block_until_ready(attack(y_wrong))
    assert len(calls) == clean_calls + 1
