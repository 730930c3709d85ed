"""Pruning engine cost: mask computation on VGG-16's kernels and the wrapper's per-step overhead.

Run: ``python -m benchmarks.pruning`` (about 1-2 minutes on 2 CPU cores; ``--repeats`` to change
the number of timed repetitions). Prints two markdown tables.

1. Mask computation at sparsity 0.99 for the kernels of VGG-16 (CIFAR variant): 13 Conv 3x3
   (channels 3-64-64-128-128-256-256-256-512-512-512-512-512-512, flax layout
   ``(3, 3, cin, cout)``, 14.71 M weights) and 3 Dense kernels 512x512, 512x512, 512x10 (the
   classifier with two hidden layers), 15.24 M weights in 16 kernels.
   Each function is jitted with the sparsity as a traced argument (as inside
   :func:`tscnc_jax.pruning.sparsify`); the table gives the compile time (first call) and the
   median wall time of the following calls. A per-layer ``jnp.argsort`` selection is included as
   a reference point.
2. Optimizer step of a small CNN (Conv 3x3 1->32, Conv 3x3 32->64, Dense 3136->128,
   Dense 128->10; 421,642 parameters; batch 128 of 28x28x1): SGD with momentum 0.9, plain and
   wrapped in :func:`tscnc_jax.pruning.sparsify` (on a step that does not recompute the masks, and
   on a step that does), timed in interleaved rounds in the same process; medians.
"""

from __future__ import annotations

import functools
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from benchmarks import common
from tscnc_jax import pruning
from tscnc_jax.pruning.schedules import OneShotSchedule, PolynomialSchedule

VGG16_CHANNELS = [3, 64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
VGG16_DENSE = [(512, 512), (512, 512), (512, 10)]

FLAGS = flags.FLAGS


def vgg16_kernels(seed: int = 0) -> dict:
    """He-normal random kernels with VGG-16's shapes (biases included, not pruned)."""
    rng = np.random.default_rng(seed)
    params = {}
    pairs = zip(VGG16_CHANNELS[:-1], VGG16_CHANNELS[1:], strict=True)
    shapes = [(3, 3, cin, cout) for cin, cout in pairs]
    names = [f"Conv_{i}" for i in range(len(shapes))]
    shapes += VGG16_DENSE
    names += [f"Dense_{i}" for i in range(len(VGG16_DENSE))]
    for name, shape in zip(names, shapes, strict=True):
        fan_in = int(np.prod(shape[:-1]))
        w = rng.standard_normal(shape, dtype=np.float32) * np.float32(np.sqrt(2.0 / fan_in))
        params[name] = {"kernel": jnp.asarray(w), "bias": jnp.zeros(shape[-1])}
    return params


def _time(fn, *args, repeats: int) -> tuple[float, float]:
    """(first call incl. compile, median of ``repeats`` later calls), in seconds."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return first, float(np.median(times))


def _argsort_layerwise(params, sparsity):
    """Reference: per-layer top-k by a full stable argsort and a scatter."""
    out = {}
    for name, layer in params.items():
        w = layer["kernel"]
        n = w.size
        k = n - pruning.num_to_prune(n, sparsity)
        order = jnp.argsort(-jnp.abs(w).ravel(), stable=True)
        kept = jnp.zeros(n, bool).at[order].set(jnp.arange(n) < k)
        out[name] = kept.reshape(w.shape)
    return out


def bench_masks(repeats: int, sparsity: float = 0.99) -> list[str]:
    params = vgg16_kernels()
    scores = pruning.init_scores(params)
    n_weights = sum(x.size for x in jax.tree.leaves(scores))

    def hydra_step(scores, s):
        # What one HYDRA training step adds: top-k forward and straight-through backward. The
        # value is returned so that XLA cannot drop the forward top-k.
        def f(sc):
            p = pruning.masked_params_from_scores(params, sc, s)
            return sum(jnp.sum(x) for x in jax.tree.leaves(p))

        return jax.value_and_grad(f)(scores)

    cases = [
        ("layer-wise magnitude (LWM)", pruning.layerwise_magnitude_masks, params),
        ("global magnitude", pruning.global_magnitude_masks, params),
        ("global magnitude, min_kept_per_layer=1",
         functools.partial(pruning.global_magnitude_masks, min_kept_per_layer=1), params),
        ("HYDRA top-k (`scores_to_masks`)", pruning.scores_to_masks, scores),
        ("HYDRA top-k + STE gradient (`masked_params_from_scores`)", hydra_step, scores),
        ("layer-wise channels (L2)", pruning.layerwise_channel_masks, params),
        ("reference: per-layer `jnp.argsort` (not used)", _argsort_layerwise, params),
    ]
    rows = [
        f"Mask computation, VGG-16 kernels ({n_weights / 1e6:.2f} M weights, 16 layers), "
        f"sparsity {sparsity}, jax {jax.__version__} CPU, median of {repeats}:",
        "",
        "| method | compile + first call (s) | per call (ms) | measured sparsity |",
        "|---|---:|---:|---:|",
    ]
    for name, fn, tree in cases:
        jitted = jax.jit(fn)
        first, median = _time(jitted, tree, sparsity, repeats=repeats)
        out = jitted(tree, sparsity)
        measured = "-" if "STE" in name else f"{pruning.summarize_sparsity(out).sparsity:.5f}"
        rows.append(f"| {name} | {first:.2f} | {median * 1e3:.1f} | {measured} |")
    return rows


class SmallCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(32, (3, 3))(x))
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = nn.relu(nn.Conv(64, (3, 3))(x))
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(128)(x))
        return nn.Dense(10)(x)


def bench_wrapper(rounds: int) -> list[str]:
    model = SmallCNN()
    key = jax.random.key(0)
    x = jax.random.uniform(key, (128, 28, 28, 1))
    y = jax.random.randint(jax.random.fold_in(key, 1), (128,), 0, 10)
    params = model.init(jax.random.fold_in(key, 2), x[:1])["params"]
    n_params = sum(p.size for p in jax.tree.leaves(params))

    def loss_fn(p):
        logits = model.apply({"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    sgd = optax.sgd(0.05, momentum=0.9)
    variants = {
        "sgd-momentum": sgd,
        "sparsify(sgd-momentum), no mask update": pruning.sparsify(
            sgd, mask_fn=pruning.layerwise_magnitude_masks, schedule=OneShotSchedule(0),
            target_sparsity=0.99),
        "sparsify(sgd-momentum), LWM mask update": pruning.sparsify(
            sgd, mask_fn=pruning.layerwise_magnitude_masks,
            schedule=PolynomialSchedule(0, 10**9, 1), target_sparsity=0.99),
    }

    def make(tx):
        @jax.jit
        def train_step(p, s):
            grads = jax.grad(loss_fn)(p)
            updates, s = tx.update(grads, s, p)
            return optax.apply_updates(p, updates), s

        @jax.jit
        def opt_step(p, s, grads):
            updates, s = tx.update(grads, s, p)
            return optax.apply_updates(p, updates), s

        return train_step, opt_step

    grads = jax.grad(loss_fn)(params)
    states, fns = {}, {}
    for name, tx in variants.items():
        fns[name] = make(tx)
        s = tx.init(params)
        p, s = fns[name][0](params, s)  # compile; the one-shot update happens here
        fns[name][1](p, s, grads)
        states[name] = (p, s)
    full = {name: [] for name in variants}
    opt = {name: [] for name in variants}
    for _ in range(rounds):  # interleaved, so that load from other processes hits all alike
        for name in variants:
            p, s = states[name]
            t0 = time.perf_counter()
            jax.block_until_ready(fns[name][0](p, s))
            full[name].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            jax.block_until_ready(fns[name][1](p, s, grads))
            opt[name].append(time.perf_counter() - t0)
    base_full = np.median(full["sgd-momentum"])
    base_opt = np.median(opt["sgd-momentum"])
    rows = [
        f"Small CNN ({n_params:,} parameters, batch 128), train step = grad + update + apply; "
        f"median of {rounds} interleaved rounds:",
        "",
        "| optimizer | train step (ms) | overhead | update + apply only (ms) | overhead |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in variants:
        f, o = np.median(full[name]), np.median(opt[name])
        rows.append(
            f"| {name} | {f * 1e3:.1f} | {(f - base_full) * 1e3:+.1f} ms | {o * 1e3:.2f} | "
            f"{(o - base_opt) * 1e3:+.2f} ms |"
        )
    return rows


def define_flags() -> None:
    """This entry point's flags (defined when it runs as a program only; see :mod:`benchmarks`)."""
    flags.DEFINE_integer("repeats", 5, "timed calls per mask method")
    flags.DEFINE_integer("rounds", 30, "interleaved rounds (CNN step)")


def main(argv) -> None:
    common.check_no_arguments(argv)
    print("\n".join(bench_masks(FLAGS.repeats)))
    print()
    print("\n".join(bench_wrapper(FLAGS.rounds)))


if __name__ == "__main__":
    define_flags()
    app.run(main)
