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


_STEPS_SCRIPT = r"""
import json, jax, jax.numpy as jnp, numpy as np
import tscnc_jax as tj
model = tj.create_model("small_cnn", width=8)
tx = tj.training.make_optimizer(0.05, cnc_weight=0.1, tsc_weight=1e-5)
state = tj.create_train_state(model, tx, jax.random.key(0), (28, 28, 1))
step = jax.jit(tj.training.make_train_step(
    model, tx, loss="trades", attack=tj.training.default_attack("trades", eps=0.1, steps=3)))
rng = np.random.default_rng(0)
losses = []
for _ in range(3):
    batch = {"image": rng.uniform(0, 1, (16, 28, 28, 1)).astype(np.float32),
             "label": rng.integers(0, 10, 16).astype(np.int32)}
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
kernel = np.asarray(state.params["Conv_1"]["kernel"], np.float64)
print(json.dumps({"losses": losses, "kernel": kernel.ravel()[:64].tolist()}))
"""


def test_default_xla_configuration_trains_like_the_tuned_one():
    """The suite runs under set_fast_cpu_flags; users on other setups do not: three TRADES +
    TSCNC steps in a process with XLA's defaults (no flag) match the tuned configuration to
    float32 rounding."""
    import json
    import os
    import pathlib
    import sys

    import stall

    root = pathlib.Path(__file__).resolve().parents[1]
    runs = {}
    for name, flags in (("default", ""), ("tuned", xla_cpu.YNN_CONVOLUTION_FLAG)):
        env = dict(os.environ, XLA_FLAGS=flags, PYTHONPATH=str(root))
        proc = stall.run([sys.executable, "-c", _STEPS_SCRIPT], env=env, cwd=root)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    import numpy as np

    np.testing.assert_allclose(runs["default"]["losses"], runs["tuned"]["losses"], rtol=1e-4)
    np.testing.assert_allclose(runs["default"]["kernel"], runs["tuned"]["kernel"], atol=1e-4)
