"""The driver, :func:`evaluate_robustness`: the clean pass, AutoAttack's checks, the members in
turn (a cascade over the examples still robust, or each on every clean-correct example), the
final verification of the ensemble (one forward pass, or fresh draws of a stochastic model), the
consistency checks and the gradient-masking diagnostics; the package docstring gives the
protocol."""

from __future__ import annotations

import functools
import time
import warnings
from collections.abc import Iterable
from typing import Any

import jax
import numpy as np

from tscnc_jax import _validation
from tscnc_jax import attacks as _attacks
from tscnc_jax.evaluation._batches import _check_data, _collect, _placement, _predict_all, _round_up
from tscnc_jax.evaluation._compile import LogitsFn, _Jits, _split_model, _square_options
from tscnc_jax.evaluation._members import _Context, _resolve_attacks, _run_member, _run_square
from tscnc_jax.evaluation.checks import _autoattack_checks, _masking_diagnostics
from tscnc_jax.evaluation.report import (
    AttackSoundnessError,
    AutoAttackCheckWarning,
    GradientMaskingWarning,
    RobustnessReport,
    check_adversarial,
)


def evaluate_robustness(
    logits_fn: LogitsFn | _attacks.StochasticLogitsFn,
    dataset_batches: Iterable[Any],
    *,
    eps: float,
    attacks: Any = "standard",
    norm: str = "linf",
    bounds: tuple[float, float] = (0.0, 1.0),
    key: jax.Array | None = None,
    cascade: bool = True,
    batch_size: int | None = None,
    sanity_checks: bool = True,
    progress: bool = False,
    return_adversarial: bool = False,
    compact: bool = True,
    stochastic: bool = False,
    n_draws: int = 5,
    mesh: jax.sharding.Mesh | None = None,
) -> RobustnessReport:
    """Evaluates clean and robust accuracy of ``logits_fn`` on a data set.

    Args:
      logits_fn: maps a batch to logits ``B x K`` (deterministic, examples independent). Pass
        ``functools.partial(apply_fn, params)`` (optionally jitted) for compiled attacks to be
        reused by later calls with other ``params`` (package docstring). With ``stochastic=True``,
        a randomised model ``logits_fn(x, key)`` (package docstring, "Randomised models").
      dataset_batches: iterable of ``(x, y)`` pairs or dicts with ``"image"`` and ``"label"``; the
        whole data set is held in host memory.
      eps: radius of the threat model.
      attacks: ``"standard"``, ``"fast"`` or ``"rand"`` (AutoAttack members, see
        :data:`tscnc_jax.attacks.AUTOATTACK_VERSIONS`; ``"rand"`` needs ``stochastic=True``), an
        ``AutoAttackConfig``, a sequence of names from :data:`tscnc_jax.attacks.ATTACKS` and/or
        ``(name, attack)`` pairs, or a mapping ``name -> attack`` with ``attack(logits_fn, x, y, *,
        key, eps, norm, bounds) -> x_adv`` (``eps`` is passed as a traced scalar).
      norm: ``"linf"`` or ``"l2"``.
      bounds: ``(lo, hi)`` box of valid inputs; inputs outside raise ``ValueError``.
      key: PRNG key; default ``jax.random.key(0)``. Attack ``i`` on chunk ``j`` uses
        ``fold_in(fold_in(key, i), j)``; a Square member gives example ``e`` (its index in the data
        set) the key ``fold_in(fold_in(key, i), e)``, folded with the restart. With ``n``
        attacks, the diagnostics use ``fold_in(key, n)`` and AutoAttack's checks ``fold_in(key, n
        + 1)``. A stochastic model: ``key_run, key_model = split(key)``, ``key_run`` in place of
        ``key`` above (an attack's chunk key is split once more, into the attack's key and the
        key of the draws that check its output), and the clean pass and the final verification
        draw from ``fold_in(key_model, 0)`` and ``fold_in(key_model, 1)`` (folded with the chunk),
        whatever the attacks.
      cascade: run each attack only on the examples still robust (AutoAttack's protocol, much
        cheaper); ``False`` runs every attack on every clean-correct example, which also gives each
        attack's own robust accuracy.
      batch_size: examples per attack call (default: the largest input batch).
      sanity_checks: run AutoAttack's checks before the attacks (:func:`autoattack_checks`: a
        few forward passes and one input gradient on the first batch, one trace of the model)
        and the gradient-masking diagnostics after them (two extra PGD-20 runs on one batch).
      progress: show a progress bar per attack (tqdm).
      return_adversarial: keep the adversarial inputs in the report.
      compact: pad the last chunk of each attack only to a power-of-two bucket (at least 8) and run
        Square in segments that drop the examples it has broken (package docstring). ``False`` pads
        every chunk to ``batch_size`` and runs Square on every row until the whole chunk is done.
        Both give the same result: a row's random draws depend on its chunk's key and its position
        in the chunk, not on the padding (JAX's default ``jax_threefry_partitionable`` draws
        element ``i`` from the key and ``i``), and Square's on the example alone; logits that
        round differently at different batch sizes are the only source of difference.
      stochastic: ``logits_fn(x, key)`` is a randomised model; attacks must support it (APGD
        with ``stochastic=True``, e.g. ``attacks="rand"``).
      n_draws: for a stochastic model, the draws of its randomness behind each correctness
        decision (ignored for a deterministic model).
      mesh: data parallelism over this process's devices, e.g. ``tscnc_jax.parallel.local_mesh()``:
        every chunk the attacks, the clean pass and the final verification run on is split along
        its batch axis over the mesh's devices (``batch_size`` and the buckets rounded up to
        multiples of their number),
        and ``logits_fn``'s arrays are replicated on them (a ``functools.partial``'s array
        arguments are placed by the driver; arrays a closure captures must already live on the
        mesh's devices, or be uncommitted). Each example's computation is the same as on one
        device, so the outcomes are too, up to float reduction order. A multi-process job gives
        each process its own examples and mesh (``experiments/evaluate.py`` does). The
        diagnostics' single batches run unsplit. ``None``: the default device.

    Returns:
      A :class:`RobustnessReport`.

    Raises:
      ValueError: bad arguments or data (labels out of range, inputs outside ``bounds``).
      AttackSoundnessError: an attack left the threat model or the numbers are inconsistent.
    """
    t_start = time.perf_counter()
    norm = _validation.check_choice("norm", norm, _attacks.NORMS)
    lo, hi = _attacks.check_bounds(bounds)
    _attacks.check_eps(eps)
    eps = float(eps)
    key = jax.random.key(0) if key is None else key
    stochastic = bool(stochastic)
    n_draws = _validation.check_int("n_draws", n_draws)
    x_all, y_all, default_bs = _collect(dataset_batches)
    if batch_size is not None:
        batch_size = _validation.check_int("batch_size", batch_size)
    batch_size = default_bs if batch_size is None else batch_size
    place = _placement(mesh)
    batch_size = _round_up(batch_size, place.multiple)
    n = len(y_all)
    model = _split_model(logits_fn)
    if place.sharding is not None:
        model = model._replace(arrays=jax.device_put(
            model.arrays, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())))
    jits = _Jits(model, norm, (lo, hi), n_draws if stochastic else None)
    n_classes = _check_data(jits, x_all, y_all, batch_size, (lo, hi))
    members = _resolve_attacks(attacks, n_classes, norm, stochastic)
    names = tuple(m[0] for m in members)
    seconds: dict[str, float] = {}
    predict = functools.partial(jits.predict(), jits.model.arrays)
    x_last, last_by = (x_all.copy(), np.full(n, -1, np.int32)) if stochastic else (None, None)
    ctx = _Context(jits, x_all, y_all, n_classes, np.asarray(eps, x_all.dtype), eps, batch_size,
                   compact, progress, place, x_last, last_by)
    n_members = len(members)
    # A stochastic model's clean and final draws come from their own key, the same whatever the
    # attacks: evaluations of one model with different attacks see the same draws.
    k_run, k_model = jax.random.split(key) if stochastic else (key, None)

    t0 = time.perf_counter()
    k_clean = None if k_model is None else jax.random.fold_in(k_model, 0)
    clean_correct = _predict_all(predict, x_all, batch_size, y_all, k_clean, place) == y_all
    seconds["clean"] = time.perf_counter() - t0
    n_clean = int(clean_correct.sum())

    t0 = time.perf_counter()
    check_notes: list[str] = []
    if sanity_checks:
        check_notes = _autoattack_checks(
            jits, logits_fn, x_all, y_all, clean_correct, attacks, n_classes, eps=eps, norm=norm,
            bounds=(lo, hi), key=jax.random.fold_in(k_run, n_members + 1), batch_size=batch_size)
        # Before the attacks, as the reference does: a mistake they flag may spoil (or, for a
        # randomised model evaluated as deterministic, stop) the evaluation that follows.
        for note in check_notes:
            warnings.warn(note, AutoAttackCheckWarning, stacklevel=2)
    t_checks = time.perf_counter() - t0

    x_adv = x_all.copy()
    broken_by = np.full(n, -1, np.int32)
    robust = clean_correct.copy()
    robust_acc: dict[str, float] = {}
    n_broken: dict[str, int] = {}
    member_robust: dict[str, np.ndarray] = {}
    for i, (name, attack) in enumerate(members):
        t0 = time.perf_counter()
        todo = np.flatnonzero(robust if cascade else clean_correct)
        run = _run_square if _square_options(attack) is not None else _run_member
        this_robust = run(ctx, name, i, attack, todo, clean_correct, broken_by, x_adv,
                          jax.random.fold_in(k_run, i))
        newly = robust & ~this_robust
        n_broken[name] = (
            int((this_robust != clean_correct).sum()) if not cascade else int(newly.sum())
        )
        robust &= this_robust
        member_robust[name] = this_robust
        robust_acc[name] = float((robust if cascade else this_robust).sum() / n)
        seconds[name] = time.perf_counter() - t0

    t0 = time.perf_counter()
    record_notes: list[str] = []  # in the report, not issued as warnings
    if stochastic:
        # An example no attack broke is judged on the last attack's output, not on x.
        keep = clean_correct & (broken_by < 0) & (last_by >= 0)
        x_adv[keep] = x_last[keep]
        final_robust, record_notes, not_reproduced = _verify_stochastic(
            predict, x_all, y_all, x_adv, broken_by, clean_correct, last_by, eps=eps, norm=norm,
            bounds=(lo, hi), batch_size=batch_size, key=jax.random.fold_in(k_model, 1),
            n_draws=n_draws, place=place)
        notes = []
    else:
        final_robust, notes, not_reproduced = _verify_ensemble(
            predict, x_all, y_all, x_adv, broken_by, clean_correct, robust, eps=eps, norm=norm,
            bounds=(lo, hi), batch_size=batch_size, place=place)
    n_robust = int(final_robust.sum())
    _check_consistency(names, robust_acc, n_clean / n, n_robust / n, not_reproduced / n, cascade)
    if sanity_checks:
        notes += _masking_diagnostics(
            jits, x_all, y_all, clean_correct, member_robust, n_broken, names, cascade,
            eps=eps, norm=norm, bounds=(lo, hi), key=jax.random.fold_in(k_run, n_members),
            batch_size=batch_size)
    for note in notes:
        warnings.warn(note, GradientMaskingWarning, stacklevel=2)
    seconds["checks"] = time.perf_counter() - t0 + t_checks
    seconds["total"] = time.perf_counter() - t_start
    return RobustnessReport(
        eps=eps,
        norm=norm,
        bounds=(lo, hi),
        attacks=names,
        cascade=cascade,
        n_examples=n,
        n_clean_correct=n_clean,
        clean_accuracy=n_clean / n,
        robust_accuracy=robust_acc,
        n_broken=n_broken,
        ensemble_robust_accuracy=n_robust / n,
        n_robust=n_robust,
        seconds=seconds,
        warnings=tuple(check_notes + record_notes + notes),
        clean_correct=clean_correct,
        broken_by=broken_by,
        x_adv=x_adv if return_adversarial else None,
        stochastic_draws=n_draws if stochastic else None,
    )


def _verify_ensemble(predict, x_all, y_all, x_adv, broken_by, clean_correct, robust, *, eps,
                     norm, bounds, batch_size, place):
    """One forward pass on the stored adversarial inputs: returns the examples robust to all
    attacks, notes, and how many reported breaks did not reproduce (counted robust)."""
    notes = []
    check_adversarial(x_all, x_adv, eps=eps, norm=norm, bounds=bounds, name="ensemble")
    final_robust = clean_correct & (_predict_all(predict, x_adv, batch_size, place=place)
                                    == y_all)
    not_reproduced = int((final_robust & ~robust).sum())
    if not_reproduced:
        notes.append(
            f"{not_reproduced} example(s) reported broken were classified correctly when their "
            "adversarial input was re-evaluated (numerical ties); they are counted as robust."
        )
        x_adv[final_robust & ~robust] = x_all[final_robust & ~robust]
        broken_by[final_robust & ~robust] = -1
    if int((~final_robust & robust).sum()):
        raise AttackSoundnessError(
            "ensemble: examples that no attack broke (x_adv = x) are now misclassified: "
            "logits_fn is not deterministic. A randomised model must take its randomness as a "
            "key: evaluate logits_fn(x, key) with stochastic=True and attacks='rand'."
        )
    return final_robust, notes, not_reproduced


def _verify_stochastic(predict, x_all, y_all, x_adv, broken_by, clean_correct, last_by, *, eps,
                       norm, bounds, batch_size, key, n_draws, place):
    """The final accuracy of a stochastic model, on fresh draws: every clean-correct example's
    final input (the output of the attack that broke it, else of the last attack that ran on it)
    is classified again with ``n_draws`` draws independent of those that guided and selected the
    attacks, and the example is robust if every draw classifies it correctly. ``broken_by`` is
    updated to match: ``-1`` for a reported break that did not reproduce, the last attack for an
    example its checks missed. Returns ``(final_robust, notes, not_reproduced)``."""
    notes = []
    check_adversarial(x_all, x_adv, eps=eps, norm=norm, bounds=bounds, name="ensemble")
    final_robust = np.zeros(len(y_all), np.bool_)
    idx = np.flatnonzero(clean_correct)
    if not len(idx):
        return final_robust, notes, 0
    ok = _predict_all(predict, x_adv[idx], batch_size, y_all[idx], key, place) == y_all[idx]
    final_robust[idx[ok]] = True
    was_broken = broken_by[idx] >= 0
    not_reproduced = int((ok & was_broken).sum())
    missed = idx[~ok & ~was_broken]
    broken_by[idx[ok]] = -1
    broken_by[missed] = last_by[missed]
    if not_reproduced or len(missed):
        notes.append(
            f"stochastic model: the final inputs were re-evaluated with {n_draws} fresh draws of "
            f"its randomness: {not_reproduced} reported break(s) did not reproduce (counted "
            f"robust) and {len(missed)} example(s) that no attack's check broke were "
            "misclassified (counted broken, by the last attack that ran on them)."
        )
    return final_robust, notes, not_reproduced


def _check_consistency(names, robust_acc, clean_acc, ensemble_acc, not_reproduced_frac,
                       cascade) -> None:
    for name in names:
        if robust_acc[name] > clean_acc:
            raise AttackSoundnessError(
                f"robust accuracy of {name!r} ({robust_acc[name]:.4f}) exceeds the clean accuracy "
                f"({clean_acc:.4f})."
            )
        # Examples whose break did not reproduce are counted robust in the ensemble only.
        if ensemble_acc > robust_acc[name] + not_reproduced_frac:
            raise AttackSoundnessError(
                f"ensemble robust accuracy ({ensemble_acc:.4f}) exceeds that of {name!r} "
                f"({robust_acc[name]:.4f})."
            )
    if cascade and any(
        robust_acc[a] < robust_acc[b] for a, b in zip(names, names[1:], strict=False)
    ):
        raise AttackSoundnessError(f"cumulative robust accuracy increased: {robust_acc}.")
