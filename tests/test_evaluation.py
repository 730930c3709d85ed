"""Tests of tscnc_jax.evaluation: the report, soundness checks, diagnostics and bad input."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import toy_mlp
from toy_mlp import SMALL_AA

from tscnc_jax import attacks as A
from tscnc_jax.evaluation import (
    AttackSoundnessError,
    RobustnessReport,
    check_adversarial,
    evaluate_robustness,
)


@pytest.fixture(scope="module")
def mlp():
    """The toy MLP (``tests/toy_mlp.py``) and 96 test examples."""
    logits_fn = functools.partial(toy_mlp.apply, toy_mlp.train(0))
    x_te, y_te = toy_mlp.data(jax.random.key(2), 96)
    acc = float(np.mean(np.argmax(logits_fn(x_te), -1) == y_te))
    assert acc > 0.85, acc
    return logits_fn, x_te, y_te


def _batches(x, y, size):
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(y), size)]


def test_report_cascade(mlp):
    logits_fn, x, y = mlp
    report = evaluate_robustness(
        logits_fn, _batches(x, y, 32), eps=0.05, attacks=SMALL_AA, return_adversarial=True
    )
    assert isinstance(report, RobustnessReport)
    assert report.attacks == A.AUTOATTACK_ATTACKS
    clean = np.argmax(logits_fn(x), -1) == y
    assert report.n_examples == len(y)
    assert report.n_clean_correct == clean.sum()
    np.testing.assert_array_equal(report.clean_correct, clean)
    accs = [report.robust_accuracy[a] for a in report.attacks]
    assert report.clean_accuracy >= accs[0]
    assert all(a >= b for a, b in zip(accs, accs[1:], strict=False))  # cumulative: nonincreasing
    assert accs[-1] == report.ensemble_robust_accuracy
    assert 0 < report.ensemble_robust_accuracy < report.clean_accuracy  # a non-trivial eps
    assert sum(report.n_broken.values()) == report.n_clean_correct - report.n_robust
    # The stored adversarial inputs are valid and prove every reported break.
    check_adversarial(x, report.x_adv, eps=0.05)
    pred = np.argmax(logits_fn(report.x_adv), -1)
    robust = clean & (pred == y)
    assert robust.sum() == report.n_robust
    np.testing.assert_array_equal(report.broken_by >= 0, clean & ~robust)
    for i, name in enumerate(report.attacks):
        assert (report.broken_by == i).sum() == report.n_broken[name]
    np.testing.assert_array_equal(report.x_adv[report.broken_by < 0], x[report.broken_by < 0])
    assert set(report.seconds) >= {"clean", "total", *report.attacks}
    assert report.warnings == ()
    table = report.to_markdown()
    assert "apgd-ce" in table and "ensemble" in table


def test_report_independent_members(mlp):
    logits_fn, x, y = mlp
    report = evaluate_robustness(
        logits_fn,
        [(x, y)],
        eps=0.05,
        attacks=["fgsm", ("pgd-5", functools.partial(A.pgd, steps=5)), "pgd"],
        cascade=False,
        sanity_checks=False,
    )
    members = [report.robust_accuracy[a] for a in report.attacks]
    assert report.ensemble_robust_accuracy <= min(members)
    assert max(members) <= report.clean_accuracy
    # FGSM alone is weaker than PGD-20 here; the ensemble is the worst case of the members.
    assert report.robust_accuracy["fgsm"] >= report.robust_accuracy["pgd"]
    assert report.n_broken["pgd"] == round(
        (report.clean_accuracy - report.robust_accuracy["pgd"]) * report.n_examples
    )


def test_undefended_model_at_eps_one_has_zero_robust_accuracy(mlp):
    logits_fn, x, y = mlp
    report = evaluate_robustness(logits_fn, [(x, y)], eps=1.0, attacks=["pgd"])
    assert report.ensemble_robust_accuracy == 0.0
    assert report.clean_accuracy > 0.85


def test_l2_fast_version(mlp):
    logits_fn, x, y = mlp
    report = evaluate_robustness(
        logits_fn, [(x, y)], eps=0.5, norm="l2", attacks="fast", sanity_checks=False
    )
    assert report.attacks == ("apgd-ce", "apgd-t", "square")  # L2 Square; fast has no FAB-T
    assert report.ensemble_robust_accuracy < report.clean_accuracy


def test_compiles_once_with_ragged_batches(mlp):
    logits_fn, x, y = mlp
    traces = []

    def counting_fn(z):
        traces.append(z.shape)
        return logits_fn(z)

    attacks = {"pgd": functools.partial(A.pgd, steps=3)}
    kw = {"eps": 0.05, "attacks": attacks, "batch_size": 16, "sanity_checks": False}
    evaluate_robustness(counting_fn, [(x[:16], y[:16])], **kw)  # warm jax's eval_shape cache
    traces.clear()
    evaluate_robustness(counting_fn, [(x[:16], y[:16])], **kw)
    n_one_chunk = len(traces)
    traces.clear()
    # 96 examples in uneven input batches, 16 per call: 6 chunks, same traces.
    report = evaluate_robustness(
        counting_fn,
        _batches(x, y, 40),
        cascade=False,
        **kw,
    )
    assert len(traces) == n_one_chunk
    assert all(s[0] == 16 for s in traces)
    assert report.n_examples == 96


def test_dict_batches_and_progress(mlp, capsys):
    logits_fn, x, y = mlp
    batches = [{"image": bx, "label": by} for bx, by in _batches(x, y, 48)]
    report = evaluate_robustness(
        logits_fn, batches, eps=0.02, attacks=["fgsm"], progress=True, sanity_checks=False
    )
    assert report.n_examples == 96
    capsys.readouterr()  # the bar (tqdm or plain lines) goes to stderr; only check it ran


def test_float64_numpy_inputs(mlp):
    logits_fn, x, y = mlp
    data = [(x.astype(np.float64), y.astype(np.int64))]
    report = evaluate_robustness(logits_fn, data, eps=0.02, attacks=["fgsm"], sanity_checks=False)
    assert report.n_examples == len(y)


def test_deterministic(mlp):
    logits_fn, x, y = mlp
    kw = {"eps": 0.05, "attacks": SMALL_AA, "sanity_checks": False, "key": jax.random.key(3)}
    a = evaluate_robustness(logits_fn, [(x, y)], **kw)
    b = evaluate_robustness(logits_fn, [(x, y)], **kw)
    np.testing.assert_array_equal(a.broken_by, b.broken_by)
    assert a.robust_accuracy == b.robust_accuracy


# ------------------------------------------------------------------------------------------------
# Soundness errors.
# ------------------------------------------------------------------------------------------------


def _cheat(kind):
    def attack(logits_fn, x, y, *, key, eps, norm, bounds):
        del logits_fn, y, key, norm
        if kind == "too_far":
            return jnp.clip(x + 1.5 * eps, *bounds)
        if kind == "out_of_bounds":
            return x + 0.5 * eps * 0 + (bounds[1] - x) + 1e-3
        if kind == "nan":
            return x.at[0].set(jnp.nan)
        if kind == "dtype":
            return x.astype(jnp.float16)
        raise AssertionError(kind)

    return attack


@pytest.mark.parametrize("kind", ["too_far", "out_of_bounds", "nan", "dtype"])
def test_soundness_violation_raises(mlp, kind):
    logits_fn, x, y = mlp
    x = np.clip(x, 0.05, 0.95)  # room for a perturbation on every coordinate
    with pytest.raises(AttackSoundnessError, match="cheat"):
        evaluate_robustness(
            logits_fn, [(x, y)], eps=0.03, attacks={"cheat": _cheat(kind)}, sanity_checks=False
        )


def test_check_adversarial_tolerance():
    x = np.full((2, 3), 0.5, np.float32)
    ok = (x + np.float32(0.1)).astype(np.float32)  # rounding may exceed eps by an ulp
    check_adversarial(x, ok, eps=0.1)
    with pytest.raises(AttackSoundnessError, match="norm"):
        check_adversarial(x, x + np.float32(0.1001), eps=0.1)
    l2 = x.copy()
    l2[:, 0] += 0.3
    check_adversarial(x, l2, eps=0.3, norm="l2")
    with pytest.raises(AttackSoundnessError, match="bounds"):
        check_adversarial(x, x + 0.6, eps=1.0)


# ------------------------------------------------------------------------------------------------
# Bad input.
# ------------------------------------------------------------------------------------------------


def test_bad_input(mlp):
    logits_fn, x, y = mlp
    data = [(x, y)]
    with pytest.raises(ValueError, match="eps"):
        evaluate_robustness(logits_fn, data, eps=-0.1)
    with pytest.raises(ValueError, match="labels"):
        evaluate_robustness(logits_fn, [(x, np.where(y == 0, 10, y))], eps=0.1)
    with pytest.raises(ValueError, match="bounds"):
        evaluate_robustness(logits_fn, [(x * 2 - 1, y)], eps=0.1)
    with pytest.raises(ValueError, match="norm"):
        evaluate_robustness(logits_fn, data, eps=0.1, norm="l1")
    with pytest.raises(ValueError, match="unknown attack"):
        evaluate_robustness(logits_fn, data, eps=0.1, attacks=["fab-l1"])
    with pytest.raises(ValueError, match="empty"):
        evaluate_robustness(logits_fn, data, eps=0.1, attacks=[])
    with pytest.raises(ValueError, match="no examples"):
        evaluate_robustness(logits_fn, [], eps=0.1)
    with pytest.raises(ValueError, match="batch_size"):
        evaluate_robustness(logits_fn, data, eps=0.1, batch_size=0)
    with pytest.raises(ValueError, match="integers"):
        evaluate_robustness(logits_fn, [(x, y.astype(np.float32))], eps=0.1)
