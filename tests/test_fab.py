"""Tests of FAB / FAB-T (tscnc_jax.attacks.fab) and of its place in the AutoAttack ensemble:
exact projections and minimal distances against NumPy/SciPy float64 references, the threat-model
contract, determinism and compilation, strength, and the ensemble's bookkeeping."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linprog

from tscnc_jax import attacks as A
from tscnc_jax.attacks.fab import hyperplane_box_step
from tscnc_jax.evaluation import check_adversarial

# ------------------------------------------------------------------------------------------------
# References (NumPy / SciPy, float64).
# ------------------------------------------------------------------------------------------------


def _box_step_reference(p, w, c, bounds, norm):
    """The smallest step ``d`` with ``<w, d> = c`` inside the box, by an independent method:
    L-inf as a linear program (min r s.t. -r <= d <= r), L2 by bisection on the KKT multiplier
    ``lam`` of ``d = clip(lam w, lo - p, hi - p)``. ``None`` where the box misses the hyperplane."""
    lo, hi = bounds
    d_lo, d_hi = lo - p, hi - p
    s = 1.0 if c >= 0 else -1.0
    reach = np.sum(np.where(s * w > 0, d_hi, d_lo) * w * (w != 0))
    if s * reach < abs(c):
        return None
    n = len(p)
    if norm == "linf":
        a_ub = np.block([[np.eye(n), -np.ones((n, 1))], [-np.eye(n), -np.ones((n, 1))]])
        res = linprog(np.r_[np.zeros(n), 1.0], A_ub=a_ub, b_ub=np.zeros(2 * n),
                      A_eq=np.r_[w, 0.0][None], b_eq=[c],
                      bounds=[*zip(d_lo, d_hi, strict=True), (0, None)], method="highs")
        assert res.status == 0
        return res.x[:n]
    a, b = 0.0, 1.0
    while s * (w @ np.clip(b * s * w, d_lo, d_hi)) < abs(c):
        b *= 2
    for _ in range(200):
        m = 0.5 * (a + b)
        a, b = (m, b) if s * (w @ np.clip(m * s * w, d_lo, d_hi)) < abs(c) else (a, m)
    return np.clip(b * s * w, d_lo, d_hi)


# Float32 attacks against float64 references: x + d is rounded to a few ulps of x (~1e-7).
_ATOL = 1e-6


def _dual(v, norm, axis):
    return np.abs(v).sum(axis) if norm == "linf" else np.linalg.norm(v, axis=axis)


def _norms(x_adv, x, norm):
    d = np.asarray(x_adv, np.float64).reshape(len(x), -1) - np.asarray(x, np.float64).reshape(
        len(x), -1)
    return np.abs(d).max(1) if norm == "linf" else np.linalg.norm(d, axis=1)


def _linear_model(k=10, d=16, b=24, seed=0):
    """``z = x W + c`` on inputs in [0.2, 0.8]^d; labels = the clean prediction."""
    rng = np.random.default_rng(seed)
    w_dxk = rng.normal(size=(d, k)).astype(np.float32)
    bias = rng.normal(size=k).astype(np.float32)
    x = rng.uniform(0.2, 0.8, (b, d)).astype(np.float32)
    y = np.argmax(x @ w_dxk + bias, 1).astype(np.int32)
    return (lambda z: z @ w_dxk + bias), w_dxk.astype(np.float64), bias.astype(np.float64), x, y


def _mlp_logits_fn(scale=1.0):
    k1, k2 = jax.random.split(jax.random.key(3))
    w1 = jax.random.normal(k1, (64, 32)) / 8.0
    w2 = jax.random.normal(k2, (32, 10)) / 4.0
    return lambda x: scale * (jnp.tanh(x.reshape(x.shape[0], -1) @ w1 - 0.5) @ w2)


# ------------------------------------------------------------------------------------------------
# (a) Mathematics: the projection, and minimal distances on linear models.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_hyperplane_box_step_is_the_exact_constrained_projection(norm, x64):
    rng = np.random.default_rng(1)
    n, d = 48, 10
    p = rng.uniform(-1.0, 1.0, (n, d))
    p[:, :3] = rng.choice([-1.0, 1.0, 0.97], (n, 3))  # on / near the faces
    w = rng.normal(size=(n, d))
    w[:, 4] = 0.0  # a coordinate the hyperplane ignores
    c = rng.normal(size=n) * rng.choice([0.05, 1.0, 6.0], n)  # both signs, reachable or not
    c[0] = 0.0
    step = np.asarray(hyperplane_box_step(jnp.asarray(p), jnp.asarray(w), jnp.asarray(c),
                                          (-1.0, 1.0), norm))
    n_feasible = 0
    for i in range(n):
        ref = _box_step_reference(p[i], w[i], c[i], (-1.0, 1.0), norm)
        assert np.all(p[i] + step[i] >= -1.0 - 1e-12) and np.all(p[i] + step[i] <= 1.0 + 1e-12)
        if ref is None:  # out of reach: the box corner closest to the hyperplane
            corner = np.where(np.sign(c[i]) * w[i] > 0, 1.0, -1.0)
            np.testing.assert_allclose(p[i] + step[i], np.where(w[i] != 0, corner, p[i]),
                                       atol=1e-12)
            continue
        n_feasible += 1
        np.testing.assert_allclose(w[i] @ step[i], c[i], atol=1e-9)
        if norm == "linf":  # minimisers are not unique: compare the optimal radius
            np.testing.assert_allclose(np.abs(step[i]).max(), np.abs(ref).max(), atol=1e-9)
        else:  # strictly convex: the minimiser is unique
            np.testing.assert_allclose(step[i], ref, atol=1e-9)
    assert 10 < n_feasible < n  # both cases exercised
    assert np.all(step[0] == 0.0)


@pytest.mark.parametrize("targeted", [True, False], ids=["fab-t", "fab"])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_min_norm_on_a_linear_model_is_the_distance_to_the_closest_boundary(norm, targeted):
    # Misclassified = union over j of {z_j >= z_y}: the minimal distance is
    # min_j (z_y - z_j) / ||w_y - w_j||_q, q the dual norm (the box is far: bounds +-10).
    logits_fn, w, bias, x, y = _linear_model()
    z = x.astype(np.float64) @ w + bias
    rows = np.arange(len(y))
    gap = z[rows, y][:, None] - z
    dist = gap / np.maximum(_dual(w[:, y].T[:, :, None] - w[None], norm, 1), 1e-300)
    dist[rows, y] = np.inf
    d_min = dist.min(1)
    kw = {"key": jax.random.key(0), "norm": norm, "bounds": (-10.0, 10.0), "targeted": targeted,
          "n_target_classes": 9 if targeted else None}
    x_adv, norms = A.fab_min_norm(logits_fn, jnp.asarray(x), jnp.asarray(y), steps=30, **kw)
    norms = np.asarray(norms, np.float64)
    np.testing.assert_allclose(norms, _norms(x_adv, x, norm), rtol=1e-5)
    assert np.all(np.argmax(logits_fn(x_adv), 1) != y)
    assert np.all(norms >= d_min - _ATOL)  # nothing beats the minimum ...
    assert np.all(norms <= d_min * 1.01 + _ATOL)  # ... FAB gets within its overshoot eta = 1.05
    # With a small overshoot the first step already lands just past the exact projection.
    _, norms = A.fab_min_norm(logits_fn, jnp.asarray(x), jnp.asarray(y), steps=1, eta=1.001, **kw)
    assert np.all(np.asarray(norms) <= d_min * 1.001 + _ATOL)
    assert np.all(np.asarray(norms) >= d_min - _ATOL)


def _box_problem(norm):
    """A binary linear model ``z_1 - z_0 = <v, x> + b`` on [0, 1]^16 whose clean points sit near
    the faces the boundary lies beyond: the box changes the minimal distance."""
    rng = np.random.default_rng(2)
    d, n = 16, 12
    v = rng.normal(size=d)
    x = np.where(v > 0, rng.uniform(0.95, 1.0, (n, d)), rng.uniform(0.0, 0.05, (n, d)))
    x[:, :4] = rng.uniform(0.3, 0.7, (n, 4))  # a few coordinates with room
    x = x.astype(np.float32)
    margin = rng.uniform(0.3, 0.8, n)
    # Reachable inside the box: the boundary sits at a fraction of the room to the far corner.
    room = np.sum(np.abs(v) * np.where(v > 0, 1.0 - x, x), 1)
    b = -(x.astype(np.float64) @ v) - margin * room
    v32 = v.astype(np.float32)

    def model(b_rows):  # the logits of examples with offsets ``b_rows``
        def logits_fn(z):
            s = z.reshape(z.shape[0], -1) @ v32 + b_rows
            return jnp.stack([jnp.zeros_like(s), s], 1)

        return logits_fn

    ref = []
    for i in range(n):
        step = _box_step_reference(x[i].astype(np.float64), v, -(x[i] @ v + b[i]), (0.0, 1.0),
                                   norm)
        ref.append(np.abs(step).max() if norm == "linf" else np.linalg.norm(step))
    free = np.abs(x.astype(np.float64) @ v + b) / _dual(v, norm, 0)
    return model, b.astype(np.float32), x, np.zeros(n, np.int32), np.asarray(ref), free


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_min_norm_with_the_box_constraint_active(norm):
    model, b, x, y, d_box, d_free = _box_problem(norm)
    assert np.all(d_box > 1.1 * d_free)  # the box matters here
    logits_fn = model(b)
    x_adv, norms = A.fab_min_norm(logits_fn, jnp.asarray(x), jnp.asarray(y),
                                  key=jax.random.key(0), norm=norm, steps=30)
    norms = np.asarray(norms, np.float64)
    assert np.all(np.asarray(x_adv) >= 0.0) and np.all(np.asarray(x_adv) <= 1.0)
    assert np.all(np.argmax(logits_fn(x_adv), 1) == 1)
    assert np.all(norms >= d_box - _ATOL)
    assert np.all(norms <= d_box * 1.01 + _ATOL)
    # The eps-bounded attack: broken just above the minimal distance, never below it.
    run = jax.jit(lambda xi, bi, e: A.fab(model(bi), xi, jnp.zeros(1, jnp.int32),
                                          key=jax.random.key(0), eps=e, norm=norm, steps=30))
    for eps_scale, broken in ((1.02, True), (0.98, False)):
        for i in (0, 5):  # eps is a scalar: one example at a time
            eps = np.float32(d_box[i] * eps_scale)
            out = run(x[i : i + 1], b[i : i + 1], eps)
            assert bool(np.argmax(model(b[i : i + 1])(out), 1)[0] == 1) == broken, (i, eps_scale)
            check_adversarial(x[i : i + 1], out, eps=float(eps), norm=norm)


# ------------------------------------------------------------------------------------------------
# (b) Threat model, and honest outputs.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("norm", "eps", "bounds"),
    [("linf", 0.05, (0.0, 1.0)), ("linf", 0.05, (-1.0, 1.0)), ("l2", 0.7, (0.0, 1.0))],
)
def test_outputs_in_ball_and_bounds_and_misclassified_or_clean(norm, eps, bounds):
    lo, hi = bounds
    x = lo + (hi - lo) * jax.random.uniform(jax.random.key(1), (16, 8, 8, 1))
    x = x.at[:3].set(lo).at[3:6].set(hi)  # examples on the faces of the box
    logits_fn = _mlp_logits_fn(3.0)
    y = jnp.argmax(logits_fn(x), -1).at[6].set(0).at[7].set(1)  # a few already misclassified
    run = jax.jit(lambda x, y, k: A.fab(logits_fn, x, y, key=k, eps=eps, norm=norm,
                                        bounds=bounds, steps=20, restarts=2, n_target_classes=3))
    x_adv = run(x, y, jax.random.key(0))
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    check_adversarial(x, x_adv, eps=eps, norm=norm, bounds=bounds)
    changed = np.any(np.asarray(x_adv != x).reshape(16, -1), 1)
    wrong = np.asarray(jnp.argmax(logits_fn(x_adv), -1) != y)
    clean_wrong = np.asarray(jnp.argmax(logits_fn(x), -1) != y)
    assert np.all(wrong[changed])  # a moved point is really misclassified ...
    assert np.all(~wrong[~changed] | clean_wrong[~changed])  # ... an unmoved one is x itself
    assert np.all(~changed[clean_wrong])  # misclassified clean points are returned as they are
    assert 0 < changed.sum() < 16 - clean_wrong.sum()  # broke some, not all: eps matters


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fab_breaks_whatever_its_min_norm_run_finds_within_eps(norm):
    # Same iterations, fab only adds early stopping and the projection of near misses: every
    # example whose FAB minimal norm is <= eps is broken by fab at eps.
    logits_fn = _mlp_logits_fn(3.0)
    x = jax.random.uniform(jax.random.key(4), (24, 8, 8, 1))
    y = jnp.argmax(logits_fn(x), -1)
    eps = 0.04 if norm == "linf" else 0.4
    kw = {"key": jax.random.key(0), "norm": norm, "steps": 15, "n_target_classes": 3}
    _, norms = A.fab_min_norm(logits_fn, x, y, **kw)
    x_adv = A.fab(logits_fn, x, y, eps=eps, **kw)
    broken = np.asarray(jnp.argmax(logits_fn(x_adv), -1) != y)
    within = np.asarray(norms) <= eps
    assert 0 < within.sum() < len(within)
    assert np.all(broken[within])


# ------------------------------------------------------------------------------------------------
# (c) Determinism and compilation.
# ------------------------------------------------------------------------------------------------


def test_eager_and_jit_agree_and_compile_once():
    traces = []
    base = _mlp_logits_fn(3.0)

    def logits_fn(x):
        traces.append(x.shape)
        return base(x)

    x = jax.random.uniform(jax.random.key(1), (8, 8, 8, 1))
    y = jnp.argmax(base(x), -1)
    kw = {"eps": 0.05, "steps": 8, "restarts": 2, "n_target_classes": 2}
    run = jax.jit(lambda x, y, k: A.fab(logits_fn, x, y, key=k, **kw))
    a = np.asarray(run(x, y, jax.random.key(0)))
    n_traces = len(traces)
    b = np.asarray(run(jax.random.uniform(jax.random.key(2), x.shape), y, jax.random.key(5)))
    assert len(traces) == n_traces  # same shapes: no new trace
    c = np.asarray(A.fab(base, x, y, key=jax.random.key(0), **kw))  # eager
    np.testing.assert_allclose(a, c, atol=1e-6)
    np.testing.assert_array_equal(a, np.asarray(run(x, y, jax.random.key(0))))
    assert not np.array_equal(a, b)


# ------------------------------------------------------------------------------------------------
# (d) Strength on a small random MLP.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("norm", "eps_big"), [("linf", 1.0), ("l2", 8.0)])
def test_large_eps_breaks_everything_and_zero_eps_nothing(norm, eps_big):
    logits_fn = _mlp_logits_fn(3.0)
    x = jax.random.uniform(jax.random.key(5), (32, 8, 8, 1))
    y = jnp.argmax(logits_fn(x), -1)  # all clean-correct
    run = jax.jit(lambda x, y, k, e: A.fab(logits_fn, x, y, key=k, eps=e, norm=norm, steps=20))
    x_big = run(x, y, jax.random.key(0), eps_big)
    assert int(jnp.sum(jnp.argmax(logits_fn(x_big), -1) == y)) <= 1
    x_zero = run(x, y, jax.random.key(0), 0.0)
    np.testing.assert_array_equal(np.asarray(x_zero), np.asarray(x))


# ------------------------------------------------------------------------------------------------
# (e) AutoAttack: members and bookkeeping.
# ------------------------------------------------------------------------------------------------


def test_standard_members_in_autoattack_order_with_reference_budgets():
    assert A.AUTOATTACK_ATTACKS == ("apgd-ce", "apgd-t", "fab-t", "square")
    members = dict(A.autoattack_members("standard", n_classes=10, norm="linf"))
    assert list(members) == ["apgd-ce", "apgd-t", "fab-t", "square"]
    fab_t = members["fab-t"]
    assert fab_t.func is A.fab
    assert fab_t.keywords == {"targeted": True, "steps": 100, "restarts": 1,
                              "n_target_classes": 9}
    assert members["apgd-t"].keywords["n_target_classes"] == 9
    assert members["square"].keywords["n_queries"] == 5000
    assert [n for n, _ in A.autoattack_members("standard", n_classes=10, norm="l2")] == [
        "apgd-ce", "apgd-t", "fab-t", "square"]
    three = dict(A.autoattack_members("standard", n_classes=3))  # no APGD-T below 4 classes
    assert list(three) == ["apgd-ce", "fab-t", "square"]
    assert three["fab-t"].keywords["n_target_classes"] == 2
    assert "fab-t" not in dict(A.autoattack_members("fast", n_classes=10))
    assert A.AUTOATTACK_FAST.fab_t_targets == 0
    assert A.get_attack("fab-t").keywords == {"targeted": True, "steps": 100, "restarts": 1}
    assert A.get_attack("fab").keywords["targeted"] is False
    with pytest.raises(ValueError, match="fab_t_steps"):
        A.AutoAttackConfig(fab_t_steps=0)
    with pytest.raises(ValueError, match="fab_t_targets"):
        A.AutoAttackConfig(fab_t_targets=-1)


def test_auto_attack_credits_fab_t_where_apgd_is_blind():
    # Three classes with a saturated softmax: the cross-entropy gradient underflows to exactly 0
    # (APGD-CE is blind), APGD-T is left out (the targeted DLR loss needs 4 classes). FAB-T steps
    # on the linearised logit differences, whose projection does not depend on the logit scale.
    rng = np.random.default_rng(3)
    w = rng.normal(size=(16, 3)).astype(np.float32)
    x = rng.uniform(0.3, 0.7, (64, 16)).astype(np.float32)
    top2 = np.sort(x @ w, 1)[:, -2:]
    x = x[top2[:, 1] - top2[:, 0] > 0.02][:16]  # exp(-1e4 * 0.02) underflows in float32
    logits_fn = lambda z: 1e4 * (z @ w)
    y = jnp.asarray(np.argmax(x @ w, 1), jnp.int32)
    x = jnp.asarray(x)
    cfg = A.AutoAttackConfig(apgd_ce_steps=10, fab_t_steps=10, square_queries=20,
                             square_rescale_schedule=True)
    assert [n for n, _ in A.autoattack_members(cfg, n_classes=3)] == ["apgd-ce", "fab-t", "square"]
    g = jax.grad(lambda z: A.cross_entropy_loss(logits_fn(z), y).sum())(x)
    assert float(jnp.max(jnp.abs(g))) == 0.0  # honestly blind
    eps = 0.15
    res = jax.jit(lambda x, y, k: A.auto_attack(logits_fn, x, y, key=k, eps=eps, version=cfg))(
        x, y, jax.random.key(0))
    broken_by = np.asarray(res.broken_by)
    fab_idx = A.AUTOATTACK_ATTACKS.index("fab-t")
    assert fab_idx == 2
    assert (broken_by == fab_idx).sum() >= 8, broken_by
    assert (broken_by == A.AUTOATTACK_ATTACKS.index("apgd-ce")).sum() <= 2
    check_adversarial(x, res.x_adv, eps=eps)
    pred = np.asarray(jnp.argmax(logits_fn(res.x_adv), -1))
    np.testing.assert_array_equal(np.asarray(res.robust), pred == np.asarray(y))
    np.testing.assert_array_equal(broken_by >= 0, ~np.asarray(res.robust))
    # FAB-T alone, with the key the ensemble folds for it, breaks what the ensemble credits to it.
    fab_t = dict(A.autoattack_members(cfg, n_classes=3))["fab-t"]
    x_fab = jax.jit(lambda x, y, k: fab_t(logits_fn, x, y, key=k, eps=eps, norm="linf",
                                          bounds=(0.0, 1.0)))(
        x, y, jax.random.fold_in(jax.random.key(0), fab_idx))
    fab_broken = np.asarray(jnp.argmax(logits_fn(x_fab), -1) != y)
    assert np.all(fab_broken[broken_by == fab_idx])


# ------------------------------------------------------------------------------------------------
# Bad input.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"eps": -0.1}, "eps"),
        ({"steps": 0}, "steps"),
        ({"restarts": 0}, "restarts"),
        ({"norm": "l1"}, "norm"),
        ({"eta": 0.9}, "eta"),
        ({"beta": 1.0}, "beta"),
        ({"alpha_max": 0.0}, "alpha_max"),
        ({"n_target_classes": 10}, "n_target_classes"),
    ],
)
def test_bad_arguments(kwargs, match):
    logits_fn = _mlp_logits_fn()
    x = jax.random.uniform(jax.random.key(1), (4, 8, 8, 1))
    y = jnp.arange(4, dtype=jnp.int32)
    with pytest.raises(ValueError, match=match):
        A.fab(logits_fn, x, y, **({"key": jax.random.key(0), "eps": 0.1} | kwargs))
    with pytest.raises(ValueError, match="start_radius"):
        A.fab_min_norm(logits_fn, x, y, key=jax.random.key(0), restarts=2)
