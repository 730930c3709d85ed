"""Data parallelism: single device vs 2 and 4 fake CPU devices through the one shard_map path.

Each multi-device run happens in a fresh subprocess (the device count is fixed when JAX starts),
with the flags of :func:`tscnc_jax.parallel.cpu_multi_device_flags` and a stall limit
(``tests/stall.py``), so that a hang fails the test instead of stalling the suite.
"""

import json
import os
import pathlib
import sys

import jax
import numpy as np
import pytest
import stall

from tscnc_jax import parallel

SCRIPT = pathlib.Path(__file__).with_name("multi_device_check.py")
ROOT = SCRIPT.parents[1]


def _run_check(num_devices: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = parallel.cpu_multi_device_flags(num_devices)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = stall.run([sys.executable, str(SCRIPT)], env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("num_devices", [2, 4])
def test_multi_device_equals_single_device(num_devices):
    out = _run_check(num_devices)
    assert out["devices"] == num_devices
    for backend in ("shard_map",):
        # Same params, BatchNorm statistics and EMA after 5 TRADES steps with BN, TSCNC
        # penalties and 90 % pruning masks, up to float32 reduction order.
        assert out[backend]["max_abs_diff"] < 1e-5, out
        assert out[backend]["metric_diff"] < 1e-4, out
        assert out[backend]["pruned_nonzero"] == 0, out
        assert abs(out[backend]["mask_sparsity"] - 0.9) < 1e-3, out
    # Evaluation: the same images on one device and sharded over all (padding masked out) give
    # the same counts exactly: each example's logits and attack do not depend on the others.
    one, many = out["evaluation"]["one"], out["evaluation"]["all"]
    assert one[0] == many[0] == 45, out
    assert one == many, out
    assert 0 < one[1] < 45 and one[2] <= one[1], out  # not a constant classifier
    # evaluate_robustness with mesh= over all devices: every member's batches are split over
    # them (read inside the jitted attack) and every per-example outcome equals one device's.
    one, many = out["robustness"]["one"], out["robustness"]["all"]
    assert one["devices_seen"] == [1] and many["devices_seen"] == [num_devices], out
    assert one == {**many, "devices_seen": [1]}, out
    robust = one["robust"]  # each member has work and breaks some (not all) points
    assert sum(one["clean_correct"]) > 50, out
    assert all(0 < robust[m] < sum(one["clean_correct"]) for m in ("apgd-ce", "fab-t", "square"))


def test_rows_batches_and_errors():
    mesh = parallel.make_mesh(jax.devices()[:1])
    assert parallel.local_rows(8, mesh) == slice(0, 8)  # one process holds every row
    batch = parallel.shard_batch({"image": np.zeros((8, 4, 4, 1)), "label": np.arange(8)}, mesh)
    assert batch["image"].shape == (8, 4, 4, 1)
    assert batch["label"].sharding.spec == jax.sharding.PartitionSpec(parallel.BATCH_AXIS)
    assert parallel.shard_batch(batch, mesh)["label"] is batch["label"]  # already placed
    step = parallel.data_parallel(lambda s, b: (s, jax.lax.psum(b["x"].sum(), "batch")),
                                  mesh=mesh)
    state, total = step({"w": np.ones(2)}, {"x": np.arange(6.0)})
    assert float(total) == 15.0 and state["w"].sharding.is_fully_replicated
    with pytest.raises(ValueError, match="1-D mesh"):
        parallel.data_parallel(lambda s, b: s, mesh=jax.sharding.Mesh(
            np.asarray(jax.devices()[:1]).reshape(1, 1), ("a", "b")))
    prefetched = list(parallel.prefetch([{"x": np.full(4, i)} for i in range(5)], mesh))
    assert [int(b["x"][0]) for b in prefetched] == list(range(5))


def test_replicate_keeps_values_and_keys():
    mesh = parallel.make_mesh(jax.devices()[:1])
    tree = {"a": np.arange(3.0), "b": np.float32(2.0), "key": jax.random.key(7)}
    rep = parallel.replicate(tree, mesh)
    np.testing.assert_array_equal(rep["a"], tree["a"])
    assert float(rep["b"]) == 2.0 and rep["a"].sharding.is_fully_replicated
    np.testing.assert_array_equal(jax.random.key_data(rep["key"]),
                                  jax.random.key_data(tree["key"]))
