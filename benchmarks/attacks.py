"""Throughput of the attacks on the small CNN (28x28x1, 421,642 parameters).

    python -m benchmarks.attacks [--quick] [--repeats N] [--batch 128] [--eps 0.1]
                                 [--only pgd20,apgd_ce,fast,standard,...] [--out FILE.md]

Images per second of PGD-20, APGD-CE (100 iterations) and the "fast" and "standard" AutoAttack
ensembles (:func:`tscnc_jax.attacks.auto_attack`, jitted, fixed batch), on
:class:`tscnc_jax.models.SmallCNN` briefly trained (``--train_steps`` Adam steps) on synthetic
28x28 data. Median over ``--repeats`` runs after ahead-of-time compilation.

An ensemble's cost depends on how many examples survive each attack (an attack is skipped when
none is left). So each ensemble is measured twice: on the trained, undefended model at ``--eps``
(APGD-CE breaks nearly everything, the later attacks are mostly skipped), and at ``eps = 0``, where
no example is ever broken and every attack runs its full budget: the worst case, which is the cost
on a model robust on every example. ``--quick`` uses batch 32, one repeat, and skips the standard
ensemble's worst case (about 3 minutes at batch 128 on 2 cores).
"""

from __future__ import annotations

import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from benchmarks import common
from tscnc_jax import attacks
from tscnc_jax.models import SmallCNN

WORKLOADS = (
    "pgd20",
    "apgd_ce",
    "fast",
    "fast_worst",
    "standard",
    "standard_worst",
)

FLAGS = flags.FLAGS


def synthetic_28x28(key: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    """10 classes of smooth random prototypes plus noise, clipped to [0, 1] (NHWC)."""
    protos = 0.2 + 0.6 * jax.random.uniform(jax.random.key(1234), (10, 7, 7, 1))
    protos = jax.image.resize(protos, (10, 28, 28, 1), "linear")
    k_y, k_n = jax.random.split(key)
    y = jax.random.randint(k_y, (n,), 0, 10)
    x = jnp.clip(protos[y] + 0.3 * jax.random.normal(k_n, (n, 28, 28, 1)), 0.0, 1.0)
    return x, y


def train_small_cnn(steps: int, seed: int = 0):
    """Returns ``(logits_fn, n_params, clean_accuracy)`` after ``steps`` Adam steps (batch 128);
    ``logits_fn.args[0]`` holds the trained variables."""
    model = SmallCNN()
    x_tr, y_tr = synthetic_28x28(jax.random.key(seed), 8192)
    params = model.init(jax.random.key(seed + 1), x_tr[:1])
    tx = optax.adam(1e-3)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, xb, yb):
        def loss_fn(p):
            logits = model.apply(p, xb)
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

        g = jax.grad(loss_fn)(params)
        updates, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, updates), opt

    rng = np.random.default_rng(seed)
    for _ in range(steps):
        idx = rng.integers(0, len(y_tr), 128)
        params, opt = step(params, opt, x_tr[idx], y_tr[idx])
    logits_fn = functools.partial(model.apply, params)
    x_te, y_te = synthetic_28x28(jax.random.key(seed + 2), 512)
    acc = float(jnp.mean(jnp.argmax(jax.jit(logits_fn)(x_te), -1) == y_te))
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    return logits_fn, n_params, acc


def _attack_fns(logits_fn, eps: float) -> dict[str, tuple]:
    """name -> (function of (x, y, key) returning x_adv or AutoAttackResult, eps used)."""

    def aa(version, e):
        return lambda x, y, k: attacks.auto_attack(logits_fn, x, y, key=k, eps=e, version=version)

    return {
        "pgd20": (lambda x, y, k: attacks.pgd(logits_fn, x, y, key=k, eps=eps, steps=20), eps),
        "apgd_ce": (lambda x, y, k: attacks.apgd(logits_fn, x, y, key=k, eps=eps, steps=100), eps),
        "fast": (aa("fast", eps), eps),
        "fast_worst": (aa("fast", 0.0), 0.0),
        "standard": (aa("standard", eps), eps),
        "standard_worst": (aa("standard", 0.0), 0.0),
    }


def run(
    quick: bool, repeats: int, batch: int, eps: float, only: list[str], train_steps: int
) -> dict:
    t0 = time.perf_counter()
    logits_fn, n_params, acc = train_small_cnn(train_steps)
    results = {
        "machine": common.machine_info(),
        "batch": batch,
        "eps": eps,
        "repeats": repeats,
        "n_params": n_params,
        "train_steps": train_steps,
        "clean_accuracy": acc,
        "train_seconds": time.perf_counter() - t0,
        "workloads": {},
    }
    x, y = synthetic_28x28(jax.random.key(99), batch)
    predict = jax.jit(lambda x: jnp.argmax(logits_fn(x), -1))
    key = jax.random.key(0)
    for name, (fn, e) in _attack_fns(logits_fn, eps).items():
        if name not in only:
            continue
        t_c = time.perf_counter()
        compiled = jax.jit(fn).lower(x, y, key).compile()
        compile_s = time.perf_counter() - t_c
        times = []
        out = None
        for r in range(repeats):
            t_r = time.perf_counter()
            out = jax.block_until_ready(compiled(x, y, jax.random.fold_in(key, r)))
            times.append(time.perf_counter() - t_r)
        x_adv = out.x_adv if isinstance(out, attacks.AutoAttackResult) else out
        robust = float(jnp.mean(predict(x_adv) == y))
        sec = statistics.median(times)
        results["workloads"][name] = {
            "eps": e,
            "seconds_per_batch": sec,
            "images_per_second": batch / sec,
            "compile_seconds": compile_s,
            "robust_accuracy": robust,
        }
        print(
            f"{name}: {batch / sec:.2f} img/s ({sec:.2f} s/batch), robust acc {robust:.3f}",
            flush=True,
        )
    return results



_LABELS = {
    "pgd20": "PGD-20 (CE, 1 restart)",
    "apgd_ce": "APGD-CE (100 it, 1 restart)",
    "fast": "AutoAttack fast, at eps",
    "fast_worst": "AutoAttack fast, worst case (nothing breaks)",
    "standard": "AutoAttack standard, at eps",
    "standard_worst": "AutoAttack standard, worst case (nothing breaks)",
}


def to_markdown(results: dict) -> str:
    m = results["machine"]
    lines = [
        "# Attack throughput",
        "",
        f"jax {m['jax']} on {m['backend']} ({m['cpu_count']} cores, {m['processor']}); small CNN "
        f"({results['n_params']:,} params, {results['train_steps']} training steps, clean acc. "
        f"{results['clean_accuracy']:.1%} on synthetic 28x28 data); batch {results['batch']}; "
        f"median of {results['repeats']} run(s) after compilation, float32.",
        "",
        "| workload | eps | images/s | s/batch | robust acc. | compile s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, w in results["workloads"].items():
        lines.append(
            f"| {_LABELS[name]} | {w['eps']:g} | {w['images_per_second']:.2f} | "
            f"{w['seconds_per_batch']:.2f} | {w['robust_accuracy']:.1%} | "
            f"{w['compile_seconds']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def define_flags() -> None:
    """This entry point's flags (defined when it runs as a program only; see :mod:`benchmarks`)."""
    flags.DEFINE_bool("quick", False, "batch 32, 1 repeat, no std. worst")
    flags.DEFINE_integer("repeats", None, None)
    flags.DEFINE_integer("batch", None, None)
    flags.DEFINE_float("eps", 0.1, None)
    flags.DEFINE_integer("train_steps", 100, None)
    flags.DEFINE_string("only", None, f"comma list of {WORKLOADS}")
    flags.DEFINE_string("out", None, "write markdown here (and JSON next to it)")


def main(argv) -> None:
    common.check_no_arguments(argv)
    repeats = FLAGS.repeats if FLAGS.repeats is not None else (1 if FLAGS.quick else 3)
    batch = FLAGS.batch if FLAGS.batch is not None else (32 if FLAGS.quick else 128)
    if repeats < 1 or batch < 1 or FLAGS.train_steps < 0 or FLAGS.eps < 0:
        raise app.UsageError("--repeats and --batch must be >= 1, --train_steps and --eps >= 0")
    if FLAGS.only is None:
        only = [w for w in WORKLOADS if not (FLAGS.quick and w == "standard_worst")]
    else:
        only = [w.strip() for w in FLAGS.only.split(",") if w.strip()]
        unknown = sorted(set(only) - set(WORKLOADS))
        if unknown:
            raise app.UsageError(f"unknown workloads {unknown}; choose from {WORKLOADS}")
    results = run(FLAGS.quick, repeats, batch, FLAGS.eps, only, FLAGS.train_steps)
    text = to_markdown(results)
    common.report(text, results, FLAGS.out)


if __name__ == "__main__":
    define_flags()
    app.run(main)
