"""Per-convolution passes, ours (XLA:CPU) against PyTorch (oneDNN), at ResNet-18's shapes.

    python -m benchmarks.conv_passes [--batch 128] [--repeats 7]

For every distinct convolution of the pre-activation ResNet-18 on 32x32 inputs (SAME padding;
PyTorch pads stride-2 3x3 convs (0, 1) as XLA does): the forward, the input gradient and the
weight gradient, each jitted on its own (ours: :class:`tscnc_jax.models.Conv`'s XLA path with
its custom derivative) or called on its own (PyTorch: ``F.conv2d``, and
``torch.nn.grad.conv2d_input`` / ``conv2d_weight``, which compute one gradient each). Medians of
interleaved calls, milliseconds; the totals weight each shape by how often the model has it
(the stem, a 3-channel im2col conv, is left out). A training step's attack iterations are
forward + input gradient; only the final backward computes weight gradients.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from absl import app, flags

from benchmarks import common, torch_twin
from tscnc_jax import models

# (spatial size, c_in, c_out, kernel, stride, how many in ResNet-18)
RESNET18_CONVS = (
    (32, 64, 64, 3, 1, 4), (32, 64, 128, 3, 2, 1), (32, 64, 128, 1, 2, 1),
    (16, 128, 128, 3, 1, 3), (16, 128, 256, 3, 2, 1), (16, 128, 256, 1, 2, 1),
    (8, 256, 256, 3, 1, 3), (8, 256, 512, 3, 2, 1), (8, 256, 512, 1, 2, 1),
    (4, 512, 512, 3, 1, 3),
)
PASSES = ("forward", "input_grad", "weight_grad")

FLAGS = flags.FLAGS


def _ours(x, w, g, stride):
    """``{pass: no-argument callable returning its result}`` (NHWC / HWIO)."""
    def conv(a, b):
        return models._xla_conv(a, b, (stride, stride), "SAME")

    fns = {
        "forward": jax.jit(conv).lower(x, w).compile(),
        "input_grad": jax.jit(lambda a, b, c: jax.vjp(lambda z: conv(z, b), a)[1](c)[0]).lower(
            x, w, g).compile(),
        "weight_grad": jax.jit(lambda a, b, c: jax.vjp(lambda z: conv(a, z), b)[1](c)[0]).lower(
            x, w, g).compile(),
    }
    args = {"forward": (x, w), "input_grad": (x, w, g), "weight_grad": (x, w, g)}
    return {p: (lambda f=f, a=args[p]: f(*a).block_until_ready()) for p, f in fns.items()}


def _theirs(x, w, g, stride):
    """The same passes in PyTorch (NCHW / OIHW results)."""
    import torch
    import torch.nn.functional as F
    from torch.nn import grad as nn_grad

    xt = torch.from_numpy(np.asarray(x)).permute(0, 3, 1, 2).contiguous()
    wt = torch.from_numpy(np.asarray(w)).permute(3, 2, 0, 1).contiguous()
    gt = torch.from_numpy(np.asarray(g)).permute(0, 3, 1, 2).contiguous()
    k = wt.shape[-1]
    if stride == 2 and k == 3:  # XLA's SAME: one extra row / column at the end
        xt = F.pad(xt, (0, 1, 0, 1))
        pad = 0
    else:
        pad = (k - 1) // 2

    def fwd():
        with torch.no_grad():
            return F.conv2d(xt, wt, stride=stride, padding=pad)

    def dx():
        out = nn_grad.conv2d_input(xt.shape, wt, gt, stride=stride, padding=pad)
        return out[:, :, :x.shape[1], :x.shape[2]]  # drop the padded row / column

    def dw():
        return nn_grad.conv2d_weight(xt, wt.shape, gt, stride=stride, padding=pad)

    return {"forward": fwd, "input_grad": dx, "weight_grad": dw}


def compare(batch: int, repeats: int, shapes=RESNET18_CONVS) -> dict:
    rng = np.random.default_rng(0)
    rows = []
    for h, c_in, c_out, k, stride, count in shapes:
        x = rng.standard_normal((batch, h, h, c_in)).astype(np.float32)
        w = (rng.standard_normal((k, k, c_in, c_out)) / np.sqrt(k * k * c_in)).astype(np.float32)
        h_out = -(-h // stride)
        g = rng.standard_normal((batch, h_out, h_out, c_out)).astype(np.float32)
        ours, theirs = _ours(x, w, g, stride), _theirs(x, w, g, stride)
        row = {"shape": f"{h}x{h}x{c_in}->{c_out}, {k}x{k}/{stride}", "count": count}
        for p in PASSES:
            t = torch_twin.interleaved_medians({"ours": ours[p], "torch": theirs[p]}, repeats)
            row[p] = {"ours_ms": 1e3 * t["ours"], "torch_ms": 1e3 * t["torch"]}
        rows.append(row)
        print(row["shape"], {p: (round(row[p]["ours_ms"], 1), round(row[p]["torch_ms"], 1))
                             for p in PASSES}, flush=True)
    totals = {p: {s: sum(r["count"] * r[p][s] for r in rows) for s in ("ours_ms", "torch_ms")}
              for p in PASSES}
    return {"batch": batch, "repeats": repeats, "rows": rows, "totals": totals}


def to_markdown(r: dict) -> list[str]:
    head = " | ".join(f"{p.replace('_', ' ')} ours / PyTorch ms" for p in PASSES)
    lines = [f"| conv (count) | {head} |", "|---|" + "---:|" * len(PASSES)]

    def cells(d):
        return " | ".join(f"{d[p]['ours_ms']:.1f} / {d[p]['torch_ms']:.1f} "
                          f"({d[p]['ours_ms'] / d[p]['torch_ms']:.2f})" for p in PASSES)

    for row in r["rows"]:
        lines.append(f"| {row['shape']} ({row['count']}) | {cells(row)} |")
    lines.append(f"| ResNet-18 total, weighted by count | {cells(r['totals'])} |")
    return lines


def define_flags() -> None:
    """This entry point's flags (defined when it runs as a program only; see :mod:`benchmarks`)."""
    flags.DEFINE_integer("batch", 128, None)
    flags.DEFINE_integer("repeats", 7, None)


def main(argv) -> None:
    common.check_no_arguments(argv)
    if FLAGS.batch < 1 or FLAGS.repeats < 1:
        raise app.UsageError("--batch and --repeats must be >= 1")
    torch = common.require_torch()
    lines = ["# Convolution passes: ours vs PyTorch", "",
             f"jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} "
             f"threads), {os.cpu_count()} cores; batch {FLAGS.batch}; median of {FLAGS.repeats} "
             "interleaved calls; ratio ours / PyTorch in brackets.", ""]
    lines += to_markdown(compare(FLAGS.batch, FLAGS.repeats))
    print("\n".join(lines))


if __name__ == "__main__":
    define_flags()
    app.run(main)
