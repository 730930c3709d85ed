"""XLA:CPU settings under which this library's models run fastest (measured with jaxlib 0.10.2).

jaxlib 0.10 hands convolutions to YNNPACK fusions by default. On the project's 2-core x86-64
CPU (``python -m benchmarks.run``), XLA's other convolution path (Eigen) was faster for every
model benchmarked: a VGG-16 attack iteration (forward + input gradient, batch 128) took 543 ms
instead of 759 ms, its weight gradient 880 ms instead of 1459 ms, and the small CNN's TRADES-10
step 185 ms instead of 303 ms. :func:`set_fast_cpu_flags` disables the YNNPACK convolution
fusion (YNNPACK still runs matmuls and elementwise fusions). It only changes XLA:CPU's choice
of kernel, not the mathematics: results agree to float32 rounding.

Call it before JAX's first computation (XLA reads ``XLA_FLAGS`` when it creates the CPU client);
the experiment and benchmark entry points and the test suite do. An explicit setting of the same
flag in ``XLA_FLAGS`` wins. Other jaxlib versions may not know the flag (an unknown flag aborts
the process), so it is only added for jaxlib 0.10.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import MutableMapping

YNN_CONVOLUTION_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
_FLAG_NAME = "xla_cpu_experimental_ynn_fusion_type"
VALIDATED_JAXLIB = "0.10."


def set_fast_cpu_flags(environ: MutableMapping[str, str] | None = None) -> bool:
    """Adds :data:`YNN_CONVOLUTION_FLAG` to ``XLA_FLAGS`` in ``environ`` (default ``os.environ``).

    Returns whether it was added: not when ``XLA_FLAGS`` already sets the flag, when the
    installed jaxlib is not 0.10.x, or (with a warning, ``os.environ`` only) when JAX's backends
    are already initialised and the flag could no longer take effect.
    """
    import jaxlib

    env = os.environ if environ is None else environ
    flags = env.get("XLA_FLAGS", "")
    if _FLAG_NAME in flags or not jaxlib.__version__.startswith(VALIDATED_JAXLIB):
        return False
    if environ is None and _backends_initialized():
        warnings.warn("set_fast_cpu_flags() called after JAX's first computation: XLA_FLAGS is "
                      "read once, so the flag would have no effect; call it at start-up.",
                      stacklevel=2)
        return False
    env["XLA_FLAGS"] = f"{flags} {YNN_CONVOLUTION_FLAG}".strip()
    return True


def _backends_initialized() -> bool:
    try:
        from jax._src import xla_bridge
    except ImportError:  # pragma: no cover - private module moved; assume not yet initialised
        return False
    check = getattr(xla_bridge, "backends_are_initialized", None)
    return bool(check()) if check is not None else False
