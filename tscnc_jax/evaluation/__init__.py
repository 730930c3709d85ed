"""Robustness evaluation: clean accuracy, robust accuracy per attack and for the ensemble.

:func:`evaluate_robustness` runs a list of attacks (by default AutoAttack's standard version) over a
data set, re-batching the examples that are still robust between attacks, and refuses to return a
number it cannot vouch for:

* Soundness checks raise :class:`AttackSoundnessError`: every adversarial input must be finite, of
  the input's shape, inside ``bounds`` and within ``eps`` of its clean input (up to float rounding,
  see :func:`check_adversarial`); robust accuracies must not exceed the clean accuracy; the ensemble
  must not exceed any member.
* The robust flags are recomputed by one clean forward pass over the final adversarial inputs, so a
  point counts as broken only if the stored ``x_adv`` really is misclassified.
* Gradient-masking diagnostics add warnings (also issued as :class:`GradientMaskingWarning`): the
  black-box Square attack breaking points that the white-box attacks did not; the PGD loss not
  increasing with the steps; accuracy not reaching 0 at a very large ``eps`` (Carlini et al. 2019,
  "On evaluating adversarial robustness"; Croce and Hein 2020).

This package is a driver: it jits internally and moves data between host and device. One job
per module:

* :mod:`~tscnc_jax.evaluation.driver`: :func:`evaluate_robustness`, the cascade over the members,
  the final verification of the ensemble and the consistency checks.
* :mod:`~tscnc_jax.evaluation._members`: the ``attacks`` argument resolved into named members, and
  one member's run over the examples still to attack (Square in segments).
* :mod:`~tscnc_jax.evaluation._batches`: the data set collected and checked, buckets, chunks and
  their padding, a chunk's placement on a mesh, prediction passes.
* :mod:`~tscnc_jax.evaluation._compile`: the compile cache and its keys, the model split into code
  and data, a Square member's budget.
* :mod:`~tscnc_jax.evaluation.checks`: AutoAttack's checks (:func:`autoattack_checks`) and the
  gradient-masking diagnostics.
* :mod:`~tscnc_jax.evaluation.report`: :class:`RobustnessReport`, :func:`check_adversarial`, the
  error and the warnings.

Cost follows the examples still to attack. Each member runs on them in chunks of ``batch_size``,
the last chunk padded to the smallest power of two (at least 8, at most ``batch_size``) that holds
it, so a member that faces 77 survivors runs on 128 rows, not on a whole padded batch, with few
distinct shapes. Padding rows get a wrong label: attacks see them as broken from the start. A
Square member (:func:`tscnc_jax.attacks.square`, possibly a ``functools.partial`` of it) runs in
segments (:func:`tscnc_jax.attacks.square.square_steps`): a chunk stops as soon as its examples
still active fit a smaller bucket, the examples that are done leave, and the others are re-batched
and resumed with their own iteration counts and keys, so each example gets exactly the result of an
uninterrupted run.

Compilation is cached across calls, in a module-level cache of jitted functions (least recently
used out beyond 64 entries; :func:`clear_compile_cache` empties it). A jitted function is reused
only when everything it closes over is known to be the same:

* ``logits_fn``: only a ``functools.partial`` (possibly under ``jax.jit``) is cached across calls,
  e.g. ``functools.partial(model.apply, variables)``: its array arguments (the parameters) are
  passed to the jitted function as data on every call, never baked in; its other arguments
  (Python scalars, strings, ``None``) are part of the key, and its function is keyed by identity
  (a bound method of a Flax module by the module's value). Any other callable, e.g. ``lambda x:
  model.apply(params, x)``, may read state that changes between calls (a global ``params``
  reassigned after training), which no key can see: its functions are compiled once per call (and
  shared by the chunks and segments of that call) and then dropped.
* attacks: a function (keyed by its code, defaults and closure values, which must be Python
  scalars, strings, tuples or functions, recursively) or a ``functools.partial`` of one with such
  arguments; anything else (arrays or mutable objects in a closure) is compiled per call.
* ``eps`` is passed as data (a sweep over eps compiles once); the norm, bounds, budgets, input
  shape and dtype are part of the key.

As with ``jax.jit`` itself, a cached function must be pure: a function that reads a global which
changes between calls is not seen to change.

AutoAttack's own checks (Croce and Hein 2020; ``fra31/auto-attack``, ``autoattack/checks.py``) run
before the attacks when ``sanity_checks`` is set, on the first batch: randomised outputs,
probabilities instead of logits, zero input gradients, a forward pass that differentiates (a
dynamic defence), too few classes for the version's members (:func:`autoattack_checks`). Each
flag is issued at once as an :class:`AutoAttackCheckWarning` (a :class:`GradientMaskingWarning`)
and kept in the report's ``warnings``.

Randomised models (``stochastic=True``): a randomised defence must make its randomness explicit,
``logits_fn(x, key)``, and be attacked by attacks that support it, APGD with Expectation over
Transformation (``attacks="rand"``, :data:`tscnc_jax.attacks.AUTOATTACK_RAND`: APGD-CE and APGD-DLR,
each gradient averaged over 20 draws; the other attacks refuse such a model). Every forward pass
the driver makes draws fresh randomness, and an example counts as correctly classified on an input
only if each of ``n_draws`` draws (default 5) classifies it correctly: on ``x`` for the clean
accuracy, on each attack's output for the cascade (these checks select what the next attack
faces, as AutoAttack's one-draw check of each attack's output does). The reported ensemble robust
accuracy is measured once more, on draws independent of all of those: each clean-correct example's
final input (the output of the attack that broke it, else of the last attack that ran on it) is
classified by ``n_draws`` fresh draws, and the example is robust only if every one is correct. So
the selection of the attacks' outputs by lucky draws does not count as a break, a break that does
not reproduce is counted robust, and an output the checks passed by luck is counted broken; the
per-attack numbers, from the selecting draws, are reported as they were, and the report's
``warnings`` say how many verdicts the fresh draws changed (a note of the protocol, not issued as
a Python warning). The gradient-masking diagnostics attack one fixed draw of the model's
randomness.
"""

from tscnc_jax.evaluation._batches import MIN_BUCKET
from tscnc_jax.evaluation._compile import LogitsFn, clear_compile_cache
from tscnc_jax.evaluation.checks import autoattack_checks
from tscnc_jax.evaluation.driver import evaluate_robustness
from tscnc_jax.evaluation.report import (
    AttackSoundnessError,
    AutoAttackCheckWarning,
    GradientMaskingWarning,
    RobustnessReport,
    check_adversarial,
)

__all__ = [
    "MIN_BUCKET",
    "AttackSoundnessError",
    "AutoAttackCheckWarning",
    "GradientMaskingWarning",
    "LogitsFn",
    "RobustnessReport",
    "autoattack_checks",
    "check_adversarial",
    "clear_compile_cache",
    "evaluate_robustness",
]
