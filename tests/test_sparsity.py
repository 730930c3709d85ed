"""Transformed L1, hard-concrete gates and the gated TSC penalty."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import tscnc_jax as tj


@pytest.mark.usefixtures("x64")
class TestTransformedL1:
    def test_formula_and_limits(self):
        x = np.array([-3.0, -0.5, 0.0, 1e-4, 0.2, 7.0])
        for a in (0.01, 1.0, 100.0):
            np.testing.assert_allclose(
                tj.transformed_l1(x, a=a), (a + 1) * np.abs(x) / (a + np.abs(x)), rtol=1e-12
            )
        # a -> 0: the L0 indicator; a -> inf: |x|.
        np.testing.assert_allclose(tj.transformed_l1(x, a=1e-9), (x != 0).astype(float), atol=1e-4)
        np.testing.assert_allclose(tj.transformed_l1(x, a=1e9), np.abs(x), rtol=1e-7)
        # Bounded by a + 1, concave in |x| (second differences <= 0), even.
        t = np.linspace(0, 50, 101)
        rho = np.asarray(tj.transformed_l1(t, a=2.0))
        assert rho.max() < 3.0
        assert np.all(np.diff(rho, 2) <= 1e-12)
        np.testing.assert_allclose(tj.transformed_l1(-t, a=2.0), rho)

    def test_smoothing(self):
        x = np.array([-1.0, 0.0, 0.3])
        eps = 1e-2
        t = np.sqrt(x**2 + eps**2)
        np.testing.assert_allclose(tj.transformed_l1(x, a=1.0, eps=eps), 2 * t / (1 + t),
                                   rtol=1e-12)
        g = jax.grad(lambda v: jnp.sum(tj.transformed_l1(v, a=1.0, eps=eps)))(jnp.zeros(3))
        np.testing.assert_array_equal(g, 0.0)

    def test_gradients(self):
        x = np.array([-2.0, -0.3, 0.4, 1.5])
        check_grads(lambda v: tj.transformed_l1(v, a=0.5), (x,), order=2, modes=["fwd", "rev"])
        check_grads(lambda v: tj.transformed_l1(v, a=3.0, eps=0.1), (np.append(x, 0.0),),
                    order=2, modes=["fwd", "rev"])
        g = jax.grad(lambda v: jnp.sum(tj.transformed_l1(v, a=1.0)))(jnp.zeros(4))
        assert np.all(np.isfinite(g))

    def test_validation(self):
        with pytest.raises(ValueError, match="`a`"):
            tj.transformed_l1(jnp.ones(3), a=-1.0)
        with pytest.raises(ValueError, match="`a`"):
            tj.transformed_l1(jnp.ones(3), a=0.0)
        with pytest.raises(ValueError, match="eps"):
            tj.transformed_l1(jnp.ones(3), a=1.0, eps=-0.1)
        with pytest.raises(ValueError, match="`x`.*floating"):
            tj.transformed_l1(jnp.ones(3, jnp.int32), a=1.0)


class TestHardConcrete:
    BETA, GAMMA, ZETA = 2.0 / 3.0, -0.1, 1.1

    def test_sample_statistics_match_prob_nonzero(self):
        log_alpha = jnp.array([-3.0, -1.0, 0.0, 0.847, 2.0])
        keys = jax.random.split(jax.random.key(0), 20000)
        z = jax.vmap(lambda k: tj.sparsity.hard_concrete_sample(k, log_alpha))(keys)
        assert float(z.min()) >= 0.0 and float(z.max()) <= 1.0
        empirical = np.mean(np.asarray(z) > 0, axis=0)
        # Binomial standard error at n = 20000 is < 0.0036; 0.015 is > 4 standard errors.
        np.testing.assert_allclose(empirical, tj.sparsity.hard_concrete_prob_nonzero(log_alpha),
                                   atol=0.015)
        # Gates are exactly 0 or exactly 1 with positive probability (the "hard" part).
        assert np.mean(np.asarray(z) == 0.0) > 0.01 and np.mean(np.asarray(z) == 1.0) > 0.01

    def test_prob_nonzero_closed_form(self):
        la = np.linspace(-4, 4, 9)
        ref = 1 / (1 + np.exp(-(la - self.BETA * np.log(-self.GAMMA / self.ZETA))))
        np.testing.assert_allclose(tj.sparsity.hard_concrete_prob_nonzero(la), ref, rtol=1e-6)
        # The authors' form: 1 - sigmoid(beta * log(-gamma / zeta) - log_alpha).
        alt = 1 - 1 / (1 + np.exp(-(self.BETA * np.log(0.1 / 1.1) - la)))
        np.testing.assert_allclose(tj.sparsity.hard_concrete_prob_nonzero(la), alt, rtol=1e-6)

    def test_eval_gate_and_clamp(self):
        la = jnp.array([-10.0, np.log(0.7 / 0.3), 10.0])
        gate = tj.sparsity.hard_concrete_gate(la)
        np.testing.assert_allclose(gate, [0.0, 0.7 * 1.2 - 0.1, 1.0], rtol=1e-6)
        np.testing.assert_allclose(tj.sparsity.clamp_log_alpha(la),
                                   [np.log(0.01), la[1], np.log(100.0)], rtol=1e-6)

    def test_init_and_reparameterised_gradient(self):
        la = tj.sparsity.init_log_alpha(jax.random.key(1), 4096)
        np.testing.assert_allclose(float(la.mean()), np.log(0.7 / 0.3), atol=1e-3)
        np.testing.assert_allclose(float(la.std()), 0.01, rtol=0.1)
        g = jax.grad(
            lambda x: jnp.sum(tj.sparsity.hard_concrete_sample(jax.random.key(2), x)))(la[:8])
        assert np.all(np.isfinite(g)) and np.all(np.asarray(g) >= 0)
        with pytest.raises(ValueError, match="droprate"):
            tj.sparsity.init_log_alpha(jax.random.key(0), 3, droprate=1.0)

    def test_sample_deterministic_for_key(self):
        la = jnp.zeros(16)
        np.testing.assert_array_equal(
            tj.sparsity.hard_concrete_sample(jax.random.key(3), la),
            tj.sparsity.hard_concrete_sample(jax.random.key(3), la),
        )


@pytest.mark.usefixtures("x64")
class TestGatedTSC:
    def _reference(self, w, la, form, a=100.0, n=50_000, wd=5e-4, lam0=1e-3):
        wm = w.reshape(-1, w.shape[-1])
        pi = 1 / (1 + np.exp(-(la - (2 / 3) * np.log(0.1 / 1.1))))
        u = pi * (0.5 * (n * wd / 0.7) * np.sum(wm**2, axis=0) + lam0 * wm.shape[0])
        denom = a + u if form == "textbook" else a - u
        return np.sum((a + 1) * u / denom) / n

    @pytest.mark.parametrize("form", ["textbook", "authors_code"])
    def test_against_reference(self, form):
        rng = np.random.default_rng(0)
        w = rng.standard_normal((3, 3, 16, 8)) * np.sqrt(2 / (9 * 16))
        la = np.log(0.7 / 0.3) + 0.01 * rng.standard_normal(8)
        value = tj.gated_tsc_penalty(w, la, form=form)
        np.testing.assert_allclose(float(value), self._reference(w, la, form), rtol=1e-10)
        check_grads(lambda x, y: tj.gated_tsc_penalty(x, y, form=form), (w, la), order=1,
                    modes=["rev"])

    def test_authors_form_pole_and_large_a_limit(self):
        w = np.ones((4, 2))
        la = np.zeros(2)
        # For large a both forms reduce to the untransformed expected L0 + L2 cost / N.
        ref = self._reference(w, la, "textbook", a=1e12)
        for form in ("textbook", "authors_code"):
            np.testing.assert_allclose(float(tj.gated_tsc_penalty(w, la, a=1e12, form=form)), ref,
                                       rtol=1e-8)
        # The authors' form is larger than the textbook one and explodes near u = a.
        small_a = 60.0
        assert float(tj.gated_tsc_penalty(w, la, a=small_a, form="authors_code")) > float(
            tj.gated_tsc_penalty(w, la, a=small_a, form="textbook")
        )

    def test_validation(self):
        with pytest.raises(ValueError, match="log_alpha"):
            tj.gated_tsc_penalty(jnp.ones((3, 3, 2, 4)), jnp.zeros(3))
        with pytest.raises(ValueError, match="form"):
            tj.gated_tsc_penalty(jnp.ones((2, 4)), jnp.zeros(4), form="paper")
        with pytest.raises(ValueError, match="`a`"):
            tj.gated_tsc_penalty(jnp.ones((2, 4)), jnp.zeros(4), a=-5.0)
        with pytest.raises(ValueError, match="mask.*shape"):
            tj.gated_tsc_penalty(jnp.ones((2, 4)), jnp.zeros(4), mask=jnp.ones((4, 2)))
