"""Helpers shared by the benchmark entry points."""

from __future__ import annotations

import json
import pathlib
from typing import Any


def median_ms(fn, *args, repeats: int) -> float:
    """Median wall time in ms of ``fn(*args)`` over ``repeats`` calls after a first (compiling)
    call, each waited for with ``jax.block_until_ready``."""
    import statistics
    import time

    import jax

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def check_no_arguments(argv: list[str]) -> None:
    """An entry point's ``main(argv)`` takes flags only: ``absl.app.UsageError`` for positional
    arguments."""
    from absl import app

    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")


def models_flag(value: str, known, quick: bool) -> list[str]:
    """The models a ``--models`` flag's comma list ``value`` names (the small CNN alone with
    ``--quick``); an ``absl.app.UsageError`` for a name not in ``known``."""
    from absl import app

    models = ["small_cnn"] if quick else value.split(",")
    unknown = set(models) - set(known)
    if unknown:
        raise app.UsageError(f"unknown model(s) {sorted(unknown)}; choose from {sorted(known)}")
    return models


def random_batch(rng, batch: int, shape: tuple[int, ...]) -> dict:
    """A batch of ``batch`` uniform ``[0, 1)`` float32 images of ``shape`` and int32 labels in
    ``[0, 10)``, drawn from the NumPy generator ``rng`` (images first)."""
    import numpy as np

    return {"image": rng.uniform(0, 1, (batch, *shape)).astype(np.float32),
            "label": rng.integers(0, 10, batch).astype(np.int32)}


def jitted_train_step(model, tx, shape: tuple[int, ...], loss: str, eps: float, *,
                      attack_steps: int = 10, **step_kwargs):
    """``(step, state)``: ``training.make_train_step`` of ``model`` and ``tx`` for ``loss`` (its
    attack ``attack_steps`` steps of ``eps / 4`` in the ``eps``-ball, ``step_kwargs`` passed on),
    jitted with the state donated, and the initial state (``key(0)``, inputs of ``shape``)."""
    import jax

    from tscnc_jax import training

    state = training.create_train_state(model, tx, jax.random.key(0), shape)
    attack = training.default_attack(loss, eps=eps, steps=attack_steps, step_size=eps / 4)
    step = jax.jit(training.make_train_step(model, tx, loss=loss, attack=attack, **step_kwargs),
                   donate_argnums=0)
    return step, state


def time_train_step(step, state, batch: dict, repeats: int) -> tuple[float, list[float], Any]:
    """Times ``state, metrics = step(state, batch)`` (each call's state fed to the next, as a
    donated state must be), each call waited for on its metrics: ``(first_s, times_s,
    metrics)``, the first (compiling) call's seconds, those of the ``repeats`` calls after it
    and the last call's metrics."""
    import time

    import jax

    t0 = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    return first, times, metrics


def require_torch(torchattacks: bool = False):
    """``torch`` (with ``torchattacks=True``, ``(torch, torchattacks)``), the benchmark-only
    dependencies of the twins; without them a ``SystemExit`` that says how to install them."""
    try:
        import torch

        if torchattacks:
            import torchattacks as ta

            return torch, ta
    except ImportError as e:
        if torchattacks:
            raise SystemExit("benchmark-only dependencies: pip install torch==2.13.0 && "
                             "pip install --no-deps torchattacks==3.5.1") from e
        raise SystemExit("PyTorch is a benchmark-only dependency: pip install torch==2.13.0") from e
    return torch


def report(text: str, results: Any, out: str | pathlib.Path | None, quiet: bool = False) -> None:
    """Prints ``text`` (not with ``quiet``); with ``out``, writes it there and ``results`` as JSON
    next to it."""
    if not quiet:
        print(text)
    if out is not None:
        out = pathlib.Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        out.with_suffix(".json").write_text(json.dumps(results, indent=2))


def machine_info() -> dict:
    """What a result depends on: CPU, JAX version and backend, device count, BLAS threads."""
    import os
    import platform

    import jax

    return {
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": len(jax.devices()),
        "openblas_num_threads": os.environ.get("OPENBLAS_NUM_THREADS", "(unset)"),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
