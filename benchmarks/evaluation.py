"""``evaluate_robustness`` with our AutoAttack ensembles vs torchattacks' on the same weights.

    python -m benchmarks.evaluation [--n 200] [--eps 0.1] [--repeats 2] [--versions fast,standard]
                                    [--sides ours,torchattacks] [--train_steps 200] [--out FILE.md]

The issue's setting: 200 Fashion-MNIST-sized images (synthetic 28x28x1 data, as in
:mod:`benchmarks.attacks`), eps = 0.1 L-inf, the small CNN, here adversarially trained
(``--train_steps`` Adam steps on clean + PGD-5 examples) so that some points survive APGD and the
later members have work to do. Our side is one whole
:func:`tscnc_jax.evaluation.evaluate_robustness` call (clean pass, every member of
``autoattack_members(version)`` in cascade, soundness checks and the final verification; no
gradient-masking diagnostics unless ``--sanity_checks``). The other side is torchattacks 3.5.1
(``pip install --no-deps torchattacks==3.5.1``, with ``pip install torch==2.13.0``) on the
PyTorch twin (:func:`benchmarks.torch_twin.build_twin`) carrying the same weights: its
``MultiAttack`` over the same members, paired by name (``apgd-ce`` -> ``APGD``, ``apgd-t`` ->
``APGDT``, ``fab-t`` -> ``FAB(multi_targeted=True)``, ``square`` -> ``Square``), with our
version's budgets passed explicitly (torchattacks' own ``AutoAttack(version="standard")`` runs
APGD and FAB for only 10 iterations: standard here is APGD-CE 100 iterations, APGD-T 9 targets x
100, FAB-T 9 targets x 100, Square 5000 queries).

Images per second are medians over ``--repeats`` calls, the two libraries interleaved in every
repeat, after one warm-up call each. Our warm-up call is reported separately ("cold"): it includes
compilation, which later calls reuse from the module's compile cache. Robust accuracies are
reported for both as a sanity check; they are different implementations with different random
draws, so they need not agree exactly.
"""

from __future__ import annotations

import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

import tscnc_jax as tj
from benchmarks import attacks as attack_bench
from benchmarks import common, torch_twin
from tscnc_jax import attacks, evaluation

FLAGS = flags.FLAGS
SIDES = ("ours", "torchattacks")


def train_robust_small_cnn(steps: int, eps: float, seed: int = 0):
    """``(logits_fn, variables)``: the small CNN after ``steps`` Adam steps (1e-3, batch 128) on
    synthetic 28x28 data, each on the clean batch and its PGD-5 adversarial examples at ``eps``
    (200 steps: clean accuracy 1.0, PGD-20 robust accuracy about 0.2 at eps 0.1);
    ``logits_fn`` is ``functools.partial(model.apply, variables)``."""
    model = tj.create_model("small_cnn")
    x_tr, y_tr = attack_bench.synthetic_28x28(jax.random.key(seed), 8192)
    x_tr, y_tr = np.asarray(x_tr), np.asarray(y_tr)
    variables = model.init(jax.random.key(seed + 1), x_tr[:1])
    tx = optax.adam(1e-3)
    opt = tx.init(variables)

    @jax.jit
    def step(variables, opt, xb, yb, k):
        x_adv = attacks.pgd(functools.partial(model.apply, variables), xb, yb, key=k, eps=eps,
                            steps=5)
        xx, yy = jnp.concatenate([xb, x_adv]), jnp.concatenate([yb, yb])

        def loss_fn(v):
            return optax.softmax_cross_entropy_with_integer_labels(model.apply(v, xx), yy).mean()

        updates, opt = tx.update(jax.grad(loss_fn)(variables), opt, variables)
        return optax.apply_updates(variables, updates), opt

    rng = np.random.default_rng(seed)
    for i in range(steps):
        idx = rng.integers(0, len(y_tr), 128)
        variables, opt = step(variables, opt, x_tr[idx], y_tr[idx], jax.random.key(i))
    variables = jax.device_get(variables)
    return functools.partial(model.apply, variables), variables


def _budget(cfg, names: tuple[str, ...], default):
    """The first of ``names`` that ``cfg`` has (FAB-T's field names are not fixed yet)."""
    for n in names:
        if hasattr(cfg, n):
            return getattr(cfg, n)
    return default


def torchattacks_members(twin, version: str, eps: float, names: list[str], n_classes: int = 10):
    """torchattacks' attacks paired by name with our members, at our version's budgets."""
    import torchattacks

    cfg = attacks.AUTOATTACK_VERSIONS[version]
    out = []
    for name in names:
        if name == "apgd-ce":
            out.append(torchattacks.APGD(twin, eps=eps, steps=cfg.apgd_ce_steps, loss="ce",
                                         n_restarts=cfg.apgd_ce_restarts, rho=cfg.rho))
        elif name == "apgd-t":
            a = torchattacks.APGDT(twin, eps=eps, steps=cfg.apgd_t_steps,
                                   n_restarts=cfg.apgd_t_restarts, rho=cfg.rho,
                                   n_classes=n_classes)
            a.n_target_classes = min(cfg.apgd_t_targets, n_classes - 1)
            out.append(a)
        elif name in ("fab-t", "fab"):
            a = torchattacks.FAB(
                twin, eps=eps, multi_targeted=True, n_classes=n_classes,
                steps=_budget(cfg, ("fab_t_steps", "fab_steps"), 100),
                n_restarts=_budget(cfg, ("fab_t_restarts", "fab_restarts"), 1))
            a.n_target_classes = min(_budget(cfg, ("fab_t_targets", "fab_targets"), 9),
                                     n_classes - 1)
            out.append(a)
        elif name == "square":
            out.append(torchattacks.Square(twin, eps=eps, n_queries=cfg.square_queries,
                                           p_init=cfg.square_p_init,
                                           n_restarts=cfg.square_restarts,
                                           resc_schedule=cfg.square_rescale_schedule))
        else:
            raise ValueError(f"no torchattacks counterpart for our member {name!r}")
    return out


def compare(n: int, eps: float, repeats: int, versions: list[str], sides: list[str],
            train_steps: int, sanity_checks: bool) -> dict:
    t0 = time.perf_counter()
    logits_fn, variables = train_robust_small_cnn(train_steps, eps)
    train_s = time.perf_counter() - t0
    x, y = attack_bench.synthetic_28x28(jax.random.key(99), n)
    x, y = np.array(x), np.array(y).astype(np.int32)  # writable copies (torch.from_numpy)
    results = {"machine": common.machine_info(), "n": n, "eps": eps, "repeats": repeats,
               "train_steps": train_steps, "train_seconds": train_s,
               "sanity_checks": sanity_checks, "versions": {}}
    twin = None
    if "torchattacks" in sides:
        import torch

        twin = torch_twin.build_twin("small_cnn", variables).eval()
        x_t = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
        y_t = torch.from_numpy(y).long()
    for version in versions:
        names = [m[0] for m in attacks.autoattack_members(version, n_classes=10)]
        row: dict = {"members": names}
        fns = {}
        out: dict = {}
        cold: list[float] = []

        def ours(version=version, out=out, cold=cold):
            t = time.perf_counter()
            out["ours"] = evaluation.evaluate_robustness(
                logits_fn, [(x, y)], eps=eps, attacks=version, key=jax.random.key(0),
                sanity_checks=sanity_checks)
            if not cold:
                cold.append(time.perf_counter() - t)

        if "ours" in sides:
            fns["ours"] = ours
        if "torchattacks" in sides:
            multi = torchattacks_members(twin, version, eps, names)
            theirs = multi[0] if len(multi) == 1 else __import__("torchattacks").MultiAttack(multi)

            def run_theirs(theirs=theirs, out=out):
                out["theirs"] = theirs(x_t, y_t).detach()

            fns["torchattacks"] = run_theirs
        t = torch_twin.interleaved_medians(fns, repeats, warmup=1)
        if "ours" in sides:
            rep = out["ours"]
            row["ours"] = {"images_per_s": n / t["ours"], "seconds": t["ours"],
                           "cold_seconds": cold[0], "robust_accuracy": rep.ensemble_robust_accuracy,
                           "clean_accuracy": rep.clean_accuracy,
                           "robust_after": dict(rep.robust_accuracy),
                           "member_seconds": {k: rep.seconds[k] for k in names}}
        if "torchattacks" in sides:
            import torch

            adv = out["theirs"]
            max_linf = float((adv - x_t).abs().max())
            if max_linf > eps + 1e-5 or float(adv.min()) < 0 or float(adv.max()) > 1:
                raise RuntimeError(f"torchattacks left the threat model (L-inf {max_linf})")
            with torch.no_grad():
                acc = float((twin(adv).argmax(1) == y_t).float().mean())
            row["torchattacks"] = {"images_per_s": n / t["torchattacks"],
                                   "seconds": t["torchattacks"], "robust_accuracy": acc}
        results["versions"][version] = row
        print(version, {k: v for k, v in row.items() if k != "members"}, flush=True)
    return results


def to_markdown(r: dict) -> str:
    m = r["machine"]
    lines = [
        "# evaluate_robustness vs torchattacks (AutoAttack members, same weights)", "",
        f"jax {m['jax']} on {m['backend']} ({m['cpu_count']} cores); small CNN after "
        f"{r['train_steps']} adversarial training steps; {r['n']} synthetic 28x28x1 images, "
        f"L-inf eps {r['eps']:g}; median of {r['repeats']} interleaved call(s) after one warm-up "
        f"each; gradient-masking diagnostics {'on' if r['sanity_checks'] else 'off'}.", "",
        "| version | members | ours img/s (s) | ours cold s | torchattacks img/s (s) | "
        "robust acc. ours / torchattacks |",
        "|---|---|---:|---:|---:|---:|"]
    for version, row in r["versions"].items():
        o, t = row.get("ours"), row.get("torchattacks")
        ours = f"{o['images_per_s']:.2f} ({o['seconds']:.1f})" if o else "-"
        cold = f"{o['cold_seconds']:.1f}" if o else "-"
        theirs = f"{t['images_per_s']:.2f} ({t['seconds']:.1f})" if t else "-"
        accs = " / ".join(f"{s['robust_accuracy']:.3f}" if s else "-" for s in (o, t))
        lines.append(f"| {version} | {', '.join(row['members'])} | {ours} | {cold} | {theirs} | "
                     f"{accs} |")
    for version, row in r["versions"].items():
        o = row.get("ours")
        if o:
            per = ", ".join(f"{k} {v:.1f} s (robust after: {o['robust_after'][k]:.3f})"
                            for k, v in o["member_seconds"].items())
            lines.append(f"\nOurs, {version}, last call per member: {per}; clean accuracy "
                         f"{o['clean_accuracy']:.3f}.")
    return "\n".join(lines) + "\n"


def define_flags() -> None:
    """This entry point's flags (defined when it runs as a program only; see :mod:`benchmarks`)."""
    flags.DEFINE_integer("n", 200, "images evaluated")
    flags.DEFINE_float("eps", 0.1, "L-inf radius (also the training attack's)")
    flags.DEFINE_integer("repeats", 2, "timed calls per side and version")
    flags.DEFINE_integer("train_steps", 200, "adversarial training steps of the small CNN")
    flags.DEFINE_string("versions", "fast,standard", "comma list of AutoAttack versions")
    flags.DEFINE_string("sides", ",".join(SIDES), f"comma list of {SIDES}")
    flags.DEFINE_bool("sanity_checks", False, "run evaluate_robustness' masking diagnostics")
    flags.DEFINE_string("out", None, "write markdown here (and JSON next to it)")


def main(argv) -> None:
    common.check_no_arguments(argv)
    versions = [v.strip() for v in FLAGS.versions.split(",") if v.strip()]
    sides = [s.strip() for s in FLAGS.sides.split(",") if s.strip()]
    if set(versions) - set(attacks.AUTOATTACK_VERSIONS) or not versions:
        raise app.UsageError(f"--versions: choose from {tuple(attacks.AUTOATTACK_VERSIONS)}")
    if set(sides) - set(SIDES) or not sides:
        raise app.UsageError(f"--sides: choose from {SIDES}")
    if FLAGS.n < 1 or FLAGS.repeats < 1 or FLAGS.train_steps < 0 or FLAGS.eps < 0:
        raise app.UsageError("--n and --repeats must be >= 1, --train_steps and --eps >= 0")
    if "torchattacks" in sides:
        common.require_torch(torchattacks=True)
    results = compare(FLAGS.n, FLAGS.eps, FLAGS.repeats, versions, sides, FLAGS.train_steps,
                      FLAGS.sanity_checks)
    common.report(to_markdown(results), results, FLAGS.out)


if __name__ == "__main__":
    define_flags()
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    app.run(main)
