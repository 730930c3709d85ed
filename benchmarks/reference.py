"""Our AutoAttack evaluation against the reference AutoAttack on models it has not seen.

    python -m benchmarks.reference [--models lenet5_dense_s2,lenet5_hydra95_s2,lenet5_dense_s2_q8]
                                   [--n 500] [--eps 0.1] [--seeds 0] [--masked_seeds 0,1]
                                   [--batch 128] [--square_compare masked] [--resume]
                                   [--out benchmarks/results/reference.md]

The requirement it checks: our evaluation never reports a robust accuracy more than 0.5 points
above the reference AutoAttack's. For each model (a JAX ``logits_fn`` on NHWC images in [0, 1])
and seed, on the same images at the same L-inf ``eps``:

* **ours**: one :func:`tscnc_jax.evaluation.evaluate_robustness` call with the ``standard``
  version (APGD-CE, APGD-T, FAB-T, Square in cascade, soundness checks, AutoAttack's checks and
  the gradient-masking diagnostics), key ``jax.random.key(seed)``;
* **the reference**: torchattacks 3.5.1's members built explicitly with AutoAttack's
  (``fra31/auto-attack``, ``version='standard'``) budgets, :data:`REFERENCE`: APGD-CE (100
  iterations, 1 restart, rho 0.75), APGD-T (100 iterations, 9 target classes, 1 restart), FAB-T
  (100 iterations, 9 target classes, 1 restart), Square (5000 queries, p_init 0.8, 1 restart,
  schedule *not* rescaled), run in cascade (each on the points the earlier ones left robust),
  every member with ``seed``. torchattacks' own ``AutoAttack(version="standard")`` is not used:
  it runs APGD and FAB for 10 iterations and rescales Square's schedule. The members attack the
  very same JAX function through an autograd bridge (:class:`JaxLogits`: forward and
  vector-Jacobian products by ``jax.jit``, batches padded to powers of two so that a few shapes
  compile), so both sides attack one model, bit for bit, and every verdict (robust or broken) is
  the JAX model's argmax on the returned input. A reference output counts only where it is
  finite, in ``[0, 1]`` and within ``eps`` (up to 1e-5); violations are counted and reported.

Per member the table gives the robust accuracy after it (cumulative, as AutoAttack prints it),
ours and the reference, and the wall times; per model the difference ``ours - reference`` in
points (the requirement: at most 0.5) and the robust accuracy of the union (points either side
broke: an upper bound both should reach).

``--square_compare`` (default: the models with gradient masking) adds the data for choosing the
standard ensemble's Square schedule (:func:`square_schedules`): the robust accuracy of the whole
ensemble with our Square (5000 queries, p_init 0.8) run with ``rescale_schedule=False``
(AutoAttack's choice, our standard version's: the run above), with ``True``, with both one after
the other, and with two independent ``False`` runs (the cost of both, one schedule); the same for
torchattacks' Square (``False``, ``True``, both). Models with gradient masking (names ending
``_q<k>``) run for every seed of ``--masked_seeds``, the others for ``--seeds``. With ``--out``
the report is rewritten after every (model, seed) row; ``--resume`` keeps the rows already there.

Models (``--models``), trained checkpoints the tests never saw, under ``--runs_dir``
(default ``runs/dose``, where ``python -m experiments.dose --workdir=runs/dose`` trains the
dose study's Fashion-MNIST runs, TRADES eps 0.1):

* ``lenet5_dense_s<seed>``: LeNet-5 adversarially trained (TRADES, 3 epochs), the dense stage of
  ``lenet5_dense_s<seed>``;
* ``lenet5_hydra95_s<seed>``: that LeNet-5 pruned to 95 % sparsity by HYDRA (global) and
  adversarially fine-tuned (``lenet5_hydra_95_s<seed>``, finetune stage);
* either name followed by ``_q<k>`` (e.g. ``lenet5_dense_s2_q8``): the model behind an input
  quantiser ``x -> stop_gradient(round(k x) / k)``: the same decisions near the data, zero input
  gradient everywhere (gradient masking: only Square and random starts can break points).

Every model is evaluated with its EMA parameters (what the runs' own evaluation uses). Data: the
first ``--n`` images of the Fashion-MNIST test split (the original idx files where
:mod:`experiments.data` finds them, else its prepared tfds copy). torch and torchattacks are
benchmark-only dependencies (``pip install torch==2.13.0`` and ``pip install --no-deps
torchattacks==3.5.1``); both run with one thread here (``torch.set_num_threads(1)``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import re
import sys
import time
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks import common
from tscnc_jax import attacks, evaluation

FLAGS = flags.FLAGS

# AutoAttack's standard version (fra31/auto-attack, autoattack.py, set_version('standard')),
# written out here rather than taken from our AUTOATTACK_STANDARD: the reference must not follow
# a change of ours. Square there: SquareAttack(p_init=.8, n_queries=5000, n_restarts=1,
# resc_schedule=False).
REFERENCE = attacks.AutoAttackConfig(
    apgd_ce_steps=100, apgd_ce_restarts=1, apgd_t_steps=100, apgd_t_targets=9,
    apgd_t_restarts=1, fab_t_steps=100, fab_t_targets=9, fab_t_restarts=1,
    square_queries=5000, square_p_init=0.8, square_restarts=1, square_rescale_schedule=False,
    rho=0.75)
TOLERANCE_POINTS = 0.5  # the requirement: ours <= reference + 0.5 points
_ATOL = 1e-5  # float rounding allowed on the threat model's bounds
_MODEL_RE = re.compile(r"^lenet5_(dense|hydra95)_s(\d+)(?:_q(\d+))?$")


# ----------------------------------------------------------------------------------------------
# The autograd bridge: a JAX logits function as a torch module.
# ----------------------------------------------------------------------------------------------


def _bucket(n: int) -> int:
    """The padded batch size: the smallest power of two >= ``n`` (at least 8)."""
    return max(8, 1 << (int(n) - 1).bit_length())


class _Counts:
    def __init__(self):
        self.forward = 0
        self.forward_grad = 0
        self.backward = 0


def _make_bridge_class():
    import torch

    class _Fn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, owner):
            logits, vjp_fn, n = owner._forward_vjp(x)
            ctx.vjp_fn, ctx.n, ctx.owner = vjp_fn, n, owner
            return logits

        @staticmethod
        def backward(ctx, g):
            return ctx.owner._backward(ctx.vjp_fn, ctx.n, g), None

    class JaxLogits(torch.nn.Module):
        """A JAX ``logits_fn`` (NHWC, or any layout when ``nchw=False``) as a torch module on
        NCHW tensors, differentiable w.r.t. its input: torch's autograd calls the function's
        vector-Jacobian product. The batch is padded to a power of two (zeros) so that few
        shapes compile; examples must be independent (no batch statistics)."""

        def __init__(self, logits_fn, nchw: bool = True):
            super().__init__()
            # torchattacks reads the device of the model's first parameter.
            self._device_anchor = torch.nn.Parameter(torch.zeros(()), requires_grad=False)
            self.nchw = nchw
            self.counts = _Counts()
            self._fwd = jax.jit(logits_fn)
            self._vjp = jax.jit(lambda z: jax.vjp(logits_fn, z))
            self._apply_vjp = jax.jit(lambda fn, g: fn(g)[0])

        def _to_jax(self, x) -> tuple[np.ndarray, int]:
            a = x.detach().cpu().numpy().astype(np.float32, copy=False)
            if self.nchw and a.ndim == 4:
                a = a.transpose(0, 2, 3, 1)
            n = a.shape[0]
            pad = np.zeros((_bucket(n), *a.shape[1:]), np.float32)
            pad[:n] = a
            return pad, n

        def _from_jax(self, a, n: int, grad: bool = False):
            a = np.array(a)[:n]
            if grad and self.nchw and a.ndim == 4:
                a = a.transpose(0, 3, 1, 2)
            return torch.from_numpy(np.ascontiguousarray(a))

        def _forward_vjp(self, x):
            a, n = self._to_jax(x)
            logits, vjp_fn = self._vjp(a)
            self.counts.forward_grad += 1
            return self._from_jax(logits, n), vjp_fn, n

        def _backward(self, vjp_fn, n: int, g):
            gp = np.zeros((_bucket(n), g.shape[1]), np.float32)
            gp[:n] = g.detach().cpu().numpy()
            self.counts.backward += 1
            return self._from_jax(self._apply_vjp(vjp_fn, gp), n, grad=True)

        def logits_numpy(self, x_nhwc: np.ndarray) -> np.ndarray:
            """Logits of NHWC numpy inputs (padded like every call)."""
            n = x_nhwc.shape[0]
            pad = np.zeros((_bucket(n), *x_nhwc.shape[1:]), np.float32)
            pad[:n] = x_nhwc
            return np.asarray(self._fwd(pad))[:n]

        def forward(self, x):
            if torch.is_grad_enabled() and x.requires_grad:
                return _Fn.apply(x, self)
            a, n = self._to_jax(x)
            self.counts.forward += 1
            return self._from_jax(self._fwd(a), n)

    return JaxLogits


def JaxLogits(logits_fn, nchw: bool = True):
    """The torch module of :func:`_make_bridge_class` (needs torch) carrying ``logits_fn``."""
    return _make_bridge_class()(logits_fn, nchw)


# ----------------------------------------------------------------------------------------------
# The reference: torchattacks' members at AutoAttack's budgets, in cascade.
# ----------------------------------------------------------------------------------------------


def reference_members(bridge, cfg: attacks.AutoAttackConfig, eps: float, n_classes: int,
                      seed: int, names: list[str] | None = None) -> list[tuple[str, Any]]:
    """torchattacks' counterparts, at ``cfg``'s budgets, of the members ``names`` (default: those
    :func:`tscnc_jax.attacks.autoattack_members` gives ``cfg``), each with ``seed``."""
    import torchattacks

    if names is None:
        names = [n for n, _ in attacks.autoattack_members(cfg, n_classes=n_classes)]
    out = []
    for name in names:
        if name == "apgd-ce":
            a = torchattacks.APGD(bridge, norm="Linf", eps=eps, steps=cfg.apgd_ce_steps,
                                  n_restarts=cfg.apgd_ce_restarts, loss="ce", rho=cfg.rho,
                                  seed=seed)
        elif name == "apgd-t":
            a = torchattacks.APGDT(bridge, norm="Linf", eps=eps, steps=cfg.apgd_t_steps,
                                   n_restarts=cfg.apgd_t_restarts, rho=cfg.rho, seed=seed,
                                   n_classes=n_classes)
            a.n_target_classes = min(cfg.apgd_t_targets, n_classes - 1)
        elif name == "fab-t":
            a = torchattacks.FAB(bridge, norm="Linf", eps=eps, steps=cfg.fab_t_steps,
                                 n_restarts=cfg.fab_t_restarts, multi_targeted=True,
                                 n_classes=n_classes, seed=seed)
            a.n_target_classes = min(cfg.fab_t_targets, n_classes - 1)
        elif name == "square":
            a = torchattacks.Square(bridge, norm="Linf", eps=eps, n_queries=cfg.square_queries,
                                    p_init=cfg.square_p_init, n_restarts=cfg.square_restarts,
                                    resc_schedule=cfg.square_rescale_schedule, seed=seed)
        else:
            raise ValueError(f"no torchattacks counterpart for member {name!r}")
        out.append((name, a))
    return out


def _valid(x_adv: np.ndarray, x: np.ndarray, eps: float) -> np.ndarray:
    """Per example: finite, inside [0, 1] and within ``eps`` in L-inf (up to ``_ATOL``)."""
    flat, ref = x_adv.reshape(len(x_adv), -1), x.reshape(len(x), -1)
    return (np.isfinite(flat).all(1) & (flat.min(1) >= -_ATOL) & (flat.max(1) <= 1 + _ATOL)
            & (np.abs(flat - ref).max(1) <= eps + _ATOL))


def run_reference(logits_fn, x: np.ndarray, y: np.ndarray, *, eps: float, seed: int,
                  config: attacks.AutoAttackConfig = REFERENCE, batch_size: int = 128,
                  names: list[str] | None = None, bridge=None) -> dict:
    """The reference cascade on ``x`` (NHWC float32 in [0, 1]) and ``y``.

    Returns ``{"members", "robust_accuracy" (after each member), "n_broken", "seconds",
    "violations" (outputs outside the threat model, not counted as breaks), "clean_correct",
    "robust", "broken_by" (index in members, -1 none), "x_adv", "final_robust_accuracy",
    "bridge_calls"}``; ``x_adv`` is ``x`` where nothing broke the example."""
    import torch

    bridge = JaxLogits(logits_fn) if bridge is None else bridge
    n = len(y)
    n_classes = int(bridge.logits_numpy(x[:1]).shape[-1])
    predict = lambda z: np.concatenate(
        [bridge.logits_numpy(z[i:i + batch_size]).argmax(-1) for i in range(0, len(z),
                                                                             batch_size)])
    t_all = time.perf_counter()
    clean_correct = predict(x) == y
    robust = clean_correct.copy()
    broken_by = np.full(n, -1, np.int32)
    x_adv = x.copy()
    members = reference_members(bridge, config, eps, n_classes, seed, names)
    out = {"members": [m for m, _ in members], "robust_accuracy": {}, "n_broken": {},
           "seconds": {}, "violations": {}}
    for i, (name, attack) in enumerate(members):
        t0 = time.perf_counter()
        todo = np.flatnonzero(robust)
        bad = 0
        for s in range(0, len(todo), batch_size):
            idx = todo[s:s + batch_size]
            xt = torch.from_numpy(np.ascontiguousarray(x[idx].transpose(0, 3, 1, 2)))
            yt = torch.from_numpy(y[idx].astype(np.int64))
            adv = attack(xt, yt).detach().cpu().numpy().transpose(0, 2, 3, 1)
            ok = _valid(adv, x[idx], eps)
            bad += int((~ok).sum())
            broke = ok & (predict(np.ascontiguousarray(adv)) != y[idx])
            robust[idx[broke]] = False
            broken_by[idx[broke]] = i
            x_adv[idx[broke]] = adv[broke]
        out["n_broken"][name] = int((broken_by == i).sum())
        out["robust_accuracy"][name] = float(robust.mean())
        out["violations"][name] = bad
        out["seconds"][name] = time.perf_counter() - t0
    # Every break again, from the stored inputs (one forward pass).
    final = clean_correct & (predict(x_adv) == y)
    if not np.array_equal(final, robust):
        raise RuntimeError("reference breaks did not reproduce on the stored inputs")
    out["seconds"]["total"] = time.perf_counter() - t_all
    out.update(clean_accuracy=float(clean_correct.mean()), final_robust_accuracy=float(
        robust.mean()), clean_correct=clean_correct, robust=robust, broken_by=broken_by,
        x_adv=x_adv, bridge_calls=dict(vars(bridge.counts)))
    return out


# ----------------------------------------------------------------------------------------------
# Ours, and the comparison.
# ----------------------------------------------------------------------------------------------


def run_ours(logits_fn, x: np.ndarray, y: np.ndarray, *, eps: float, seed: int,
             version: str | attacks.AutoAttackConfig = "standard", batch_size: int = 128,
             sanity_checks: bool = True) -> dict:
    """One :func:`tscnc_jax.evaluation.evaluate_robustness` call (cascade, ``key(seed)``), as the
    same dict as :func:`run_reference` (plus ``"warnings"``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", evaluation.GradientMaskingWarning)
        r = evaluation.evaluate_robustness(
            logits_fn, [(x, y)], eps=eps, attacks=version, key=jax.random.key(seed),
            batch_size=batch_size, sanity_checks=sanity_checks, return_adversarial=True)
    predict = jax.jit(lambda z: jnp.argmax(logits_fn(z), -1))
    robust = r.clean_correct & np.concatenate(
        [np.asarray(predict(r.x_adv[i:i + batch_size])) == y[i:i + batch_size]
         for i in range(0, len(y), batch_size)])
    if int(robust.sum()) != r.n_robust:
        raise RuntimeError("our report's robust count does not match its adversarial inputs")
    return {"members": list(r.attacks), "robust_accuracy": dict(r.robust_accuracy),
            "n_broken": dict(r.n_broken), "seconds": dict(r.seconds),
            "clean_accuracy": r.clean_accuracy,
            "final_robust_accuracy": r.ensemble_robust_accuracy, "clean_correct": r.clean_correct,
            "robust": robust, "broken_by": r.broken_by, "x_adv": r.x_adv,
            "warnings": list(r.warnings)}


def compare(logits_fn, x: np.ndarray, y: np.ndarray, *, eps: float, seed: int = 0,
            ours: str | attacks.AutoAttackConfig = "standard",
            reference: attacks.AutoAttackConfig = REFERENCE, batch_size: int = 128,
            sanity_checks: bool = True, bridge=None) -> dict:
    """Ours and the reference on the same model, images and seed (module docstring).

    ``x``: NHWC float32 in [0, 1]; ``y``: int labels. Returns ``{"ours": ..., "reference": ...,
    "diff_points" (ours - reference final robust accuracy, in points), "within_tolerance"
    (diff_points <= 0.5), "union_robust_accuracy", "broken_by_ours_only",
    "broken_by_reference_only", ...}`` (the sides as :func:`run_ours` / :func:`run_reference`
    return them, arrays included; :func:`jsonable` drops those)."""
    x = np.ascontiguousarray(x, np.float32)
    y = np.asarray(y, np.int32)
    c0 = time.process_time()
    o = run_ours(logits_fn, x, y, eps=eps, seed=seed, version=ours, batch_size=batch_size,
                 sanity_checks=sanity_checks)
    c1 = time.process_time()
    r = run_reference(logits_fn, x, y, eps=eps, seed=seed, config=reference,
                      batch_size=batch_size, bridge=bridge)
    o["cpu_seconds"], r["cpu_seconds"] = c1 - c0, time.process_time() - c1
    if not np.array_equal(o["clean_correct"], r["clean_correct"]):
        raise RuntimeError("the two sides disagree on the clean predictions")
    diff = 100.0 * (o["final_robust_accuracy"] - r["final_robust_accuracy"])
    return {"n": len(y), "eps": eps, "seed": seed, "ours": o, "reference": r,
            "diff_points": diff, "within_tolerance": bool(diff <= TOLERANCE_POINTS),
            "union_robust_accuracy": float((o["robust"] & r["robust"]).mean()),
            "broken_by_ours_only": int((~o["robust"] & r["robust"]).sum()),
            "broken_by_reference_only": int((o["robust"] & ~r["robust"]).sum())}


def _square_member(cfg: attacks.AutoAttackConfig, rescale: bool):
    variant = dataclasses.replace(cfg, square_rescale_schedule=rescale)
    return dict(attacks.autoattack_members(variant, n_classes=10))["square"]


def _white_box_survivors(side: dict) -> np.ndarray:
    """Indices of the clean-correct examples no white-box member (before Square) broke."""
    white_box = [i for i, m in enumerate(side["members"]) if not m.startswith("square")]
    return np.flatnonzero(side["clean_correct"] & ~np.isin(side["broken_by"], white_box))


def square_schedules(logits_fn, x: np.ndarray, y: np.ndarray, row: dict, *, eps: float,
                     seed: int, config: attacks.AutoAttackConfig = attacks.AUTOATTACK_STANDARD,
                     second_false: bool = True, reference: bool = True, batch_size: int = 128,
                     bridge=None) -> dict:
    """The standard ensemble with other Square schedules, from a :func:`compare` result ``row``.

    On the points our white-box members (APGD-CE, APGD-T, FAB-T) left robust, one more Square run
    of ours with ``rescale_schedule=True`` (``T``) and, with ``second_false``, one more with
    ``False`` (``F2``), both ``evaluate_robustness`` calls with Square only, ``key(seed)``
    (independent of the standard run's Square, ``F``; the same per-example keys for ``T`` and
    ``F2``); with ``reference``, torchattacks' Square rescaled (``seed``) on the points the
    reference's white-box members left robust. Returns the robust accuracy of each ensemble
    over all ``len(y)`` images: ``ours_F`` (the standard run), ``ours_T`` (white-box then ``T``),
    ``ours_F_T`` (the standard run then ``T``: both schedules), ``ours_F_F2`` (the standard run
    then ``F2``: two runs of one schedule, the cost of ``ours_F_T``), ``ref_F``, ``ref_T``,
    ``ref_F_T``; ``F_only`` / ``T_only``: points of ours that only ``F`` / only ``T`` broke; the
    number of points and the seconds (wall and CPU) of each extra run."""
    o, r = row["ours"], row["reference"]
    n = len(y)
    idx = _white_box_survivors(o)
    out: dict[str, Any] = {"points": len(idx), "ref_points": 0, "seed": seed, "runs": {}}
    broke_f = np.zeros(n, bool)
    broke_f[idx] = ~o["robust"][idx]  # what the standard run's Square broke
    extra = {"T": True, **({"F2": False} if second_false else {})}
    broke: dict[str, np.ndarray] = {}
    for label, rescale in extra.items():
        broke[label] = np.zeros(n, bool)
        if len(idx) == 0:
            continue
        t0, c0 = time.perf_counter(), time.process_time()
        rep = evaluation.evaluate_robustness(
            logits_fn, [(x[idx], y[idx])], eps=eps, key=jax.random.key(seed),
            attacks=[("square", _square_member(config, rescale))], batch_size=batch_size,
            sanity_checks=False)
        broke[label][idx] = rep.clean_correct & (rep.broken_by >= 0)
        out["runs"][label] = {"seconds": time.perf_counter() - t0,
                              "cpu_seconds": time.process_time() - c0}
    survivors = np.zeros(n, bool)
    survivors[idx] = True
    out["ours_F"] = float(o["robust"].mean())
    out["ours_T"] = float((survivors & ~broke["T"]).mean())
    out["ours_F_T"] = float((o["robust"] & ~broke["T"]).mean())
    if second_false:
        out["ours_F_F2"] = float((o["robust"] & ~broke["F2"]).mean())
    out["F_only"] = int((broke_f & ~broke["T"]).sum())
    out["T_only"] = int((~broke_f & broke["T"]).sum())
    out["ref_F"] = float(r["robust"].mean())
    if reference:
        ridx = _white_box_survivors(r)
        out["ref_points"] = len(ridx)
        ref_broke = np.zeros(n, bool)
        if len(ridx):
            t0, c0 = time.perf_counter(), time.process_time()
            cfg = dataclasses.replace(REFERENCE, square_queries=config.square_queries,
                                      square_p_init=config.square_p_init,
                                      square_rescale_schedule=True)
            rr = run_reference(logits_fn, x[ridx], y[ridx], eps=eps, seed=seed, config=cfg,
                               batch_size=batch_size, names=["square"], bridge=bridge)
            ref_broke[ridx] = rr["clean_correct"] & ~rr["robust"]
            out["runs"]["ref_T"] = {"seconds": time.perf_counter() - t0,
                                    "cpu_seconds": time.process_time() - c0,
                                    "violations": rr["violations"]["square"]}
        r_surv = np.zeros(n, bool)
        r_surv[ridx] = True
        out["ref_T"] = float((r_surv & ~ref_broke).mean())
        out["ref_F_T"] = float((r["robust"] & ~ref_broke).mean())
    return out


def jsonable(d: Any) -> Any:
    """``d`` without numpy arrays (for the JSON file)."""
    if isinstance(d, dict):
        return {k: jsonable(v) for k, v in d.items() if not isinstance(v, np.ndarray)}
    if isinstance(d, list | tuple):
        return [jsonable(v) for v in d]
    if isinstance(d, np.generic):
        return d.item()
    return d


# ----------------------------------------------------------------------------------------------
# Models and data.
# ----------------------------------------------------------------------------------------------


def _quantised(apply_fn, levels: int, variables, x):
    """``apply_fn(variables, q(x))`` with ``q(x) = round(levels x) / levels`` and no gradient."""
    q = jax.lax.stop_gradient(jnp.round(x * levels) / levels)
    return apply_fn(variables, q, train=False)


def load_model(name: str, runs_dir: str | pathlib.Path) -> tuple[Any, dict]:
    """``(logits_fn, info)`` for a ``--models`` name (module docstring); ``logits_fn`` is a
    ``functools.partial`` of the model's ``apply`` (cached across ``evaluate_robustness``
    calls)."""
    import tscnc_jax as tj
    from experiments import checkpoints

    m = _MODEL_RE.match(name)
    if m is None:
        raise ValueError(f"unknown model {name!r}: lenet5_dense_s<seed> or lenet5_hydra95_s<seed>,"
                         " optionally followed by _q<levels>")
    kind, seed, levels = m.group(1), int(m.group(2)), m.group(3)
    run = pathlib.Path(runs_dir) / (f"lenet5_dense_s{seed}" if kind == "dense"
                                    else f"lenet5_hydra_95_s{seed}")
    stage = "dense" if kind == "dense" else "finetune"
    config = json.loads((run / "config.json").read_text())
    mgr = checkpoints.manager(run / stage / "final")
    step = max(mgr.all_steps())
    saved = checkpoints.restore_as_saved(mgr, step)
    params = saved["ema_params"] if config.get("ema_decay") is not None else saved["params"]
    variables = {"params": jax.device_get(params)}
    if saved.get("batch_stats"):
        variables["batch_stats"] = jax.device_get(saved["batch_stats"])
    model = tj.create_model(config["model"]["name"], **config["model"].get("kwargs", {}))
    kernels = [np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(variables["params"])
               if "kernel" in jax.tree_util.keystr(p)]
    sparsity = 1.0 - sum(int((k != 0).sum()) for k in kernels) / sum(k.size for k in kernels)
    info = {"checkpoint": f"{run / stage / 'final'}/{step}", "model": config["model"]["name"],
            "training": f"{config['loss']} eps {config['eps']}", "kernel_sparsity": sparsity,
            "quantiser_levels": int(levels) if levels else None,
            "gradient_masking": levels is not None}
    if levels:
        return functools.partial(_quantised, model.apply, int(levels), variables), info
    return functools.partial(model.apply, variables, train=False), info


def fashion_mnist_test(n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` Fashion-MNIST test images (NHWC float32 in [0, 1]) and int32 labels."""
    from experiments import data
    from experiments.data import readers

    found = data.find_manual_files("fashion_mnist")
    if found is not None:
        images, labels = readers.read_idx_dataset(found[1])["test"]
    else:
        ds = data.load_dataset("fashion_mnist", allow_download=False)
        images, labels = ds.test_images, ds.test_labels
    return images[:n].astype(np.float32) / 255.0, labels[:n].astype(np.int32)


# ----------------------------------------------------------------------------------------------
# Report.
# ----------------------------------------------------------------------------------------------


def to_markdown(results: dict) -> list[str]:
    lines = ["## Summary (final robust accuracy, %)", "",
             "| model | seed | images | clean | ours | reference | ours - ref (points) | "
             "<= 0.5 | union (either broke) | broken by ours only / ref only | ours s (cpu) | "
             "ref s (cpu) |", "|---|---:|---:|---:|---:|---:|---:|---|---:|---|---:|---:|"]
    for row in results["runs"]:
        o, r = row["ours"], row["reference"]
        lines.append(
            f"| {row['model']} | {row['seed']} | {row['n']} | {100 * o['clean_accuracy']:.1f} | "
            f"{100 * o['final_robust_accuracy']:.1f} | {100 * r['final_robust_accuracy']:.1f} | "
            f"{row['diff_points']:+.1f} | {'yes' if row['within_tolerance'] else '**NO**'} | "
            f"{100 * row['union_robust_accuracy']:.1f} | {row['broken_by_ours_only']} / "
            f"{row['broken_by_reference_only']} | {o['seconds']['total']:.0f} "
            f"({o['cpu_seconds']:.0f}) | {r['seconds']['total']:.0f} ({r['cpu_seconds']:.0f}) |")
    lines += ["", "## Per member (robust accuracy after the member, cascade, %)", ""]
    for row in results["runs"]:
        o, r = row["ours"], row["reference"]
        info = row["info"]
        lines += [f"### {row['model']}, seed {row['seed']}", "",
                  f"{row['n']} images, L-inf eps {row['eps']:g}; {info['model']}, "
                  f"{info['training']}, kernel sparsity {100 * info['kernel_sparsity']:.1f} %"
                  + (f", input quantiser k = {info['quantiser_levels']} (zero input gradient)"
                     if info["quantiser_levels"] else "") + f"; `{info['checkpoint']}`.", "",
                  "| member | ours | reference | broken ours / ref | ours s | ref s | ref "
                  "violations |", "|---|---:|---:|---|---:|---:|---:|",
                  f"| clean | {100 * o['clean_accuracy']:.1f} | {100 * r['clean_accuracy']:.1f} "
                  "| | | | |"]
        for name in o["members"]:
            lines.append(
                f"| {name} | {100 * o['robust_accuracy'][name]:.1f} | "
                f"{100 * r['robust_accuracy'][name]:.1f} | {o['n_broken'][name]} / "
                f"{r['n_broken'][name]} | {o['seconds'][name]:.1f} | {r['seconds'][name]:.1f} | "
                f"{r['violations'][name]} |")
        lines.append(f"| **final** | **{100 * o['final_robust_accuracy']:.1f}** | "
                     f"**{100 * r['final_robust_accuracy']:.1f}** | | {o['seconds']['total']:.1f}"
                     f" (checks {o['seconds'].get('checks', 0.0):.1f}) | "
                     f"{r['seconds']['total']:.1f} | |")
        if o["warnings"]:
            lines += [""] + [f"- ours warned: {w[:240]}{'...' if len(w) > 240 else ''}"
                             for w in o["warnings"]]
        lines.append("")
    sq = [row for row in results["runs"] if row.get("square")]
    if sq:
        b = results["ours_budgets"]
        lines += ["## Square schedule (data for the standard ensemble's choice)", "",
                  "Robust accuracy (%) of the whole ensemble, white-box members then Square "
                  f"({b['square_queries']} queries, p_init {b['square_p_init']}): `F` "
                  "rescale_schedule=False (the standard run above), `T` True (one more run on "
                  "the points the white-box members left), `F+T` both (the standard run, then "
                  "`T` on its survivors), `F+F2` the standard run then a second, independent "
                  "`F` run (the cost of `F+T`, one schedule); ref: torchattacks' Square the same "
                  "way on the reference's white-box survivors. `F only` / `T only`: points of "
                  "ours that only the standard run's `F` / only `T` broke.", "",
                  "| model | seed | points after white-box | ours F | ours T | ours F+T | "
                  "ours F+F2 | ref F | ref T | ref F+T | F only / T only | s, cpu s (T / F2 / "
                  "ref T) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
        for row in sq:
            s = row["square"]
            cells = [f"{100 * s[k]:.1f}" if k in s else "-" for k in (
                "ours_F", "ours_T", "ours_F_T", "ours_F_F2", "ref_F", "ref_T", "ref_F_T")]
            secs = " / ".join(
                f"{s['runs'][k]['seconds']:.0f}, {s['runs'][k]['cpu_seconds']:.0f}"
                if k in s["runs"] else "-" for k in ("T", "F2", "ref_T"))
            lines.append(f"| {row['model']} | {row['seed']} | {s['points']} | "
                         f"{' | '.join(cells)} | {s['F_only']} / {s['T_only']} | {secs} |")
    return lines


# ----------------------------------------------------------------------------------------------
# Entry point.
# ----------------------------------------------------------------------------------------------


def define_flags() -> None:
    """This entry point's flags (defined when it runs as a program only; see :mod:`benchmarks`)."""
    flags.DEFINE_list("models", ["lenet5_dense_s2", "lenet5_hydra95_s2", "lenet5_dense_s2_q8"],
                      "lenet5_{dense,hydra95}_s<seed>[_q<levels>]")
    flags.DEFINE_string("runs_dir", "runs/dose",
                        "where the dose study's runs are (experiments.dose --workdir)")
    flags.DEFINE_integer("n", 500, "Fashion-MNIST test images (the first n)")
    flags.DEFINE_float("eps", 0.1, "L-inf radius")
    flags.DEFINE_list("seeds", ["0"], "seeds (ours: key(seed); reference: seed=) per model")
    flags.DEFINE_list("masked_seeds", ["0", "1"], "seeds for the models with a quantiser")
    # On this CPU a LeNet-5 forward of 512 rows costs 10x that of 128 (160 vs 15 ms: the
    # activations leave the cache), so smaller chunks are much cheaper for both sides.
    flags.DEFINE_integer("batch", 128, "examples per attack call (both sides)")
    flags.DEFINE_enum("square_compare", "masked", ["none", "masked", "all"],
                      "models that get the Square schedule comparison")
    flags.DEFINE_bool("second_false", True, "in that comparison, a second F run (F+F2)")
    flags.DEFINE_bool("reference_square_compare", True,
                      "in that comparison, torchattacks' rescaled Square too")
    flags.DEFINE_bool("sanity_checks", True, "our AutoAttack checks and masking diagnostics")
    flags.DEFINE_enum("version", "standard", ["standard", "fast"],
                      "our version; fast also shrinks the reference's budgets (smoke runs)")
    flags.DEFINE_bool("resume", False, "keep the rows of --out's JSON (same n, eps, version) "
                      "and add the missing (model, seed) rows")
    flags.DEFINE_string("out", None, "write markdown here (and JSON next to it), after every row")


def _write(results: dict, out: str | None, quiet: bool = False) -> None:
    import torch
    import torchattacks

    exceeded = [f"{r['model']} seed {r['seed']}" for r in results["runs"]
                if not r["within_tolerance"]]
    m, ref_cfg = results["machine"], attacks.AutoAttackConfig(**results["reference_budgets"])
    ours_cfg = attacks.AutoAttackConfig(**results["ours_budgets"])
    commands = "; ".join(f"`{c}`" for c in results["commands"])
    lines = ["# Our AutoAttack (standard) vs the reference AutoAttack (torchattacks members at "
             "AutoAttack's budgets)", "", f"Commands: {commands}.", "",
             f"{m['processor']}, {m['cpu_count']} cores (run pinned to one, which another job "
             f"shared: wall s about 2x cpu s), jax {m['jax']} ({m['backend']}), torch "
             f"{torch.__version__} (1 thread), torchattacks {torchattacks.__version__}; "
             f"OPENBLAS_NUM_THREADS {m['openblas_num_threads']}; total "
             f"{results['total_seconds'] / 60:.1f} min wall, "
             f"{results['total_cpu_seconds'] / 60:.1f} min cpu. Images: the first "
             f"{results['n']} of the Fashion-MNIST test split, L-inf eps {results['eps']:g}. "
             f"Reference budgets: APGD-CE {ref_cfg.apgd_ce_steps} it., "
             f"APGD-T {ref_cfg.apgd_t_targets} x {ref_cfg.apgd_t_steps}, FAB-T "
             f"{ref_cfg.fab_t_targets} x {ref_cfg.fab_t_steps}, Square {ref_cfg.square_queries} "
             f"queries (p_init {ref_cfg.square_p_init}, rescaled: "
             f"{ref_cfg.square_rescale_schedule}), 1 restart each, cascade, `seed=seed`. Ours: "
             f"`evaluate_robustness(attacks={results['version']!r}, key=key(seed))`, Square "
             f"rescaled: {ours_cfg.square_rescale_schedule}.", "",
             "Requirement (ours <= reference + 0.5 points): "
             + ("met on every model and seed." if not exceeded
                else f"**exceeded** on {', '.join(exceeded)}."), "", *to_markdown(results)]
    common.report("\n".join(lines), results, out, quiet=quiet)


def main(argv) -> None:
    common.check_no_arguments(argv)
    torch, torchattacks = common.require_torch(torchattacks=True)
    torch.set_num_threads(1)
    ours_cfg = attacks.AUTOATTACK_VERSIONS[FLAGS.version]
    ref_cfg = REFERENCE if FLAGS.version == "standard" else dataclasses.replace(
        ours_cfg, fab_t_targets=3, fab_t_steps=25, square_rescale_schedule=False)
    if FLAGS.version != "standard":
        ours_cfg = dataclasses.replace(ours_cfg, fab_t_targets=3, fab_t_steps=25)
    x, y = fashion_mnist_test(FLAGS.n)
    t_start, c_start = time.perf_counter(), time.process_time()
    command = " ".join(["python -m benchmarks.reference", *sys.argv[1:]])
    results: dict[str, Any] = {"commands": [command], "machine": common.machine_info(),
                               "torch": torch.__version__, "torchattacks":
                               torchattacks.__version__, "n": FLAGS.n, "eps": FLAGS.eps,
                               "version": FLAGS.version,
                               "reference_budgets": dataclasses.asdict(ref_cfg),
                               "ours_budgets": dataclasses.asdict(ours_cfg), "runs": [],
                               "total_seconds": 0.0, "total_cpu_seconds": 0.0}
    done_s = done_c = 0.0
    if FLAGS.resume and FLAGS.out and pathlib.Path(FLAGS.out).with_suffix(".json").exists():
        old = json.loads(pathlib.Path(FLAGS.out).with_suffix(".json").read_text())
        if (old["n"], old["eps"], old["version"]) != (FLAGS.n, FLAGS.eps, FLAGS.version):
            raise app.UsageError("--resume: the existing results have another n, eps or version")
        results["runs"], results["commands"] = old["runs"], old["commands"] + [command]
        done_s, done_c = old["total_seconds"], old["total_cpu_seconds"]
    done = {(r["model"], r["seed"]) for r in results["runs"]}
    for name in FLAGS.models:
        logits_fn, info = load_model(name, FLAGS.runs_dir)
        bridge = JaxLogits(logits_fn)
        seeds = FLAGS.masked_seeds if info["gradient_masking"] else FLAGS.seeds
        for seed in map(int, seeds):
            if (name, seed) in done:
                continue
            print(f"{name} seed {seed}: comparing on {FLAGS.n} images", flush=True)
            row = compare(logits_fn, x, y, eps=FLAGS.eps, seed=seed, ours=ours_cfg,
                          reference=ref_cfg, batch_size=FLAGS.batch,
                          sanity_checks=FLAGS.sanity_checks, bridge=bridge)
            row.update(model=name, info=info)
            if FLAGS.square_compare == "all" or (FLAGS.square_compare == "masked"
                                                 and info["gradient_masking"]):
                row["square"] = square_schedules(
                    logits_fn, x, y, row, eps=FLAGS.eps, seed=seed, config=ours_cfg,
                    second_false=FLAGS.second_false, reference=FLAGS.reference_square_compare,
                    batch_size=FLAGS.batch, bridge=bridge)
            print(f"  ours {row['ours']['final_robust_accuracy']:.3f} reference "
                  f"{row['reference']['final_robust_accuracy']:.3f} "
                  f"({row['diff_points']:+.1f} points); {row.get('square', '')}", flush=True)
            results["runs"].append(jsonable(row))
            results["total_seconds"] = done_s + time.perf_counter() - t_start
            results["total_cpu_seconds"] = done_c + time.process_time() - c_start
            _write(results, FLAGS.out, quiet=True)
    results["total_seconds"] = done_s + time.perf_counter() - t_start
    results["total_cpu_seconds"] = done_c + time.process_time() - c_start
    _write(results, FLAGS.out)


if __name__ == "__main__":
    define_flags()
    app.run(main)
