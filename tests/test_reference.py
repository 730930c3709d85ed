"""The reference-AutoAttack harness (benchmarks/reference.py) on a model whose answer is known.

A linear classifier on inputs far from the box's faces: an example is breakable at L-inf radius
``eps`` iff ``min_j (z_y - z_j) / ||w_y - w_j||_1 < eps`` (the box never binds), so the exact robust
accuracy is known and the examples are chosen well away from the boundary (certified radius below
0.5 eps or above 1.6 eps): every sound and adequate attack gets exactly that number, on every
run. Needs torch and torchattacks (benchmark-only dependencies); skipped without them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchattacks")

from benchmarks import reference  # noqa: E402
from tscnc_jax import attacks  # noqa: E402

EPS = 0.1
K, SIDE = 5, 6  # classes, image side (6 x 6 x 1 = 36 features)
# Small budgets (the standard ones would take minutes); the answer does not depend on them here.
OURS = attacks.AutoAttackConfig(apgd_ce_steps=10, apgd_t_steps=10, apgd_t_targets=2,
                                fab_t_steps=10, fab_t_targets=2, square_queries=50,
                                square_rescale_schedule=True)
REF = attacks.AutoAttackConfig(apgd_ce_steps=10, apgd_t_steps=10, apgd_t_targets=2,
                               fab_t_steps=10, fab_t_targets=2, square_queries=50,
                               square_rescale_schedule=False)


def _linear(params, x):
    w, b = params
    return x.reshape(x.shape[0], -1) @ w + b


def _quantised_linear(params, x):
    return _linear(params, jax.lax.stop_gradient(jnp.round(x * 8) / 8))


@pytest.fixture(scope="module")
def problem():
    """``(logits_fn, x, y, exact robust accuracy)``: 40 examples, fixed weights."""
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    w = rng.choice([-1.0, 1.0], (SIDE * SIDE, K)).astype(np.float32)  # class templates
    b = np.zeros(K, np.float32)
    # Each input: 0.5 + a random multiple (0 to 0.2) of a class template + noise, in [0.3, 0.7].
    cls = rng.integers(0, K, 4000)
    a = rng.uniform(0.0, 0.2, (4000, 1))
    x = np.clip(0.5 + a * w.T[cls] + rng.normal(0, 0.03, (4000, SIDE * SIDE)), 0.3, 0.7)
    x = x.reshape(4000, SIDE, SIDE, 1).astype(np.float32)
    z = x.reshape(len(x), -1).astype(np.float64) @ w + b
    y = z.argmax(1)
    w_dist = np.abs(w[:, :, None] - w[:, None, :]).sum(0)  # ||w_i - w_j||_1
    margin = z[np.arange(len(x)), y][:, None] - z
    ratio = margin / np.where(w_dist[y] > 0, w_dist[y], np.inf)
    ratio[np.arange(len(x)), y] = np.inf
    radius = ratio.min(1)  # certified L-inf radius, exact for a linear model without the box
    weak = np.flatnonzero(radius < 0.5 * EPS)[:20]
    strong = np.flatnonzero(radius > 1.6 * EPS)[:20]
    assert len(weak) == 20 and len(strong) == 20
    idx = np.sort(np.concatenate([weak, strong]))
    x, y = x[idx], y[idx].astype(np.int32)
    y[:3] = (y[:3] + 1) % K  # three examples misclassified clean
    exact = float(np.isin(idx, strong)[3:].sum() / len(y))
    return functools.partial(_linear, (w, b)), x, y, exact


def test_ours_never_above_the_reference(problem):
    logits_fn, x, y, exact = problem
    r = reference.compare(logits_fn, x, y, eps=EPS, seed=0, ours=OURS, reference=REF,
                          batch_size=64, sanity_checks=False)
    ours, ref = r["ours"], r["reference"]
    assert ours["clean_accuracy"] == ref["clean_accuracy"] == (len(y) - 3) / len(y)
    # The requirement, and here both sides reach the exact answer.
    assert r["diff_points"] <= reference.TOLERANCE_POINTS and r["within_tolerance"]
    assert ours["final_robust_accuracy"] == pytest.approx(exact)
    assert ref["final_robust_accuracy"] == pytest.approx(exact)
    assert ours["members"] == ref["members"] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    # Cumulative numbers never rise along the cascade.
    for side in (ours, ref):
        accs = [side["robust_accuracy"][m] for m in side["members"]]
        assert accs == sorted(accs, reverse=True)
    # Every adversarial input of both sides is in the threat model.
    assert all(v == 0 for v in ref["violations"].values())
    for side in (ours, ref):
        d = np.abs(side["x_adv"] - x).reshape(len(x), -1).max(1)
        assert d.max() <= EPS + 1e-6
        assert side["x_adv"].min() >= 0.0 and side["x_adv"].max() <= 1.0
        broken = side["clean_correct"] & ~side["robust"]
        assert (d[broken] > 0).all()


def test_reference_budgets_are_autoattacks():
    cfg = reference.REFERENCE
    assert (cfg.apgd_ce_steps, cfg.apgd_ce_restarts, cfg.rho) == (100, 1, 0.75)
    assert (cfg.apgd_t_steps, cfg.apgd_t_targets, cfg.apgd_t_restarts) == (100, 9, 1)
    assert (cfg.fab_t_steps, cfg.fab_t_targets, cfg.fab_t_restarts) == (100, 9, 1)
    assert (cfg.square_queries, cfg.square_p_init, cfg.square_restarts) == (5000, 0.8, 1)
    assert cfg.square_rescale_schedule is False
    bridge = reference.JaxLogits(functools.partial(_linear, (np.zeros((36, 10), np.float32),
                                                             np.zeros(10, np.float32))))
    members = dict(reference.reference_members(bridge, cfg, EPS, 10, seed=3))
    assert list(members) == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert members["apgd-ce"].steps == 100 and members["apgd-ce"].loss == "ce"
    assert members["apgd-t"].steps == 100 and members["apgd-t"].n_target_classes == 9
    assert members["fab-t"].steps == 100 and members["fab-t"].n_target_classes == 9
    assert members["fab-t"].multi_targeted
    sq = members["square"]
    assert (sq.n_queries, sq.p_init, sq.n_restarts, sq.rescale_schedule) == (5000, 0.8, 1, False)
    assert all(m.seed == 3 for m in members.values())


@pytest.mark.parametrize("quantised", [False, True])
def test_bridge_is_the_jax_function(problem, quantised):
    logits_fn, x, y, _ = problem
    if quantised:
        logits_fn = functools.partial(_quantised_linear, logits_fn.args[0])
    bridge = reference.JaxLogits(logits_fn)
    xt = torch.from_numpy(np.ascontiguousarray(x[:11].transpose(0, 3, 1, 2))).requires_grad_()
    out = bridge(xt)
    np.testing.assert_allclose(out.detach().numpy(), np.asarray(logits_fn(x[:11])), rtol=1e-6)
    loss = torch.nn.functional.cross_entropy(out, torch.from_numpy(y[:11]).long(),
                                             reduction="sum")
    (g,) = torch.autograd.grad(loss, xt)

    def jax_loss(z):
        return attacks.cross_entropy_loss(logits_fn(z), jnp.asarray(y[:11])).sum()

    expected = np.asarray(jax.grad(jax_loss)(jnp.asarray(x[:11]))).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(g.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert (np.abs(expected).max() == 0) == quantised  # the quantiser masks the gradient
