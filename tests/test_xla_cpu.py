"""set_fast_cpu_flags: adds the XLA:CPU flag once, respects an explicit setting."""

import jaxlib
import pytest

from tscnc_jax import xla_cpu


@pytest.mark.skipif(not jaxlib.__version__.startswith(xla_cpu.VALIDATED_JAXLIB),
                    reason="the flag is only added for the validated jaxlib")
def test_adds_the_flag_once_and_keeps_other_flags():
    env = {"XLA_FLAGS": "--xla_cpu_enable_fast_math=false"}
    assert xla_cpu.set_fast_cpu_flags(env)
    assert env["XLA_FLAGS"] == ("--xla_cpu_enable_fast_math=false "
                                + xla_cpu.YNN_CONVOLUTION_FLAG)
    assert not xla_cpu.set_fast_cpu_flags(env)  # idempotent
    assert env["XLA_FLAGS"].count("ynn_fusion_type") == 1
    empty = {}
    assert xla_cpu.set_fast_cpu_flags(empty) and empty["XLA_FLAGS"] == xla_cpu.YNN_CONVOLUTION_FLAG


def test_an_explicit_setting_wins():
    env = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=individual_convolution"}
    assert not xla_cpu.set_fast_cpu_flags(env)
    assert env["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=individual_convolution"


def test_the_suite_runs_with_the_flag(monkeypatch):
    # conftest applies it before JAX's first computation; a later call must warn, not pretend.
    import os

    if jaxlib.__version__.startswith(xla_cpu.VALIDATED_JAXLIB):
        assert "ynn_fusion_type" in os.environ.get("XLA_FLAGS", "")
    import jax.numpy as jnp

    jnp.zeros(1).block_until_ready()  # backends are up
    monkeypatch.setenv("XLA_FLAGS", "")
    if jaxlib.__version__.startswith(xla_cpu.VALIDATED_JAXLIB):
        with pytest.warns(UserWarning, match="first computation"):
            assert not xla_cpu.set_fast_cpu_flags()
