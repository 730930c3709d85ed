"""Our AutoAttack ensemble against torchattacks' on the same weights, same data, same budgets.

    python -m benchmarks.torchattacks_twin [--repeats 3] [--batch 128] [--eps 0.1]

The small CNN of :mod:`benchmarks.attacks` (trained briefly on synthetic 28x28 data) is copied
into its PyTorch twin (:func:`benchmarks.torch_twin.build_twin`), and both ensembles run at equal
settings, those of our ``fast`` version: APGD-CE (25 iterations, 1 restart, rho 0.75), APGD-T (25
iterations, 3 target classes, 1 restart), Square (250 queries, p_init 0.8, rescaled schedule),
each later attack run only on the examples the earlier ones left (torchattacks'
``MultiAttack``). torchattacks' members are built from ours by name, FAB-T included
(``FAB(multi_targeted=True)``) should a version with it be compared; ``fast`` has none (see
:data:`tscnc_jax.attacks.AUTOATTACK_FAST`), :mod:`benchmarks.fab_twin` compares FAB-T alone.
torchattacks 3.5.1 (``pip install --no-deps torchattacks==3.5.1``; a benchmark-only dependency,
like torch) runs eagerly with PyTorch's default threads. Two workloads: at ``eps`` (APGD-CE
breaks most examples) and at eps = 0 (nothing ever breaks, every attack runs its full budget: the
cost on a model robust on every example). Images per second are medians over repeats, the two
libraries interleaved in every repeat; robust accuracy is reported for both as a sanity check
(they are different implementations with different random draws, so they need not agree
exactly).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks import attacks as attack_bench
from benchmarks import common, torch_twin
from tscnc_jax import attacks

FAST = attacks.AUTOATTACK_FAST

FLAGS = flags.FLAGS


def _torchattacks_member(name: str, twin, eps: float):
    """torchattacks' counterpart of our member ``name`` at the fast budgets."""
    import torchattacks

    if name == "apgd-ce":
        return torchattacks.APGD(twin, eps=eps, steps=FAST.apgd_ce_steps, loss="ce",
                                 n_restarts=FAST.apgd_ce_restarts, rho=FAST.rho)
    if name == "apgd-t":
        apgd_t = torchattacks.APGDT(twin, eps=eps, steps=FAST.apgd_t_steps,
                                    n_restarts=FAST.apgd_t_restarts, rho=FAST.rho, n_classes=10)
        apgd_t.n_target_classes = FAST.apgd_t_targets
        return apgd_t
    if name == "fab-t":
        fab_t = torchattacks.FAB(twin, norm="Linf", eps=eps, steps=FAST.fab_t_steps,
                                 n_restarts=FAST.fab_t_restarts, multi_targeted=True,
                                 n_classes=10)
        fab_t.n_target_classes = FAST.fab_t_targets
        return fab_t
    if name == "square":
        return torchattacks.Square(twin, eps=eps, n_queries=FAST.square_queries,
                                   p_init=FAST.square_p_init, n_restarts=FAST.square_restarts,
                                   resc_schedule=FAST.square_rescale_schedule)
    raise ValueError(f"no torchattacks counterpart for {name!r}")


def _torchattacks_ensemble(twin, eps: float):
    import torchattacks

    return torchattacks.MultiAttack([
        _torchattacks_member(name, twin, eps)
        for name, _ in attacks.autoattack_members("fast", n_classes=10)])


def compare(batch: int, repeats: int, eps: float, train_steps: int = 100) -> dict:
    """``{"at_eps": row, "worst": row}``, each row with both libraries' images/s, robust
    accuracy and the ratio of throughputs (ours / torchattacks')."""
    logits_fn, _, clean_acc = attack_bench.train_small_cnn(train_steps)
    variables = logits_fn.args[0]
    twin = torch_twin.build_twin("small_cnn", variables).eval()
    x, y = attack_bench.synthetic_28x28(jax.random.key(99), batch)
    rows = {"clean_accuracy": clean_acc, "batch": batch, "eps": eps}
    for label, e in (("at_eps", eps), ("worst", 0.0)):
        rows[label] = _workload(logits_fn, twin, x, y, e, repeats)
        print(f"{label}: ours {rows[label]['ours_images_per_s']:.1f} img/s, torchattacks "
              f"{rows[label]['torchattacks_images_per_s']:.1f} img/s", flush=True)
    rows["members"] = _members(logits_fn, twin, x, y, repeats)
    return rows


# Model passes per member at the fast budgets: (forward + input-gradient passes, forwards).
_PASSES = {"apgd-ce": (FAST.apgd_ce_steps + 1, 0),
           "apgd-t": (FAST.apgd_t_targets * (FAST.apgd_t_steps + 1), 1),
           # FAB-T: per target and iteration one forward + gradient and one forward; per target
           # the clean forward of the run, plus the check of its result in the ball.
           "fab-t": (FAST.fab_t_targets * FAST.fab_t_steps,
                     FAST.fab_t_targets * (FAST.fab_t_steps + 2) + 1),
           "square": (0, FAST.square_queries + 1)}


def _members(logits_fn, twin, x, y, repeats: int) -> dict:
    """Worst case (eps = 0) per member, plus both frameworks' forward and forward + input
    gradient of the batch; seconds are interleaved medians."""
    import torch

    x_t = torch.from_numpy(np.asarray(x)).permute(0, 3, 1, 2).contiguous()
    y_t = torch.from_numpy(np.asarray(y)).long()
    key = jax.random.key(0)
    fwd = jax.jit(logits_fn).lower(x).compile()
    grad = jax.jit(jax.grad(lambda a: attacks.cross_entropy_loss(logits_fn(a), y).sum())).lower(
        x).compile()

    def torch_grad():
        a = x_t.clone().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(twin(a), y_t, reduction="sum")
        torch.autograd.grad(loss, a)

    def torch_fwd():
        with torch.no_grad():
            twin(x_t)

    passes = torch_twin.interleaved_medians({
        "ours_forward": lambda: fwd(x).block_until_ready(),
        "torch_forward": torch_fwd,
        "ours_forward_grad": lambda: grad(x).block_until_ready(),
        "torch_forward_grad": torch_grad,
    }, max(repeats, 10))
    theirs = _torchattacks_ensemble(twin, 0.0).attacks
    out = {"passes": passes, "members": {}}
    for (name, attack), their in zip(attacks.autoattack_members("fast", n_classes=10), theirs,
                                     strict=True):
        ours = jax.jit(lambda a, b, k, attack=attack: attack(
            logits_fn, a, b, key=k, eps=0.0)).lower(x, y, key).compile()
        t = torch_twin.interleaved_medians({
            "ours": lambda ours=ours: ours(x, y, key).block_until_ready(),
            "torchattacks": lambda their=their: their(x_t, y_t)}, repeats, warmup=1)
        n_grad, n_fwd = _PASSES[name]
        out["members"][name] = {
            **t, "grad_passes": n_grad, "forward_passes": n_fwd,
            "ours_floor": n_grad * passes["ours_forward_grad"] + n_fwd * passes["ours_forward"],
            "torch_floor": n_grad * passes["torch_forward_grad"] + n_fwd * passes["torch_forward"],
        }
        print(f"worst case, {name}: ours {t['ours']:.2f} s, torchattacks {t['torchattacks']:.2f} s",
              flush=True)
    return out


def _workload(logits_fn, twin, x, y, eps: float, repeats: int) -> dict:
    import torch

    batch = x.shape[0]
    x_t = torch.from_numpy(np.asarray(x)).permute(0, 3, 1, 2).contiguous()
    y_t = torch.from_numpy(np.asarray(y)).long()
    ours = jax.jit(lambda a, b, k: attacks.auto_attack(
        logits_fn, a, b, key=k, eps=eps, version="fast").x_adv).lower(
        x, y, jax.random.key(0)).compile()
    theirs = _torchattacks_ensemble(twin, eps)
    out = {}

    def run_ours():
        out["ours"] = jax.block_until_ready(ours(x, y, jax.random.key(0)))

    def run_theirs():
        out["theirs"] = theirs(x_t, y_t).detach()

    t = torch_twin.interleaved_medians({"ours": run_ours, "torchattacks": run_theirs}, repeats,
                                       warmup=1)
    x_adv_t = out["theirs"].permute(0, 2, 3, 1).numpy()
    max_linf = float(np.max(np.abs(x_adv_t - np.asarray(x))))
    if max_linf > eps + 1e-5 or x_adv_t.min() < 0 or x_adv_t.max() > 1:
        raise RuntimeError(f"torchattacks left the threat model (L-inf {max_linf} > {eps} or "
                           "outside [0, 1]): the comparison would not be at equal settings")
    with torch.no_grad():
        theirs_acc = float((twin(out["theirs"]).argmax(1) == y_t).float().mean())
    predict = jax.jit(lambda z: jnp.argmax(logits_fn(z), -1))
    return {
        "eps": eps,
        "ours_images_per_s": batch / t["ours"],
        "torchattacks_images_per_s": batch / t["torchattacks"],
        "speedup": t["torchattacks"] / t["ours"],
        "ours_robust_accuracy": float(jnp.mean(predict(out["ours"]) == y)),
        "torchattacks_robust_accuracy": theirs_acc,
        "torchattacks_max_linf": max_linf,
    }


def to_markdown(r: dict) -> list[str]:
    lines = ["| workload | eps | ours img/s | torchattacks img/s | speed-up | robust acc. ours / "
             "torchattacks |", "|---|---:|---:|---:|---:|---:|"]
    for label, name in (("at_eps", "fast ensemble, at eps"),
                        ("worst", "fast ensemble, worst case (nothing breaks)")):
        w = r[label]
        lines.append(f"| {name} | {w['eps']:g} | {w['ours_images_per_s']:.1f} | "
                     f"{w['torchattacks_images_per_s']:.1f} | {w['speedup']:.1f}x | "
                     f"{w['ours_robust_accuracy']:.3f} / {w['torchattacks_robust_accuracy']:.3f} |")
    if "members" not in r:
        return lines
    m = r["members"]
    p = m["passes"]
    lines += ["", "Worst case per member: one forward of the batch takes "
              f"{1e3 * p['ours_forward']:.1f} ms here and {1e3 * p['torch_forward']:.1f} ms in "
              "PyTorch, forward + input "
              f"gradient {1e3 * p['ours_forward_grad']:.1f} / {1e3 * p['torch_forward_grad']:.1f}"
              " ms; floor = the member's model passes at those costs.", "",
              "| member | model passes (fwd+grad, fwd) | ours s | ours floor s | torchattacks s | "
              "torchattacks floor s | speed-up |", "|---|---|---:|---:|---:|---:|---:|"]
    tot = dict.fromkeys(("ours", "ours_floor", "torchattacks", "torch_floor"), 0.0)
    for name, e in m["members"].items():
        for k in tot:
            tot[k] += e[k]
        lines.append(f"| {name} | {e['grad_passes']}, {e['forward_passes']} | {e['ours']:.2f} | "
                     f"{e['ours_floor']:.2f} | {e['torchattacks']:.2f} | {e['torch_floor']:.2f} | "
                     f"{e['torchattacks'] / e['ours']:.1f}x |")
    lines.append(f"| sum | | {tot['ours']:.2f} | {tot['ours_floor']:.2f} | "
                 f"{tot['torchattacks']:.2f} | {tot['torch_floor']:.2f} | "
                 f"{tot['torchattacks'] / tot['ours']:.1f}x |")
    return lines


def define_flags() -> None:
    """This entry point's flags (defined when it runs as a program only; see :mod:`benchmarks`)."""
    flags.DEFINE_integer("repeats", 3, None)
    flags.DEFINE_integer("batch", 128, None)
    flags.DEFINE_float("eps", 0.1, None)


def main(argv) -> None:
    common.check_no_arguments(argv)
    torch, torchattacks = common.require_torch(torchattacks=True)
    lines = ["# AutoAttack (fast settings): ours vs torchattacks", "",
             f"jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} "
             f"threads), torchattacks {torchattacks.__version__}, {os.cpu_count()} cores; batch "
             f"{FLAGS.batch}; median of {FLAGS.repeats} interleaved runs.", ""]
    lines += to_markdown(compare(FLAGS.batch, FLAGS.repeats, FLAGS.eps))
    print("\n".join(lines))


if __name__ == "__main__":
    define_flags()
    app.run(main)
