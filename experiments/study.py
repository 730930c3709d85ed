"""The reproduction study's runs, in priority order, as one resumable sweep.

    python -m experiments.study --list                                   # the plan, nothing run
    python -m experiments.study --workdir=runs/study --summaries=docs/results/study
    python -m experiments.study --workdir=runs/study --only='_s0$'       # names matching a regex
    python -m experiments.study --workdir=runs/smoke --variant=smoke     # every stage, seconds

``--set=key=value`` applies to every run (after the plan's own overrides). The kept runs used
the penalties as they were before the live-spectrum CNC and the summed TSC (``docs/results.md``,
*What ran*); ``--set=cnc.live=False --set=tsc.reduce=mean --set=dense.tsc_weight=0.001
--set=finetune.tsc_weight=0.001`` reruns them as they were (the TSC weights for its methods).

``--variant=short`` is the schedule the kept study in ``docs/results/study/`` ran on the
project's 2-core CPU (all the training data, 3 + 1 + 1 epochs, the fast ensemble on the 10,000
test images and the standard one on the first 500; ``experiments/configs/base.py:short``), in
this priority order, each command skipping what earlier ones finished or kept::

    S="--workdir=runs/study --summaries=docs/results/study --variant=short --set=progress=False"
    FIRST='^(dense_trades|lwm|hydra(_tsc|_cnc|_tscnc)?|tscnc_authors)(_99)?_s0$'
    python -m experiments.study $S --only="$FIRST"      # dense and every method at 99 %
    python -m experiments.study $S --only='^(hydra|hydra_tscnc)_99_s1$'
    python -m experiments.study $S --only='^(hydra|hydra_tscnc|lwm)_(90|95|99_5)_s0$'
    python -m experiments.study $S --only='_99_s[12]$'  # every method, three seeds at 99 %
    python -m experiments.study $S --only='^pgd_at_'
    python -m experiments.study $S --only='^lenet5_'
    python -m experiments.study $S     # the rest of the plan

Measured at this schedule on the project's 2-core CPU: a HYDRA run that prunes a shared dense
model 14.6 minutes (9 of them evaluation), a dense TRADES run 14-16, a run that trains its own
dense stage 16 (authors' code) to 21-26 (CNC's SVDs in every dense step).

Fashion-MNIST, small CNN, eps 0.1, TRADES (each config's full recipe unless ``--variant``):

1. ``dense_trades_s0``, then every method at 99 % sparsity (seed 0): LWM + fine-tune and HYDRA
   prune that plain TRADES model (``init_dir``, ``stages=prune,finetune``); HYDRA + TSC, HYDRA +
   CNC, HYDRA + TSCNC (principled) and the authors'-code TSCNC (gated network) train their own
   dense stage, with their penalties in it as the method prescribes (docs/method.md section 5);
2. every method at 90, 95 and 99.5 % (seed 0), from the same dense stages (a penalised method's
   from its 99 % run);
3. seeds 1 and 2: a dense model each and every method at 99 %;
4. PGD-AT for one setting: dense, HYDRA and HYDRA + TSCNC at 99 % (seed 0);
5. a second architecture, LeNet-5: dense, HYDRA and HYDRA + TSCNC at 99 % (seeds 0 and 1),
   then at 90 and 95 % (seed 0), then at 95 % (seed 1), then seeds 2 and 3 at 95 % and 99 %;
6. which stage carries HYDRA + TSCNC's gain on LeNet-5 at 95 %: HYDRA's pruning and plain
   fine-tuning of HYDRA + TSCNC's penalised dense model (``hydra_from_tscnc_dense``), and HYDRA +
   TSCNC's pruning and penalised fine-tuning of the plain dense model
   (``hydra_tscnc_from_plain_dense``), seeds 0, 2, 1 and 3; then which penalty: HYDRA + CNC and
   HYDRA + TSC on LeNet-5 at 99 and 95 % (seeds 0 and 2), then HYDRA + CNC in seeds 1 and 3;
7. LeNet-5 seeds 4, 5 and 6: dense, HYDRA + TSCNC and HYDRA at 99 and 95 %.

The standard ensemble on all of a finished run's test images, afterwards and resumably:
``python -m experiments.evaluate --workdir=runs/study/<run> --summaries=docs/results/study``
(1-1.5 hours per LeNet-5 run on one core here); the report uses it in place of the 500.

The order makes a partly finished study informative early. Every run is ``experiments.main`` in
its own process and workdir through :func:`experiments.sweep.run_all`: a finished run
(``summary.json`` present) is skipped, a killed one resumes from its checkpoints, a failed one
does not stop the others, and each finished summary is copied to ``--summaries/<name>/`` at once.
A run that reuses a dense stage reads it from the named run, which comes earlier in the plan
(``Run.dense_from``), and leaves ``dense`` out of its ``config.stages``.

With ``--summaries``, a selected run that already has a kept summary there is not run again
(``--rerun_kept`` overrides), unless a run still to do reuses its dense stage: the kept summary
has no checkpoints, so on a new machine that run trains its dense stage again first, and only
that (``--config.stages=dense --config.eval.final=False``: no pruning, no evaluation, and its
kept summary stays as it is). XLA:CPU training is deterministic on one kind of CPU, but not
across kinds: ``dense_trades_s0`` retrained on a second machine reproduced every kept metric
bitwise, ``dense_trades_s1`` retrained on a third (an AMD EPYC without AVX-512) came out 0.05
points lower clean and 0.23 lower in robust accuracy, so runs that prune a retrained dense model
start from a slightly different one than runs kept before. ``experiments.report`` checks this
per run (its last table: the pruned run's ``dense_kappa`` against the kept source's).

On a 2-core CPU, two invocations whose selections share no dense run can run side by side,
each pinned to one core (``taskset -c 0 python -m experiments.study $S --only=...`` and
``taskset -c 1 ...``). Measured with ``benchmarks.train_step`` (small CNN, batch 128, 2-core
AMD EPYC with AVX-512, 2026-12-02): a TRADES-10 step took 227 ms on both cores and 417 / 442 ms
in two pinned processes side by side (4.7 steps/s together against 4.4); with TSCNC, whose
SVDs do not use the second core, 313 ms against 416 / 414 ms (4.8 steps/s against 3.2). Their
``--summaries`` must be the same directory; each writes its table there when it ends.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import pathlib
import re

from absl import app, flags

from experiments import sweep

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The study's flags (also :mod:`experiments.dose`'s): the sweep's (--workdir, --variant,
    --set, --summaries) and its own; called when run as a program only."""
    sweep.define_flags()
    flags.DEFINE_string("only", None, "Run only the planned runs whose name matches this regex.")
    flags.DEFINE_bool("list", False, "Print the plan (names, configs, overrides) and exit.")
    flags.DEFINE_bool("rerun_kept", False, "Also run the selected runs that have a summary in "
                      "--summaries (by default only the dense runs that others reuse rerun).")

SPARSITIES = (0.99, 0.9, 0.95, 0.995)  # 99 % first: the row with several seeds
SEEDS = (0, 1, 2)
# Methods whose dense stage is plain TRADES: they prune the seed's shared dense_trades model.
SHARED_DENSE = ("lwm", "hydra")
# Methods whose dense stage carries their penalties (docs/method.md section 5, step 1): the first
# run of each seed trains that dense stage, the method's other sparsities start from it.
OWN_DENSE = ("hydra_tsc", "hydra_cnc", "hydra_tscnc")
AUTHORS = "tscnc_authors"  # own dense stage too (a gated network), then HYDRA, no fine-tuning
METHODS = (*SHARED_DENSE, *OWN_DENSE, AUTHORS)
LENET_METHODS = ("hydra", "hydra_tscnc")  # the second architecture: the baseline and TSCNC
# The crossed-stage ablation on LeNet-5 at 95 %: (config, dense run it prunes, config.name).
CROSSED = (("hydra", "lenet5_hydra_tscnc_99_s{seed}", "hydra_from_tscnc_dense"),
           ("hydra_tscnc", "lenet5_dense_s{seed}", "hydra_tscnc_from_plain_dense"))


@dataclasses.dataclass(frozen=True)
class Run:
    name: str
    config: str  # a config name in experiments/configs/
    overrides: tuple[tuple[str, str], ...] = ()
    dense_from: str | None = None  # name of the run whose finished dense stage this one reuses
    # Train only the dense stage, for the runs that reuse it: no evaluation, no summary (set by
    # without_kept for a kept run whose checkpoints a pending run needs).
    dense_only: bool = False

    def flags(self, root: pathlib.Path) -> list[str]:
        out = [f"--config.{k}={v}" for k, v in self.overrides]
        if self.dense_only:
            return [*out, "--config.stages=dense", "--config.eval.final=False"]
        if self.dense_from is not None:
            # Without the dense stage in config.stages: a run that lists it trains its own.
            out += [f"--config.stages={_stages_after_dense(self.config)}",
                    f"--config.init_dir={root / self.dense_from}"]
        return out


@functools.cache
def _stages_after_dense(config: str) -> str:
    """The config's own stages without ``dense``, comma-joined for ``--config.stages``."""
    stages = importlib.import_module(f"experiments.configs.{config}").get_config().stages
    return ",".join(s for s in stages if s != "dense")


def _pct(sparsity: float) -> str:
    return f"{100 * sparsity:g}".replace(".", "_")  # 0.995 -> "99_5"


def _pruned(method: str, sparsity: float, seed: int, dense: str | None,
            extra: tuple = (), prefix: str = "") -> Run:
    return Run(f"{prefix}{method}_{_pct(sparsity)}_s{seed}", method,
               (("seed", str(seed)), ("prune.sparsity", str(sparsity)), *extra), dense)


def _seed_block(seed: int, sparsities) -> list[Run]:
    shared = f"dense_trades_s{seed}"
    runs = []
    for sp in sparsities:
        for m in METHODS:
            if m in SHARED_DENSE:
                runs.append(_pruned(m, sp, seed, shared))
            else:  # its first sparsity trains the method's dense stage, the others reuse it
                first = _pruned(m, sparsities[0], seed, None).name
                runs.append(_pruned(m, sp, seed, None if sp == sparsities[0] else first))
    return runs


def plan() -> list[Run]:
    """Every run of the study, in the order they run (see the module docstring)."""
    runs = [Run("dense_trades_s0", "dense_trades", (("seed", "0"),))]
    runs += _seed_block(0, SPARSITIES)
    for seed in SEEDS[1:]:
        runs.append(Run(f"dense_trades_s{seed}", "dense_trades", (("seed", str(seed)),)))
        runs += _seed_block(seed, SPARSITIES[:1])
    pgd_at = (("loss", "pgd_at"),)
    runs.append(Run("pgd_at_dense_s0", "dense_pgd_at", (("seed", "0"),)))
    runs += [_pruned(m, 0.99, 0, "pgd_at_dense_s0" if m in SHARED_DENSE else None, pgd_at,
                     prefix="pgd_at_") for m in ("hydra", "hydra_tscnc")]
    lenet = (("model.name", "lenet5"),)

    def lenet_run(method, sparsity, seed):  # HYDRA prunes the seed's dense LeNet-5
        if method in SHARED_DENSE:
            dense = f"lenet5_dense_s{seed}"
        else:  # the penalised dense stage of the method's 99 % run
            dense = None if sparsity == 0.99 else f"lenet5_{method}_99_s{seed}"
        return _pruned(method, sparsity, seed, dense, lenet, prefix="lenet5_")

    def lenet_dense(seed):
        return Run(f"lenet5_dense_s{seed}", "dense_trades", (("seed", str(seed)), *lenet))

    def lenet_seed(seed):  # a further seed: dense, then both methods at 99 and 95 %
        return [lenet_dense(seed), lenet_run("hydra_tscnc", 0.99, seed),
                lenet_run("hydra_tscnc", 0.95, seed), lenet_run("hydra", 0.95, seed),
                lenet_run("hydra", 0.99, seed)]

    for seed in (0, 1):
        runs.append(lenet_dense(seed))
        runs += [lenet_run(m, 0.99, seed) for m in LENET_METHODS]
    runs += [lenet_run(m, sp, 0) for sp in (0.9, 0.95) for m in LENET_METHODS]
    # TSCNC's one large gain (95 %, seed 0) checked on a second seed, then on a third (whose
    # penalised dense stage comes from its 99 % run, which thereby adds a third 99 % pair).
    runs += [lenet_run(m, 0.95, 1) for m in LENET_METHODS]
    runs.append(lenet_dense(2))
    runs += [lenet_run("hydra", 0.95, 2), lenet_run("hydra_tscnc", 0.99, 2),
             lenet_run("hydra_tscnc", 0.95, 2), lenet_run("hydra", 0.99, 2)]
    runs += lenet_seed(3)  # a fourth seed at 95 % (and so a fourth 99 % pair)
    # Which stage carries that gain: each pipeline's pruning and fine-tuning from the other's
    # dense model (a 2 x 2 with lenet5_hydra_95 and lenet5_hydra_tscnc_95), the seeds where
    # TSCNC gained first. The method name (config.name) says which dense model it started from.
    for seed in (0, 2, 1, 3):
        for method, dense, name in CROSSED:
            runs.append(Run(f"lenet5_{name}_95_s{seed}", method,
                            (("seed", str(seed)), ("prune.sparsity", "0.95"), *lenet,
                             ("name", name)), dense.format(seed=seed)))
    # Which penalty in the dense stage: CNC alone and TSC alone, at 99 % (training the
    # penalised dense stage) and 95 %, in the two seeds where TSCNC gained.
    for seed in (0, 2):
        runs += [lenet_run(m, sp, seed) for m in ("hydra_cnc", "hydra_tsc") for sp in (0.99, 0.95)]
    # CNC alone in the other two seeds: does it make the robust outcome likelier, or only move
    # which seed gets it?
    for seed in (1, 3):
        runs += [lenet_run("hydra_cnc", sp, seed) for sp in (0.99, 0.95)]
    # Further seeds of the two methods: how often does each reach the robust outcome, and do
    # the live input rows of the second convolution after pruning predict which it reaches?
    for seed in (4, 5, 6):
        runs += lenet_seed(seed)
    return runs


def _with_dense_sources(runs: list[Run], names: set[str]) -> list[Run]:
    """The runs named in ``names`` plus the runs whose dense stage they reuse, in plan order."""
    by_name = {r.name: r for r in runs}
    keep = set(names)
    for name in names:
        while by_name[name].dense_from is not None:
            name = by_name[name].dense_from
            keep.add(name)
    return [r for r in runs if r.name in keep]


def select(runs: list[Run], pattern: str | None) -> list[Run]:
    """The runs whose name matches ``pattern``, plus the dense runs they reuse (kept in order)."""
    if pattern is None:
        return runs
    keep = {r.name for r in runs if re.search(pattern, r.name)}
    if not keep:
        raise app.UsageError(f"--only={pattern!r} matches no planned run.")
    return _with_dense_sources(runs, keep)


def without_kept(runs: list[Run], kept: set[str]) -> list[Run]:
    """Drops the runs that have a kept summary (``kept``: their names), except those whose dense
    stage a remaining run reuses: a kept summary holds no checkpoints, so such a run trains its
    dense stage again, and only that (``dense_only``: no evaluation, its kept summary stays; see
    the module docstring on how closely a retrain reproduces the kept one)."""
    needed = _with_dense_sources(runs, {r.name for r in runs if r.name not in kept})
    return [dataclasses.replace(r, dense_only=True) if r.name in kept else r for r in needed]


def check_kept(runs: list[Run], kept: set[str], summaries: pathlib.Path) -> None:
    """Raises ``app.UsageError`` naming every kept summary among ``runs`` that was made with
    another config than the plan's run of its name (``workdir.summary_differences``): skipping
    it would report a run the plan no longer describes."""
    root = pathlib.Path(FLAGS.workdir or "runs")
    common = [f"--config.{kv}" for kv in FLAGS.set]
    bad = []
    for r in runs:
        if r.name in kept:
            config = sweep.parse_run(r.config, FLAGS.variant)[1]
            why = sweep.mismatch(summaries / r.name / "summary.json", config,
                                 r.flags(root) + common)
            if why:
                bad.append(f"  {r.name}: {why}")
    if bad:
        raise app.UsageError(
            f"{len(bad)} kept summary(ies) in {summaries} were made with another config than "
            f"this plan's runs of the same name:\n" + "\n".join(bad) + "\nRerun them "
            f"(--rerun_kept with --only=...), or move those summaries out of {summaries}.")


def main(argv, plan_fn=None):
    """Runs the selected part of ``plan_fn()`` (default: this study's :func:`plan`)."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    runs = select((plan_fn or plan)(), FLAGS.only)
    if FLAGS.summaries and not FLAGS.rerun_kept:
        kept = {d.name for d in sweep.kept_runs(FLAGS.summaries)}
        check_kept(runs, kept, pathlib.Path(FLAGS.summaries))
        pending = without_kept(runs, kept)
        skipped = [r.name for r in runs if r.name not in {p.name for p in pending}]
        if skipped:
            print(f"kept in {FLAGS.summaries}, not rerun (--rerun_kept reruns them): "
                  f"{', '.join(skipped)}", flush=True)
        dense_only = [r.name for r in pending if r.dense_only]
        if dense_only:
            print(f"kept, dense stage retrained for the runs that reuse it: "
                  f"{', '.join(dense_only)}", flush=True)
        runs = pending
        if not runs:
            return
    if FLAGS.list:
        for r in runs:
            print(r.name, r.config, " ".join(r.flags(pathlib.Path("<workdir>"))))
        return
    if FLAGS.workdir is None:
        raise app.UsageError("--workdir is required (or --list).")
    root = pathlib.Path(FLAGS.workdir)
    common = [f"--config.{kv}" for kv in FLAGS.set]
    specs = [(r.name, sweep.parse_run(r.config, FLAGS.variant)[1], r.flags(root) + common)
             for r in runs]
    failed = sweep.run_all(specs, root, FLAGS.summaries,
                           train_only=frozenset(r.name for r in runs if r.dense_only))
    if failed:
        raise SystemExit(f"{len(failed)} run(s) failed: {', '.join(failed)} (rerun to resume).")


if __name__ == "__main__":
    define_flags()
    app.run(main)
