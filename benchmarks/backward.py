"""Where an adversarial step's time goes: forward vs input gradient vs weight gradient.

    python -m benchmarks.backward [--repeats 10] [--batch 128] [--out FILE.md]

An attack iteration is a forward pass plus the gradient with respect to the *input*; the training
update adds the gradient with respect to the *weights*. This measures the three (median ms after
compilation) for the whole small CNN and VGG-16, and layer by layer for the small CNN (each conv
and ReLU + 2x2 max-pool alone on its real input shape, loss ``sum(out^2)``), so that speed work on
the attack loop knows which lowering to attack.
"""

from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from absl import app, flags

import tscnc_jax as tj
from benchmarks import common
from tscnc_jax import models

WHOLE = {"small_cnn": ({}, (28, 28, 1)), "vgg": ({"depth": 16}, (32, 32, 3))}

FLAGS = flags.FLAGS


def _three(apply, variables, x, repeats: int, loss=lambda out: jnp.sum(jnp.square(out))) -> dict:
    """Median ms of ``apply``, and of the gradients of ``loss(apply(v, x))`` wrt x and wrt v."""

    def total(v, z):
        return loss(apply(v, z))

    fns = {"forward": jax.jit(apply), "grad_input": jax.jit(jax.grad(total, argnums=1)),
           "grad_weights": jax.jit(jax.grad(total, argnums=0))}
    return {k: common.median_ms(f, variables, x, repeats=repeats) for k, f in fns.items()}


def whole_model(name: str, batch: int, repeats: int) -> dict:
    kwargs, shape = WHOLE[name]
    model = tj.create_model(name, **kwargs)
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, *shape)))
    x = jax.random.uniform(jax.random.key(1), (batch, *shape))
    y = jnp.zeros((batch,), jnp.int32)
    return _three(model.apply, variables, x, repeats, loss=lambda logits: jnp.sum(
        optax.softmax_cross_entropy_with_integer_labels(logits, y)))


def small_cnn_layers(batch: int, repeats: int) -> dict:
    out = {}
    for label, shape, features in (("Conv_0 28x28x1->32", (28, 28, 1), 32),
                                   ("Conv_1 14x14x32->64", (14, 14, 32), 64)):
        conv = models.Conv(features)
        x = jax.random.uniform(jax.random.key(1), (batch, *shape))
        variables = conv.init(jax.random.key(0), x[:1])
        out[label] = _three(conv.apply, variables, x, repeats)
    for label, shape in (("ReLU + pool 28x28x32", (28, 28, 32)),
                         ("ReLU + pool 14x14x64", (14, 14, 64))):
        x = jax.random.uniform(jax.random.key(1), (batch, *shape))
        ms = _three(lambda _, z: models.max_pool_2x2(nn.relu(z)), {}, x, repeats)
        ms.pop("grad_weights")
        out[label] = ms
    return out


def to_markdown(r: dict) -> str:
    lines = ["# Forward vs input gradient vs weight gradient", "",
             f"jax {jax.__version__}, {jax.default_backend()}, {os.cpu_count()} cores; batch "
             f"{r['batch']}; median of {r['repeats']} calls after compilation; ms.", "",
             "| part | forward | grad wrt input | grad wrt weights | input grad / forward |",
             "|---|---:|---:|---:|---:|"]
    rows = [(f"whole {k}", v) for k, v in r["whole"].items()] + list(r["layers"].items())
    for name, t in rows:
        gw = f"{t['grad_weights']:.1f}" if "grad_weights" in t else "-"
        lines.append(f"| {name} | {t['forward']:.1f} | {t['grad_input']:.1f} | {gw} | "
                     f"{t['grad_input'] / t['forward']:.1f} |")
    return "\n".join(lines) + "\n"


def define_flags() -> None:
    """This entry point's flags (defined when it runs as a program only; see :mod:`benchmarks`)."""
    flags.DEFINE_integer("repeats", 10, None)
    flags.DEFINE_integer("batch", 128, None)
    flags.DEFINE_string("out", None, None)


def main(argv) -> None:
    common.check_no_arguments(argv)
    r = {"machine": common.machine_info(), "batch": FLAGS.batch, "repeats": FLAGS.repeats,
         "whole": {name: whole_model(name, FLAGS.batch, max(1, FLAGS.repeats // 3)
                                     if name == "vgg" else FLAGS.repeats) for name in WHOLE},
         "layers": small_cnn_layers(FLAGS.batch, FLAGS.repeats)}
    common.report(to_markdown(r), r, FLAGS.out)


if __name__ == "__main__":
    define_flags()
    app.run(main)
