"""Convolution and pooling lowerings on the current backend (why ``models.Conv`` switches).

    python -m benchmarks.lowering [--repeats 5] [--batch 128]

Forward + backward (value_and_grad wrt input and kernel) of a 3x3 SAME convolution at VGG-16's
CIFAR shapes, lowered as ``lax.conv_general_dilated`` vs im2col + matmul (the two lowerings of
:class:`tscnc_jax.models.Conv`), and of 2x2 max pooling as ``nn.max_pool`` vs reshape-and-max.
Medians after compilation, side by side in one run.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import app, flags
from jax import lax

from benchmarks import common
from tscnc_jax import models

CONV_SHAPES = [(32, 3, 64), (32, 64, 64), (16, 128, 128), (8, 256, 256), (4, 512, 512),
               (2, 512, 512)]

FLAGS = flags.FLAGS


def define_flags() -> None:
    """This entry point's flags (defined when it runs as a program only; see :mod:`benchmarks`)."""
    flags.DEFINE_integer("repeats", 5, None)
    flags.DEFINE_integer("batch", 128, None)


def main(argv) -> None:
    common.check_no_arguments(argv)
    repeats, batch = FLAGS.repeats, FLAGS.batch
    key = jax.random.key(0)

    def xla(x, w):
        return lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def im2col(x, w):
        return models._im2col_conv(x, w, (1, 1), "SAME")

    lines = [f"# Lowerings on {jax.default_backend()} (batch {batch}, forward + backward, "
             f"median of {repeats})", "",
             "| op | shape | XLA conv / nn.max_pool ms | im2col / reshape-max ms | ratio |",
             "|---|---|---:|---:|---:|"]
    for hw, c_in, c_out in CONV_SHAPES:
        x = jax.random.normal(key, (batch, hw, hw, c_in))
        w = jax.random.normal(jax.random.fold_in(key, 1), (3, 3, c_in, c_out)) * 0.05
        grad = {name: jax.jit(jax.value_and_grad(lambda x, w, f=f: jnp.sum(f(x, w) ** 2),
                                                 argnums=(0, 1)))
                for name, f in (("xla", xla), ("im2col", im2col))}
        t_xla = common.median_ms(grad["xla"], x, w, repeats=repeats)
        t_col = common.median_ms(grad["im2col"], x, w, repeats=repeats)
        lines.append(f"| conv 3x3 | {hw}x{hw}, {c_in}->{c_out} | {t_xla:.1f} | {t_col:.1f} | "
                     f"{t_xla / t_col:.2f} |")
        print(lines[-1], flush=True)
    for hw, c in ((28, 32), (14, 64), (32, 64), (4, 512)):
        x = jax.random.normal(key, (batch, hw, hw, c))
        flax_pool = jax.jit(jax.value_and_grad(
            lambda x: jnp.sum(nn.max_pool(x, (2, 2), (2, 2)) ** 2)))
        ours = jax.jit(jax.value_and_grad(lambda x: jnp.sum(models.max_pool_2x2(x) ** 2)))
        t_flax = common.median_ms(flax_pool, x, repeats=repeats)
        t_ours = common.median_ms(ours, x, repeats=repeats)
        lines.append(f"| max pool 2x2 | {hw}x{hw}x{c} | {t_flax:.1f} | {t_ours:.1f} | "
                     f"{t_flax / t_ours:.2f} |")
        print(lines[-1], flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    define_flags()
    app.run(main)
