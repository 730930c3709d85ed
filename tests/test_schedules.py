"""Pruning schedules: formulas at chosen steps, mask-update steps, jit, validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tscnc_jax.pruning.schedules import (
    IterativeSchedule,
    OneShotSchedule,
    PolynomialSchedule,
    check_sparsity,
)


def _values(schedule, target, steps):
    return np.array([float(schedule.get_sparsity_at_step(target, t)) for t in steps])


def _updates(schedule, steps):
    return [t for t in steps if bool(schedule.is_mask_update_step(t))]


def test_one_shot():
    sched = OneShotSchedule(step=5)
    np.testing.assert_array_equal(_values(sched, 0.9, [0, 4, 5, 6, 1000]),
                                  np.float32([0, 0, 0.9, 0.9, 0.9]))
    assert _updates(sched, range(100)) == [5]
    assert _updates(OneShotSchedule(), range(10)) == [0]


@pytest.mark.parametrize("target", [0.9, 0.99, 0.995])
def test_iterative_geometric_matches_formula_and_ends_exactly_on_target(target):
    sched = IterativeSchedule(num_rounds=4, round_length=10, begin_step=3)
    assert _updates(sched, range(200)) == [3, 13, 23, 33]
    assert sched.end_step == 33
    for r, t in enumerate([3, 13, 23], start=1):
        expected = 1.0 - (1.0 - target) ** (r / 4)
        got = _values(sched, target, [t, t + 9])  # constant until the next round
        np.testing.assert_allclose(got, expected, rtol=1e-6)
    # Last round: exactly the (float32) target, forever after.
    assert (_values(sched, target, [33, 34, 10_000]) == np.float32(target)).all()
    assert (_values(sched, target, [0, 2]) == 0).all()
    # Every round removes the same fraction of the survivors.
    kept = 1.0 - _values(sched, target, [3, 13, 23, 33])
    np.testing.assert_allclose(kept[1:] / kept[:-1], kept[0], rtol=1e-5)


def test_iterative_linear():
    sched = IterativeSchedule(num_rounds=5, round_length=2, spacing="linear")
    np.testing.assert_allclose(_values(sched, 0.9, [0, 1, 2, 4, 6, 8, 9]),
                               [0.18, 0.18, 0.36, 0.54, 0.72, 0.9, 0.9], rtol=1e-6)


@pytest.mark.parametrize("initial", [0.0, 0.3])
def test_polynomial_matches_zhu_gupta(initial):
    sched = PolynomialSchedule(begin_step=100, end_step=1000, update_freq=100,
                               initial_sparsity=initial)
    target = 0.99
    steps = np.arange(100, 1001, 100)
    want = target + (initial - target) * (1 - (steps - 100) / 900) ** 3
    np.testing.assert_allclose(_values(sched, target, steps), want, rtol=1e-6, atol=1e-7)
    assert _updates(sched, range(2000)) == list(steps)
    # Piecewise constant between updates, 0 before the first, exactly the target at the end.
    at_200 = _values(sched, target, [200])[0]
    np.testing.assert_array_equal(_values(sched, target, [250, 299]), [at_200, at_200])
    assert _values(sched, target, [0, 99]).tolist() == [0.0, 0.0]
    assert (_values(sched, target, [1000, 5000]) == np.float32(target)).all()


def test_polynomial_end_not_aligned_with_frequency():
    sched = PolynomialSchedule(begin_step=0, end_step=25, update_freq=10, power=2.0)
    assert _updates(sched, range(60)) == [0, 10, 20, 25]
    np.testing.assert_allclose(_values(sched, 0.8, [10, 19, 20, 24]),
                               0.8 - 0.8 * (1 - np.array([10, 10, 20, 20]) / 25) ** 2, rtol=1e-6)
    assert float(sched.get_sparsity_at_step(0.8, 25)) == np.float32(0.8)


def test_schedules_jit_with_traced_step_and_target():
    scheds = [OneShotSchedule(3), IterativeSchedule(3, 7), PolynomialSchedule(2, 40, 5)]
    for sched in scheds:
        f = jax.jit(lambda tgt, t, s=sched: (s.get_sparsity_at_step(tgt, t),
                                              s.is_mask_update_step(t)))
        for t in [0, 3, 7, 14, 40, 41]:
            s, u = f(jnp.float32(0.95), jnp.int32(t))
            # jit may fuse the power differently (a few ulp); exactly the target at the end.
            np.testing.assert_allclose(s, sched.get_sparsity_at_step(0.95, t), rtol=1e-6)
            if t >= 40:
                assert float(s) == np.float32(0.95)
            assert bool(u) == bool(sched.is_mask_update_step(t))


@pytest.mark.parametrize("bad", [1.0, -0.1, float("nan"), 1.5])
def test_bad_sparsity(bad):
    with pytest.raises(ValueError, match="0 <= "):
        check_sparsity(bad)
    with pytest.raises(ValueError):
        OneShotSchedule().get_sparsity_at_step(bad, 0)
    with pytest.raises(ValueError):
        PolynomialSchedule(0, 10, 1, initial_sparsity=bad)


@pytest.mark.parametrize(
    "make",
    [
        lambda: OneShotSchedule(-1),
        lambda: IterativeSchedule(0, 10),
        lambda: IterativeSchedule(2, 0),
        lambda: IterativeSchedule(2, 5, spacing="cubic"),
        lambda: PolynomialSchedule(10, 10, 1),
        lambda: PolynomialSchedule(0, 10, 0),
        lambda: PolynomialSchedule(0, 10, 1, power=0.0),
        lambda: PolynomialSchedule(0.5, 10, 1),
    ],
)
def test_bad_schedule_arguments(make):
    with pytest.raises(ValueError):
        make()
