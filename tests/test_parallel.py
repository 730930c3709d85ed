"""Data parallelism: single device vs 2 and 4 fake CPU devices, pmap and shard_map.

Each multi-device run happens in a fresh subprocess (the device count is fixed when JAX starts),
with the flags of :func:`tscnc_jax.parallel.cpu_multi_device_flags` and a hard timeout, so that a
hang would fail the test instead of stalling the suite.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from tscnc_jax import parallel

SCRIPT = pathlib.Path(__file__).with_name("multi_device_check.py")
ROOT = SCRIPT.parents[1]


def _run_check(num_devices: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = parallel.cpu_multi_device_flags(num_devices)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("num_devices", [2, 4])
def test_multi_device_equals_single_device(num_devices):
    out = _run_check(num_devices)
    assert out["devices"] == num_devices
    for backend in ("shard_map", "pmap"):
        # Same params, BatchNorm statistics and EMA after 5 TRADES steps with BN, TSCNC
        # penalties and 90 % pruning masks, up to float32 reduction order.
        assert out[backend]["max_abs_diff"] < 1e-5, out
        assert out[backend]["metric_diff"] < 1e-4, out
        assert out[backend]["pruned_nonzero"] == 0, out
        assert abs(out[backend]["mask_sparsity"] - 0.9) < 1e-3, out


def test_split_batch_and_errors():
    batch = {"image": np.zeros((8, 4, 4, 1)), "label": np.arange(8)}
    split = parallel.split_batch(batch, 4)
    assert split["image"].shape == (4, 2, 4, 4, 1)
    np.testing.assert_array_equal(split["label"][1], [2, 3])
    with pytest.raises(ValueError, match=r"\['label'\].*10.*not divisible by the 4 devices"):
        parallel.split_batch({"label": np.arange(10)}, 4)
    step = parallel.data_parallel(lambda s, b: (s, b["x"].sum()), devices=jax.devices()[:1])
    state, total = step({"w": np.ones(2)}, {"x": np.arange(6.0)})
    assert float(total) == 15.0
    with pytest.raises(ValueError, match="backend"):
        parallel.data_parallel(lambda s, b: s, backend="xmap")


def test_replicate_roundtrip():
    tree = {"a": np.arange(3.0), "b": np.float32(2.0)}
    rep = parallel.replicate(tree, 3)
    assert rep["a"].shape == (3, 3) and rep["b"].shape == (3,)
    back = parallel.unreplicate(rep)
    np.testing.assert_array_equal(back["a"], tree["a"])
