"""Tests of AutoAttack's checks (tscnc_jax.evaluation.autoattack_checks, run by
evaluate_robustness) and of AutoAttack's "rand" version: APGD with Expectation over
Transformation on a stochastic ``logits_fn(x, key)``."""

from __future__ import annotations

import functools
import itertools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import toy_mlp

from tscnc_jax import attacks as A
from tscnc_jax.attacks._common import make_eot_value_and_grad
from tscnc_jax.evaluation import (
    AutoAttackCheckWarning,
    GradientMaskingWarning,
    autoattack_checks,
    check_adversarial,
    evaluate_robustness,
)

# ------------------------------------------------------------------------------------------------
# A small trained model, and models built to trip each check.
# ------------------------------------------------------------------------------------------------


_apply = toy_mlp.apply


def _noisy_apply(p, x, key, sigma=0.1):
    """The MLP on inputs with Gaussian noise: a randomised model with an explicit key."""
    return _apply(p, x + sigma * jax.random.normal(key, x.shape, x.dtype))


@pytest.fixture(scope="module")
def mlp():
    """The toy MLP's parameters (``tests/toy_mlp.py``) and 48 test examples."""
    x, y = toy_mlp.data(jax.random.key(2), 48)
    return toy_mlp.train(0), x, y


def _one(notes, *words):
    """The single note that contains all of ``words``."""
    hits = [n for n in notes if all(w in n for w in words)]
    assert len(hits) == 1, (words, notes)
    return hits[0]


# ------------------------------------------------------------------------------------------------
# The checks.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm, eps", [("linf", 0.05), ("l2", 0.5)])
def test_plain_model_triggers_no_check(mlp, norm, eps):
    params, x, y = mlp
    logits_fn = functools.partial(_apply, params)
    assert autoattack_checks(logits_fn, x, y, eps=eps, norm=norm) == ()
    assert autoattack_checks(jax.jit(logits_fn), x, y, eps=eps, norm=norm, attacks="fast") == ()
    # A randomised model whose randomness all comes from its key passes the stochastic checks.
    noisy = functools.partial(_noisy_apply, params)
    assert autoattack_checks(noisy, x, y, eps=eps, norm=norm, attacks="rand",
                             stochastic=True) == ()


def test_randomness_check_flags_a_dropout_like_model(mlp):
    """Dropout at test time, its key from a Python counter in a non-jitted logits_fn: every call
    draws another mask; the note points to the key-taking model and version='rand'."""
    params, x, y = mlp
    counter = itertools.count()

    def dropout_fn(z):
        keep = jax.random.bernoulli(jax.random.key(next(counter)), 0.8, z.shape)
        return _apply(params, z * keep / 0.8)

    note = _one(autoattack_checks(dropout_fn, x, y, eps=0.05), "differ between 5 calls")
    assert "stochastic=True" in note and "attacks='rand'" in note

    # A NumPy RNG, and a change too small to flip a prediction: the normalised logits differ by
    # more than the reference's 1e-4.
    rng = np.random.default_rng(0)
    tiny = lambda z: _apply(params, z) + jnp.asarray(1e-3 * rng.standard_normal((len(z), 10)),
                                                      jnp.float32)
    _one(autoattack_checks(tiny, x, y, eps=0.05), "differ between 5 calls")


def test_randomness_checks_of_a_stochastic_model(mlp):
    params, x, y = mlp
    rng = np.random.default_rng(0)

    def hidden(z, key):  # part of its randomness is not drawn from the key
        noise = jnp.asarray(0.1 * rng.standard_normal(z.shape), z.dtype)
        return _noisy_apply(params, z + noise, key)

    notes = autoattack_checks(hidden, x, y, eps=0.05, attacks="rand", stochastic=True)
    assert "does not come from the key" in _one(notes, "same key")
    ignores_key = lambda z, key: _apply(params, z)
    notes = autoattack_checks(ignores_key, x, y, eps=0.05, attacks="rand", stochastic=True)
    _one(notes, "do not depend on its key")


def test_softmax_outputs_are_flagged(mlp):
    params, x, y = mlp
    probs = lambda z: jax.nn.softmax(_apply(params, z), axis=-1)
    assert "logits" in _one(autoattack_checks(probs, x, y, eps=0.05), "probabilities")
    # Log-probabilities are logits up to a per-example shift: fine.
    log_probs = lambda z: jax.nn.log_softmax(_apply(params, z), axis=-1)
    assert autoattack_checks(log_probs, x, y, eps=0.05) == ()


@pytest.mark.parametrize("norm, eps", [("linf", 0.05), ("l2", 0.5)])
def test_zero_gradients_of_an_input_quantiser_are_flagged(mlp, norm, eps):
    params, x, y = mlp
    quantised = lambda z: _apply(params, jax.lax.stop_gradient(jnp.round(z * 4) / 4))
    note = _one(autoattack_checks(quantised, x, y, eps=eps, norm=norm), "gradient masking")
    assert "DLR loss is zero" in note and "quantiser" in note


def test_saturated_cross_entropy_is_flagged_apart_from_masking(mlp):
    """Logits scaled by 1000: the softmax saturates, the cross-entropy's gradient underflows to 0
    while the (scale-free) DLR loss still has one."""
    params, x, y = mlp
    huge = lambda z: 1000.0 * _apply(params, z)
    note = _one(autoattack_checks(huge, x, y, eps=0.0), "saturates")
    assert "while that of the DLR loss is not" in note


def test_dynamic_defence_is_flagged(mlp):
    """A forward pass that takes a gradient step on its input (test-time optimisation)."""
    params, x, y = mlp

    def purify(z):
        energy = lambda u: jnp.sum(jax.nn.logsumexp(_apply(params, u), axis=-1))
        return _apply(params, z + 0.01 * jax.grad(energy)(z))

    note = _one(autoattack_checks(purify, x, y, eps=0.05), "differentiates")
    assert "grad" in note and "adaptive attack" in note
    # The same trace twice (eval_shape caches per function): still seen.
    _one(autoattack_checks(purify, x, y, eps=0.05), "differentiates")


def test_too_few_classes_for_the_version(mlp):
    params, x, y = mlp
    three = lambda z: _apply(params, z)[:, :3]
    y3 = y % 3
    note = _one(autoattack_checks(three, x, y3, eps=0.05, attacks="standard"), "reduced")
    assert "APGD-T is left out" in note and "FAB-T attacks 2 target classes, not 9" in note
    two = lambda z, key: _apply(params, z)[:, :2] + 0.1 * jax.random.normal(key, (len(z), 2))
    note = _one(autoattack_checks(two, x, y % 2, eps=0.05, attacks="rand", stochastic=True),
                "reduced")
    assert "APGD-DLR is left out" in note
    # Attacks named one by one: the caller chose them, nothing to say.
    assert not [n for n in autoattack_checks(three, x, y3, eps=0.05, attacks=["apgd-ce"])
                if "reduced" in n]


def test_evaluate_robustness_warns_before_attacking_and_reports(mlp):
    params, x, y = mlp
    assert issubclass(AutoAttackCheckWarning, GradientMaskingWarning)
    probs = lambda z: jax.nn.softmax(_apply(params, z), axis=-1)
    with pytest.warns(AutoAttackCheckWarning, match="probabilities") as record:
        report = evaluate_robustness(probs, [(x, y)], eps=0.05, attacks=["fgsm"])
    check_warnings = [w for w in record if issubclass(w.category, AutoAttackCheckWarning)]
    assert len(check_warnings) == 1  # issued once
    _one(report.warnings, "probabilities")
    # sanity_checks=False: no checks.
    with warnings.catch_warnings():
        warnings.simplefilter("error", AutoAttackCheckWarning)
        report = evaluate_robustness(probs, [(x, y)], eps=0.05, attacks=["fgsm"],
                                     sanity_checks=False)
    assert report.warnings == ()


# ------------------------------------------------------------------------------------------------
# Expectation over Transformation.
# ------------------------------------------------------------------------------------------------


def test_eot_gradient_of_a_deterministic_model_is_the_plain_gradient(mlp):
    params, x, y = mlp
    logits_fn = functools.partial(_apply, params)
    x, y = jnp.asarray(x), jnp.asarray(y)
    plain = jax.grad(lambda z: jnp.sum(A.cross_entropy_loss(logits_fn(z), y)))(x)
    plain_loss = A.cross_entropy_loss(logits_fn(x), y)
    # A key-taking model that ignores its key: 20 passes average to the one gradient.
    vg = make_eot_value_and_grad(lambda z, k: logits_fn(z), "ce", y, 20, True)
    loss, adv, g = jax.jit(vg)(x, None, jax.random.key(0))
    np.testing.assert_allclose(np.asarray(g), np.asarray(plain), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(loss), np.asarray(plain_loss), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(adv), np.asarray(jnp.argmax(logits_fn(x), -1) != y))
    # stochastic=False: one pass, exactly the plain gradient.
    _, _, g1 = make_eot_value_and_grad(logits_fn, "ce", y, 20, False)(x)
    np.testing.assert_array_equal(np.asarray(g1), np.asarray(plain))


def test_eot_averages_fresh_draws(mlp):
    """The EoT gradient is the mean of the per-draw gradients with keys fold_in(key, j)."""
    params, x, y = mlp
    noisy = functools.partial(_noisy_apply, params, sigma=0.3)
    x, y, key = jnp.asarray(x[:8]), jnp.asarray(y[:8]), jax.random.key(3)
    per_draw = [
        jax.grad(lambda z, j=j: jnp.sum(A.dlr_loss(noisy(z, jax.random.fold_in(key, j)), y)))(x)
        for j in range(5)
    ]
    _, _, g = make_eot_value_and_grad(noisy, "dlr", y, 5, True)(x, None, key)
    np.testing.assert_allclose(np.asarray(g), np.mean(np.asarray(per_draw), 0), rtol=1e-4,
                               atol=1e-6)
    assert not np.allclose(np.asarray(per_draw[0]), np.asarray(per_draw[1]))  # draws differ


@pytest.mark.parametrize("loss, norm, eps", [("ce", "linf", 0.05), ("dlr-targeted", "l2", 0.5)])
def test_eot_iter_one_leaves_apgd_bit_identical(mlp, loss, norm, eps):
    params, x, y = mlp
    logits_fn = functools.partial(_apply, params)
    kw = {"eps": eps, "norm": norm, "loss": loss, "steps": 12, "restarts": 2,
          "n_target_classes": 2 if loss == "dlr-targeted" else None}

    def run(fn, **extra):
        return np.asarray(jax.jit(lambda x, y, k: A.apgd(fn, x, y, key=k, **kw, **extra))(
            x, y, jax.random.key(4)))

    base = run(logits_fn)
    np.testing.assert_array_equal(run(logits_fn, eot_iter=1), base)
    np.testing.assert_array_equal(run(logits_fn, eot_iter=20), base)  # deterministic: one pass
    # The stochastic path on a model that ignores its key: the same starts, the same steps.
    np.testing.assert_array_equal(run(lambda z, k: logits_fn(z), stochastic=True), base)


# ------------------------------------------------------------------------------------------------
# The "rand" version.
# ------------------------------------------------------------------------------------------------


def test_rand_version_members_and_budgets():
    assert A.AUTOATTACK_VERSIONS["rand"] is A.AUTOATTACK_RAND
    members = A.autoattack_members("rand", n_classes=10, stochastic=True)
    assert [n for n, _ in members] == ["apgd-ce", "apgd-dlr"]
    for (name, attack), loss in zip(members, ["ce", "dlr"], strict=True):
        assert attack.func is A.apgd
        assert attack.keywords == {"loss": loss, "steps": 100, "restarts": 1, "rho": 0.75,
                                   "eot_iter": 20, "stochastic": True}, name
    assert A.AUTOATTACK_ALL_ATTACKS[: len(A.AUTOATTACK_ATTACKS)] == A.AUTOATTACK_ATTACKS
    with pytest.raises(ValueError, match="stochastic=True"):
        A.autoattack_members("rand", n_classes=10)
    with pytest.raises(ValueError, match="FAB-T and Square"):
        A.autoattack_members("standard", n_classes=10, stochastic=True)
    # A stochastic model with APGD-T (no FAB-T, no Square) is fine.
    cfg = A.AutoAttackConfig(fab_t_targets=0, square_queries=0, eot_iter=4)
    names = [n for n, _ in A.autoattack_members(cfg, n_classes=10, stochastic=True)]
    assert names == ["apgd-ce", "apgd-t"]


def _phase_noise_apply(p, x, key, a=0.05, b=200.0):
    """The MLP plus ``a sin(b x R + phi)``, ``R`` Gaussian and ``phi`` uniform, drawn afresh per
    call: the logits move by at most ``a`` (the predictions hardly change) while the input
    gradient gains a term of size ``a b`` whose mean over the draws is 0. One draw's gradient is
    mostly noise; an average over draws (EoT) recovers the model's (Athalye et al. 2018)."""
    k_r, k_phi = jax.random.split(key)
    z = x.reshape(x.shape[0], -1)
    r = jax.random.normal(k_r, (z.shape[1], 10), x.dtype)
    phi = jax.random.uniform(k_phi, (10,), x.dtype, 0.0, 2 * jnp.pi)
    return _apply(p, x) + a * jnp.sin(b * z @ r + phi)


# Shapes seen while tracing ``_counting_phase_noise`` (a module global: a closure over a mutable
# list is, rightly, never cached across calls).
_TRACES: list = []


def _counting_phase_noise(p, x, key):
    _TRACES.append(x.shape)
    return _phase_noise_apply(p, x, key)


def test_rand_breaks_at_least_as_many_points_as_plain_apgd_ce(mlp):
    """On a randomised model whose single-draw gradients are mostly noise, with the same key:
    the rand version (APGD-CE and APGD-DLR, 20 draws per gradient) against APGD-CE with one draw
    per gradient (the reference's APGD on a randomised model without EoT), judged by the same
    fresh draws. (Here EoT breaks about 5 more of the 47 points, whatever the key.)"""
    params, x, y = mlp
    noisy = functools.partial(_counting_phase_noise, params)
    kw = {"eps": 0.05, "key": jax.random.key(5), "stochastic": True, "sanity_checks": False,
          "batch_size": 48}
    plain = evaluate_robustness(noisy, [(x, y)], attacks={
        "apgd-ce": functools.partial(A.apgd, loss="ce", steps=100, stochastic=True)}, **kw)
    rand = evaluate_robustness(noisy, [(x, y)], attacks="rand", **kw)
    assert rand.attacks == ("apgd-ce", "apgd-dlr")
    # The same clean draws whatever the attacks.
    np.testing.assert_array_equal(rand.clean_correct, plain.clean_correct)
    assert rand.n_robust <= plain.n_robust, (rand.n_robust, plain.n_robust)
    assert rand.n_robust < rand.n_clean_correct  # a non-trivial eps
    # Reproducible for a fixed key; the second call reuses the compiled attacks.
    _TRACES.clear()
    again = evaluate_robustness(noisy, [(x, y)], attacks="rand", **kw)
    assert _TRACES == []
    assert again.robust_accuracy == rand.robust_accuracy and again.n_robust == rand.n_robust
    np.testing.assert_array_equal(again.broken_by, rand.broken_by)


def test_rand_report_is_measured_on_fresh_draws(mlp):
    params, x, y = mlp
    noisy = functools.partial(_noisy_apply, params)
    small = A.AutoAttackConfig(apgd_ce_steps=10, apgd_dlr_steps=10, apgd_dlr_restarts=1,
                               apgd_t_targets=0, fab_t_targets=0, square_queries=0, eot_iter=4)
    report = evaluate_robustness(noisy, [(x, y)], eps=0.05, attacks=small, stochastic=True,
                                 n_draws=3, key=jax.random.key(6), batch_size=16,
                                 return_adversarial=True)
    assert report.stochastic_draws == 3 and "all 3 draws" in report.to_markdown()
    check_adversarial(x, report.x_adv, eps=0.05)
    # broken_by agrees with the final (fresh-draw) verdict.
    assert int((report.broken_by >= 0).sum()) == report.n_clean_correct - report.n_robust
    assert not (report.broken_by >= 0)[~report.clean_correct].any()
    assert report.ensemble_robust_accuracy <= report.clean_accuracy
    # How many verdicts the fresh draws changed is in the report (a note, not a Python warning).
    assert "did not reproduce" in _one(report.warnings, "fresh draws")
    other = evaluate_robustness(noisy, [(x, y)], eps=0.05, attacks=small, stochastic=True,
                                n_draws=3, key=jax.random.key(7), batch_size=16)
    assert not np.array_equal(other.clean_correct, report.clean_correct) or not np.array_equal(
        other.broken_by, report.broken_by)  # the key matters


def test_auto_attack_rand_is_reproducible_and_consistent(mlp):
    params, x, y = mlp
    noisy = functools.partial(_noisy_apply, params)
    small = A.AutoAttackConfig(apgd_ce_steps=10, apgd_dlr_steps=10, apgd_dlr_restarts=1,
                               apgd_t_targets=0, fab_t_targets=0, square_queries=0, eot_iter=4)
    run = jax.jit(lambda x, y, k: A.auto_attack(noisy, x, y, key=k, eps=0.05, version=small,
                                                stochastic=True, n_draws=3))
    a = run(x, y, jax.random.key(0))
    b = run(x, y, jax.random.key(0))
    for u, v in zip(a, b, strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    check_adversarial(x, a.x_adv, eps=0.05)
    clean, robust, broken_by = (np.asarray(v) for v in (a.clean_correct, a.robust, a.broken_by))
    assert not (robust & ~clean).any()
    np.testing.assert_array_equal(broken_by >= 0, clean & ~robust)
    assert set(np.unique(broken_by)) <= {-1, A.AUTOATTACK_ALL_ATTACKS.index("apgd-ce"),
                                         A.AUTOATTACK_ALL_ATTACKS.index("apgd-dlr")}
    assert robust.sum() < clean.sum()
    # The final verdict is the fresh draws' on the stored inputs.
    k_model = jax.random.split(jax.random.key(0))[1]
    final_key = jax.random.fold_in(k_model, len(A.AUTOATTACK_ALL_ATTACKS) + 1)
    again = np.asarray(A.predict_under_draws(noisy, a.x_adv, jnp.asarray(y), final_key, 3)) == y
    np.testing.assert_array_equal(robust, clean & again)


def test_stochastic_arguments_are_checked(mlp):
    params, x, y = mlp
    logits_fn = functools.partial(_apply, params)
    noisy = functools.partial(_noisy_apply, params)
    data = [(x, y)]
    with pytest.raises(ValueError, match="stochastic=True"):
        evaluate_robustness(logits_fn, data, eps=0.05, attacks="rand")
    with pytest.raises(ValueError, match="FAB-T and Square"):
        evaluate_robustness(noisy, data, eps=0.05, attacks="standard", stochastic=True)
    with pytest.raises(ValueError, match="does not support stochastic"):
        evaluate_robustness(noisy, data, eps=0.05, attacks=["pgd"], stochastic=True)
    with pytest.raises(ValueError, match="bound with stochastic=False"):
        evaluate_robustness(noisy, data, eps=0.05, attacks=["apgd-ce"], stochastic=True)
    with pytest.raises(ValueError, match="bound with stochastic=True"):
        evaluate_robustness(logits_fn, data, eps=0.05, attacks={
            "eot": functools.partial(A.apgd, stochastic=True)})
    with pytest.raises(ValueError, match="n_draws"):
        evaluate_robustness(noisy, data, eps=0.05, attacks="rand", stochastic=True, n_draws=0)
    with pytest.raises(ValueError, match="eot_iter"):
        A.apgd(noisy, x, y, key=jax.random.key(0), eps=0.05, stochastic=True, eot_iter=0)
