"""Compares 5 training steps on 1 device and on all (fake CPU) devices; prints the differences.

Run in a fresh process with ``XLA_FLAGS=$(tscnc_jax.parallel.cpu_multi_device_flags(N))``
(``tests/test_parallel.py`` does). Prints one JSON line:
``{"devices": N, "<backend>": {"max_abs_diff": ..., "sparsity": ...}, ...}``.

The setting exercises every cross-device path of the step: synchronised BatchNorm, TRADES with its
PGD inner maximisation (per-example random starts), the CNC and TSC penalties through optax,
fixed pruning masks (``sparsify``), and the EMA. Then the validation step (clean and PGD
accuracy counts) on the same images on 1 device and on all, and ``evaluate_robustness`` (every
AutoAttack member at small budgets) on one device and with ``mesh=`` over all.
"""

import functools
import json
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import toy_mlp

import tscnc_jax as tj
from tscnc_jax import models, parallel, training

AXIS = parallel.BATCH_AXIS
STEPS = 5
SPARSITY = 0.9
LOSS = os.environ.get("CHECK_LOSS", "trades")


class TinyBNNet(nn.Module):
    """Conv-BN-ReLU-pool-Conv-BN-ReLU-pool-Dense: every cross-device path, compiled quickly."""

    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, x, *, train=False):
        for width in (8, 16):
            x = models.Conv(width, use_bias=False)(x)
            x = models._batch_norm(train, jnp.float32, self.bn_axis_name)(x)
            x = models.max_pool_2x2(nn.relu(x))
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


def main() -> None:
    n = jax.device_count()
    model_single = TinyBNNet()
    model_multi = TinyBNNet(bn_axis_name=AXIS)
    variables = model_single.init(jax.random.key(0), jnp.zeros((1, 16, 16, 1)))
    masks = tj.layerwise_magnitude_masks(variables["params"], SPARSITY)
    tx = training.make_optimizer(0.05, cnc_weight=0.01, tsc_weight=1e-4, weight_decay=5e-4,
                                 cnc_kwargs={"temperature": 0.2, "delta": 1e-2},
                                 tsc_kwargs={"a": 1.0}, masks=masks)
    state0 = training.create_train_state(
        model_single, tx, jax.random.key(1), (16, 16, 1), params=variables["params"],
        batch_stats=variables["batch_stats"], masks=masks)
    rng = np.random.default_rng(0)
    batches = [{"image": rng.uniform(0, 1, (8, 16, 16, 1)).astype(np.float32),
                "label": rng.integers(0, 10, 8).astype(np.int32)} for _ in range(STEPS)]
    attack = training.default_attack(LOSS, eps=0.1, steps=2)

    def stepper(backend):
        model = model_single if backend is None else model_multi
        step = training.make_train_step(model, tx, loss=LOSS, attack=attack, beta=6.0,
                                        axis_name=None if backend is None else AXIS)
        if backend is None:
            return jax.jit(step)
        return parallel.data_parallel(step)

    # The single-device trajectory, then each backend's step from every state on it: one step
    # at a time, because the attacks step along sign(gradient), and along a trajectory a
    # gradient coordinate that is zero up to rounding (an input pixel a pruned network barely
    # reads) can flip sign with the reduction order and move the iterates by a whole step.
    single = stepper(None)
    states, ref = [state0], []
    for batch in batches:
        state, metrics = single(states[-1], batch)
        states.append(jax.device_get(state))
        ref.append(jax.device_get(metrics))
    out = {"devices": n}
    trees = ("params", "batch_stats", "ema_params")
    for backend in ("shard_map",):
        fn = stepper(backend)
        diff = metric_diff = 0.0
        for t, batch in enumerate(batches):
            state, metrics = jax.device_get(fn(states[t], batch))
            diff = max(diff, *(
                float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
                for name in trees
                for a, b in zip(jax.tree.leaves(getattr(states[t + 1], name)),
                                jax.tree.leaves(getattr(state, name)), strict=True)))
            metric_diff = max(metric_diff, *(abs(float(ref[t][k]) - float(metrics[k]))
                                             for k in ref[t]))
        # Pruned weights stay exactly zero along the backend's own trajectory.
        state = state0
        for batch in batches:
            state, _ = fn(state, batch)
        state = jax.device_get(state)
        revived = sum(
            int(np.sum((np.asarray(p) != 0) & ~np.asarray(m)))
            for p, m in zip(jax.tree.leaves(state.params),
                            jax.tree.leaves(masks, is_leaf=lambda x: x is None), strict=True)
            if m is not None
        )
        out[backend] = {"max_abs_diff": diff, "metric_diff": metric_diff,
                        "pruned_nonzero": revived,
                        "mask_sparsity": tj.summarize_sparsity(masks).sparsity}
    out["evaluation"] = _evaluation_counts(model_single, model_multi, states[-1], attack)
    out["robustness"] = _robustness_reports()
    print(json.dumps(out))
    sys.stdout.flush()


def _evaluation_counts(model_single, model_multi, state, attack) -> dict:
    """The validation step (clean and PGD counts, padded rows masked out) on 1 device and
    data-parallel over all, on the same 45 images (45 = not a multiple of 2 or 4: the last
    rows are padding on several devices)."""
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 1, (45, 16, 16, 1)).astype(np.float32)
    y = rng.integers(0, 10, 45).astype(np.int32)
    pad = -len(y) % jax.device_count()
    batch = {"image": np.concatenate([x, np.repeat(x[-1:], pad, 0)]),
             "label": np.concatenate([y, np.repeat(y[-1:], pad, 0)]),
             "mask": (np.arange(len(y) + pad) < len(y)).astype(np.float32)}
    one = jax.jit(training.make_eval_step(model_single, attack=attack))(
        state, {"image": x, "label": y})
    many = parallel.data_parallel(training.make_eval_step(
        model_multi, attack=attack, axis_name=AXIS))(state, batch)
    return {name: [float(v[k]) for k in ("count", "clean_correct", "adv_correct")]
            for name, v in (("one", jax.device_get(one)), ("all", jax.device_get(many)))}


def _robustness_reports() -> dict:
    """``evaluate_robustness`` with every AutoAttack member (small budgets, each on every
    clean-correct example: ``cascade=False``) on the toy MLP's 61 test images on the default
    device and with ``mesh=`` over all devices (61: the chunks and Square's re-batched segments
    are padded to multiples of the device count), with the number of devices each call's batch
    was laid out on, read inside the jitted attack."""
    x, y = toy_mlp.data(jax.random.key(7), 61)
    logits_fn = functools.partial(toy_mlp.apply, toy_mlp.train())
    seen = []

    def probe(logits_fn, x, y, *, key, eps, norm, bounds):
        del logits_fn, y, key, eps, norm, bounds
        jax.debug.inspect_array_sharding(x, callback=lambda s: seen.append(len(s.device_set)))
        return x

    budget = tj.attacks.AutoAttackConfig(apgd_ce_steps=10, apgd_t_steps=10, apgd_t_targets=3,
                                        fab_t_steps=10, fab_t_targets=3, square_queries=300)
    attacks = [("probe", probe), *tj.attacks.autoattack_members(budget, n_classes=10)]
    out = {}
    for name, mesh in (("one", None), ("all", parallel.local_mesh())):
        seen.clear()
        rep = tj.evaluate_robustness(logits_fn, [(x, y)], eps=0.08, attacks=attacks,
                                     key=jax.random.key(3), batch_size=16, mesh=mesh,
                                     cascade=False, sanity_checks=False)
        out[name] = {"clean_correct": rep.clean_correct.tolist(),
                     "robust": {k: round(v * len(y)) for k, v in rep.robust_accuracy.items()},
                     "ensemble": rep.n_robust,
                     "broken_by": rep.broken_by.tolist(), "devices_seen": sorted(set(seen))}
    return out


if __name__ == "__main__":
    main()
