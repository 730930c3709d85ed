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


def report(text: str, results: Any, out: str | pathlib.Path | None) -> None:
    """Prints ``text``; with ``out``, writes it there and ``results`` as JSON next to it."""
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
