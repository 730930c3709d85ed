"""Our FAB-T against torchattacks' FAB (multi-targeted) on the same weights and images.

    python -m benchmarks.fab_twin [--n 200] [--norm linf] [--eps 0.1] [--steps 100]
                                  [--targets 9] [--train_steps 100] [--out FILE.md]

A validation of :func:`tscnc_jax.attacks.fab` against an independent implementation, not a speed
race. The small CNN of :mod:`benchmarks.attacks` (``--train_steps`` Adam steps on synthetic 28x28
data) is copied into its PyTorch twin (:func:`benchmarks.torch_twin.build_twin`), and on the same
``--n`` images:

1. **Robust accuracy at eps** (``--norm``, L-inf or L2): our FAB-T (``--steps`` iterations,
   ``--targets`` targets, 1 restart each, AutoAttack's standard settings) and torchattacks
   3.5.1's ``FAB(norm, multi_targeted=True, n_classes=10, steps, n_restarts=1)`` with
   ``n_target_classes = --targets``; which images each breaks, and both outputs checked in the
   threat model.
2. **Minimal norms on one target** (the most likely wrong class): ours from
   :func:`tscnc_jax.attacks.fab_min_norm`, theirs from the same FAB with an ``eps`` that holds the
   whole box (so it returns every adversarial it finds; with one target it keeps the smallest of
   its run). With several targets torchattacks stops at the first target that succeeds, ours takes
   the minimum over all, so the norms are compared on one target only.

Both libraries draw nothing at random here (one restart per target starts at the clean point),
so differences come from floating point (float32, XLA vs oneDNN) and the argmax at points near
the boundary. Wall times include our compilation; torchattacks runs eagerly with PyTorch's
default threads (``pip install torch==2.13.0`` and ``pip install --no-deps
torchattacks==3.5.1``: benchmark-only dependencies).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks import attacks as attack_bench
from benchmarks import common, torch_twin
from tscnc_jax import attacks

FLAGS = flags.FLAGS


def _theirs_fab(twin, norm: str, eps: float, steps: int, targets: int):
    import torchattacks

    fab = torchattacks.FAB(twin, norm={"linf": "Linf", "l2": "L2"}[norm], eps=eps, steps=steps,
                           n_restarts=1, multi_targeted=True, n_classes=10)
    fab.n_target_classes = targets  # targets 2 .. targets + 1 of the sorted clean logits
    return fab


def _dist(a: np.ndarray, b: np.ndarray, norm: str) -> np.ndarray:
    d = a.reshape(len(a), -1).astype(np.float64) - b.reshape(len(b), -1).astype(np.float64)
    return np.abs(d).max(1) if norm == "linf" else np.linalg.norm(d, axis=1)


def compare(n: int, eps: float, steps: int, targets: int, train_steps: int,
            norm: str = "linf") -> dict:
    """The two comparisons of the module docstring, as one dict of numbers."""
    import torch

    logits_fn, _, clean_acc = attack_bench.train_small_cnn(train_steps)
    twin = torch_twin.build_twin("small_cnn", logits_fn.args[0]).eval()
    x, y = attack_bench.synthetic_28x28(jax.random.key(99), n)
    x_np, y_np = np.array(x), np.array(y)  # writable copies for torch.from_numpy
    x_t = torch.from_numpy(x_np).permute(0, 3, 1, 2).contiguous()
    y_t = torch.from_numpy(y_np).long()
    predict = jax.jit(lambda z: jnp.argmax(logits_fn(z), -1))
    clean = np.asarray(predict(x)) == y_np
    key = jax.random.key(0)
    out = {"n": n, "norm": norm, "eps": eps, "steps": steps, "targets": targets,
           "train_steps": train_steps, "clean_accuracy_train_distribution": clean_acc,
           "clean_accuracy": float(clean.mean())}

    # 1. Robust accuracy at eps, all targets.
    t0 = time.perf_counter()
    ours = np.asarray(jax.block_until_ready(jax.jit(lambda a, b, k: attacks.fab(
        logits_fn, a, b, key=k, eps=eps, norm=norm, steps=steps, n_target_classes=targets))(
        x, y, key)))
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    theirs = _theirs_fab(twin, norm, eps, steps, targets)(x_t, y_t).permute(0, 2, 3, 1).numpy()
    t_theirs = time.perf_counter() - t0
    for name, adv in (("ours", ours), ("torchattacks", theirs)):
        if _dist(adv, x_np, norm).max() > eps + 1e-5 or adv.min() < 0 or adv.max() > 1:
            raise RuntimeError(f"{name} left the threat model")
    ours_robust = np.asarray(predict(ours)) == y_np
    with torch.no_grad():
        theirs_robust_twin = (twin(torch.from_numpy(theirs).permute(0, 3, 1, 2)).argmax(1)
                              == y_t).numpy()
    theirs_robust = np.asarray(predict(jnp.asarray(theirs))) == y_np  # judged by the same model
    out["at_eps"] = {
        "ours_robust_accuracy": float(ours_robust.mean()),
        "torchattacks_robust_accuracy": float(theirs_robust.mean()),
        "torchattacks_robust_accuracy_by_twin": float(theirs_robust_twin.mean()),
        "broken_by_both": int((clean & ~ours_robust & ~theirs_robust).sum()),
        "broken_by_ours_only": int((clean & ~ours_robust & theirs_robust).sum()),
        "broken_by_torchattacks_only": int((clean & ours_robust & ~theirs_robust).sum()),
        "ours_seconds": t_ours, "torchattacks_seconds": t_theirs,
    }

    # 2. Minimal norms on the most likely wrong class.
    t0 = time.perf_counter()
    _, n_ours = jax.block_until_ready(jax.jit(lambda a, b, k: attacks.fab_min_norm(
        logits_fn, a, b, key=k, norm=norm, steps=steps, n_target_classes=1))(x, y, key))
    t_ours = time.perf_counter() - t0
    n_ours = np.asarray(n_ours, np.float64)
    t0 = time.perf_counter()
    whole_box = 1.0 if norm == "linf" else float(np.sqrt(x_np[0].size))
    theirs = _theirs_fab(twin, norm, whole_box, steps, 1)(x_t, y_t).permute(0, 2, 3, 1).numpy()
    t_theirs = time.perf_counter() - t0
    theirs_found = clean & (np.asarray(predict(jnp.asarray(theirs))) != y_np)
    n_theirs = _dist(theirs, x_np, norm)
    ours_found = clean & np.isfinite(n_ours)
    both = ours_found & theirs_found
    ratio = n_ours[both] / n_theirs[both]
    out["min_norm_one_target"] = {
        "found_by_ours": int(ours_found.sum()),
        "found_by_torchattacks": int(theirs_found.sum()),
        "found_by_both": int(both.sum()),
        "median_norm_ours": float(np.median(n_ours[both])),
        "median_norm_torchattacks": float(np.median(n_theirs[both])),
        "ratio_quantiles_0_5_50_95_100": [float(q) for q in
                                          np.quantile(ratio, [0.0, 0.05, 0.5, 0.95, 1.0])],
        "within_1_percent": float(np.mean(np.abs(ratio - 1) <= 0.01)),
        "ours_smaller": int((ratio < 1 - 1e-6).sum()),
        "torchattacks_smaller": int((ratio > 1 + 1e-6).sum()),
        "ours_seconds": t_ours, "torchattacks_seconds": t_theirs,
    }
    return out


def to_markdown(r: dict) -> list[str]:
    e, m = r["at_eps"], r["min_norm_one_target"]
    q = m["ratio_quantiles_0_5_50_95_100"]
    return [
        f"{r['n']} images, clean accuracy {r['clean_accuracy']:.3f}; FAB-T {r['norm']}, "
        f"{r['steps']} "
        f"iterations, {r['targets']} targets, 1 restart each.", "",
        "| at eps | eps | robust acc. ours | robust acc. torchattacks | broken by both / ours only "
        "/ theirs only | ours s | torchattacks s |", "|---|---:|---:|---:|---|---:|---:|",
        f"| FAB-T | {r['eps']:g} | {e['ours_robust_accuracy']:.3f} | "
        f"{e['torchattacks_robust_accuracy']:.3f} | {e['broken_by_both']} / "
        f"{e['broken_by_ours_only']} / {e['broken_by_torchattacks_only']} | "
        f"{e['ours_seconds']:.1f} | {e['torchattacks_seconds']:.1f} |", "",
        f"| minimal {r['norm']} norm, 1 target | found ours / theirs / both | median ours | "
        "median theirs | ratio ours/theirs min/5/50/95 %/max | within 1 % | ours s | "
        "torchattacks s |",
        "|---|---|---:|---:|---|---:|---:|---:|",
        f"| FAB (target: 2nd logit) | {m['found_by_ours']} / {m['found_by_torchattacks']} / "
        f"{m['found_by_both']} | {m['median_norm_ours']:.4f} | {m['median_norm_torchattacks']:.4f}"
        f" | {' / '.join(f'{v:.3f}' for v in q)} | {m['within_1_percent']:.1%} | "
        f"{m['ours_seconds']:.1f} | {m['torchattacks_seconds']:.1f} |",
    ]


def define_flags() -> None:
    """This entry point's flags (defined when it runs as a program only; see :mod:`benchmarks`)."""
    flags.DEFINE_integer("n", 200, "images")
    flags.DEFINE_enum("norm", "linf", ["linf", "l2"], None)
    flags.DEFINE_float("eps", 0.1, "radius")
    flags.DEFINE_integer("steps", 100, "FAB iterations per target")
    flags.DEFINE_integer("targets", 9, "target classes (at eps)")
    flags.DEFINE_integer("train_steps", 100, None)
    flags.DEFINE_string("out", None, "write markdown here (and JSON next to it)")


def main(argv) -> None:
    common.check_no_arguments(argv)
    if FLAGS.n < 1 or FLAGS.steps < 1 or not 1 <= FLAGS.targets <= 9 or FLAGS.eps < 0:
        raise app.UsageError("--n, --steps >= 1, --targets in [1, 9], --eps >= 0")
    torch, torchattacks = common.require_torch(torchattacks=True)
    t0 = time.perf_counter()
    r = compare(FLAGS.n, FLAGS.eps, FLAGS.steps, FLAGS.targets, FLAGS.train_steps, FLAGS.norm)
    r["total_seconds"] = time.perf_counter() - t0
    lines = ["# FAB-T: ours vs torchattacks", "",
             f"jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} "
             f"threads), torchattacks {torchattacks.__version__}; total "
             f"{r['total_seconds']:.0f} s.", "", *to_markdown(r)]
    common.report("\n".join(lines), r, FLAGS.out)


if __name__ == "__main__":
    define_flags()
    app.run(main)
