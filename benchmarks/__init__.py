"""Benchmarks: `python -m benchmarks.<name>`; numbers are medians of repeats from one run.

Importing the package (every entry point does) applies
:func:`tscnc_jax.xla_cpu.set_fast_cpu_flags`, the XLA:CPU configuration of the library's own
runs, so that the benchmarks measure what users get.

Each entry point defines its flags in its ``define_flags``, called only when it runs as a program
(``if __name__ == "__main__"``): importing a module (``benchmarks.run`` imports the others)
registers none, so modules may share flag names.
"""

import tscnc_jax as _tj

_tj.xla_cpu.set_fast_cpu_flags()
