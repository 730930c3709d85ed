"""PyTorch twins of the benchmarked models, a weight converter, and side-by-side step timing.

    python -m benchmarks.torch_twin [--models small_cnn,vgg16,resnet18] [--repeats 5] [--batch 128]

Twins (same architecture, parameter names and initial-value layout as ours, so
:func:`state_dict_from_flax` maps one onto the other exactly):

* ``small_cnn``: Conv3x3(1->32)-ReLU-MaxPool2-Conv3x3(32->64)-ReLU-MaxPool2-Dense(3136->128)-ReLU-
  Dense(128->10); PyTorch flattens NCHW, so the converter permutes ``Dense_0``'s rows.
* ``vgg16``: the CIFAR VGG-16 (13 3x3 convs with bias, 5 max-pools, one Dense), no BatchNorm.
* ``resnet18``: the pre-activation ResNet-18 with BatchNorm (PyTorch momentum 0.1 is Flax's 0.9).
  A stride-2 3x3 conv pads (0, 1) like XLA's SAME, not PyTorch's symmetric (1, 1).

Same training step on both sides: loss (clean CE, PGD-AT-10 or TRADES-10 with beta 6, KL on summed
logits), attack schedule (10 sign-gradient steps of eps/4, eps 0.1 on 28x28 and 8/255 on 32x32,
projection to the L-inf ball and [0, 1]; PGD-AT from a uniform start, TRADES from x + 0.001 N(0,
I); the attack in evaluation mode), optimizer (SGD, Nesterov momentum 0.9, weight decay 5e-4).
PyTorch (CPU build, a benchmark-only optional dependency: ``pip install torch==2.13.0``) runs
eagerly with its default intra-op threads. In every repeat both frameworks run one step, in
alternating order, in this one process; medians after two warm-up steps.
"""

from __future__ import annotations

import os
import statistics
import time
from collections import OrderedDict

import jax
import numpy as np
from absl import app, flags

from benchmarks import common, train_step
from tscnc_jax import models as jax_models
from tscnc_jax import training

STEPS = 10
MODELS = ("small_cnn", "vgg16", "resnet18")

FLAGS = flags.FLAGS


# ----------------------------------------------------------------------------------------------
# Weight conversion (NumPy only: usable and testable without torch).
# ----------------------------------------------------------------------------------------------


def state_dict_from_flax(name: str, variables: dict) -> dict[str, np.ndarray]:
    """Our ``{"params", "batch_stats"}`` as the twin's ``state_dict`` (NumPy arrays).

    Conv kernels HWIO -> OIHW, Dense kernels (in, out) -> (out, in), BatchNorm ``scale`` ->
    ``weight`` and ``mean`` / ``var`` -> ``running_mean`` / ``running_var``. For the small CNN the
    first Dense reads a flattened NHWC map in JAX and an NCHW map in PyTorch: its input rows are
    permuted from (h, w, c) to (c, h, w) order.
    """
    if name not in MODELS:
        raise ValueError(f"no PyTorch twin for {name!r}; choose from {MODELS}")
    out: dict[str, np.ndarray] = {}

    def walk(tree: dict, prefix: str, stats: bool) -> None:
        for key, value in tree.items():
            path = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(value, path + ".", stats)
                continue
            a = np.asarray(value)
            if stats:
                out[f"{prefix}running_{key}"] = a
            elif key == "kernel" and a.ndim == 4:
                out[f"{prefix}weight"] = np.ascontiguousarray(a.transpose(3, 2, 0, 1))
            elif key == "kernel" and a.ndim == 2:
                if name == "small_cnn" and prefix == "Dense_0.":
                    c = 2 * jax_models.SmallCNN.width
                    side = int(round((a.shape[0] / c) ** 0.5))
                    a = a.reshape(side, side, c, -1).transpose(2, 0, 1, 3).reshape(a.shape)
                out[f"{prefix}weight"] = np.ascontiguousarray(a.T)
            elif key == "scale":
                out[f"{prefix}weight"] = a
            elif key == "bias":
                out[f"{prefix}bias"] = a
            else:
                raise ValueError(f"cannot convert parameter {path} of shape {a.shape}")

    walk(variables["params"], "", stats=False)
    walk(variables.get("batch_stats", {}), "", stats=True)
    return out


# ----------------------------------------------------------------------------------------------
# The twins.
# ----------------------------------------------------------------------------------------------


def torch_model(name: str):
    """The PyTorch twin of ``train_step.MODELS[name]`` (NCHW inputs)."""
    import torch.nn.functional as F
    from torch import nn

    if name == "small_cnn":
        w = jax_models.SmallCNN.width
        return nn.Sequential(OrderedDict(
            Conv_0=nn.Conv2d(1, w, 3, padding=1), relu_0=nn.ReLU(), pool_0=nn.MaxPool2d(2),
            Conv_1=nn.Conv2d(w, 2 * w, 3, padding=1), relu_1=nn.ReLU(), pool_1=nn.MaxPool2d(2),
            flatten=nn.Flatten(), Dense_0=nn.Linear(2 * w * 49, 4 * w), relu_2=nn.ReLU(),
            Dense_1=nn.Linear(4 * w, 10)))
    if name == "vgg16":
        layers: OrderedDict = OrderedDict()
        c_in, n_conv = 3, 0
        for i, item in enumerate(jax_models.VGG_CONFIGS[16]):
            if item == "M":
                layers[f"pool_{i}"] = nn.MaxPool2d(2)
                continue
            layers[f"Conv_{n_conv}"] = nn.Conv2d(c_in, item, 3, padding=1)
            layers[f"relu_{i}"] = nn.ReLU()
            c_in, n_conv = item, n_conv + 1
        layers["flatten"] = nn.Flatten()  # 1x1 after five pools: the spatial mean is a reshape
        layers["Dense_0"] = nn.Linear(c_in, 10)
        return nn.Sequential(layers)
    if name != "resnet18":
        raise ValueError(f"no PyTorch twin for {name!r}; choose from {MODELS}")

    def bn(c):
        return nn.BatchNorm2d(c, eps=1e-5, momentum=0.1)

    class SameConv(nn.Module):
        """3x3 conv with XLA's SAME padding: (1, 1) at stride 1, (0, 1) at stride 2."""

        def __init__(self, c_in, c_out, stride):
            super().__init__()
            self.stride = stride
            self.conv = nn.Conv2d(c_in, c_out, 3, stride, padding=1 if stride == 1 else 0,
                                  bias=False)

        def forward(self, x):
            return self.conv(x if self.stride == 1 else F.pad(x, (0, 1, 0, 1)))

    class PreActBlock(nn.Module):
        def __init__(self, c_in, c_out, stride):
            super().__init__()
            self.BatchNorm_0, self.BatchNorm_1 = bn(c_in), bn(c_out)
            self.shortcut = (nn.Conv2d(c_in, c_out, 1, stride, bias=False)
                             if c_in != c_out or stride != 1 else None)
            self.Conv_0 = SameConv(c_in, c_out, stride)
            self.Conv_1 = SameConv(c_out, c_out, 1)

        def forward(self, x):
            out = F.relu(self.BatchNorm_0(x))
            shortcut = x if self.shortcut is None else self.shortcut(out)
            y = F.relu(self.BatchNorm_1(self.Conv_0(out)))
            return self.Conv_1(y) + shortcut

    class PreActResNet18(nn.Module):
        def __init__(self):
            super().__init__()
            self.Conv_0 = SameConv(3, 64, 1)
            c_in, i = 64, 0
            for stage, mult in enumerate((1, 2, 4, 8)):
                for block in range(2):
                    stride = 2 if stage > 0 and block == 0 else 1
                    setattr(self, f"PreActBlock_{i}", PreActBlock(c_in, 64 * mult, stride))
                    c_in, i = 64 * mult, i + 1
            self.BatchNorm_0 = bn(c_in)
            self.Dense_0 = nn.Linear(c_in, 10)

        def forward(self, x):
            x = self.Conv_0(x)
            for i in range(8):
                x = getattr(self, f"PreActBlock_{i}")(x)
            return self.Dense_0(F.relu(self.BatchNorm_0(x)).mean(dim=(2, 3)))

    return PreActResNet18()


def _fix_same_conv_keys(module, sd: dict) -> dict:
    # SameConv wraps its conv: the twin's keys read "...Conv_0.conv.weight" where the
    # converter's read "...Conv_0.weight".
    names = {k.replace(".conv.", "."): k for k in module.state_dict()}
    return {names.get(k, k): v for k, v in sd.items()}


def build_twin(name: str, variables: dict):
    """The twin of ``name`` carrying ``variables`` (our Flax variables), in train mode."""
    import torch

    module = torch_model(name)
    sd = _fix_same_conv_keys(module, state_dict_from_flax(name, variables))
    sd = {k: torch.from_numpy(np.array(v)) for k, v in sd.items()}
    sd.update({k: v for k, v in module.state_dict().items() if k.endswith("num_batches_tracked")})
    module.load_state_dict(sd, strict=True)
    return module


# ----------------------------------------------------------------------------------------------
# Side-by-side step timing.
# ----------------------------------------------------------------------------------------------


def jax_train_step(name: str, loss: str):
    """``(step, state)``: our jitted training step matching the twin's (state donated) and its
    initial state."""
    make_model, shape = train_step.MODELS[name]
    tx = training.make_optimizer(0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    return common.jitted_train_step(make_model(), tx, shape, loss, train_step.EPS[name],
                                    attack_steps=STEPS, beta=6.0, ema_decay=None)


def _jax_step(name: str, loss: str, batch: dict):
    """A no-argument callable that runs one jitted training step of ours and waits for it."""
    step, state = jax_train_step(name, loss)
    holder = {"state": state}

    def run():
        holder["state"], metrics = step(holder["state"], batch)
        jax.block_until_ready(metrics)

    return run


def _torch_step(name: str, loss: str, batch: dict):
    """A no-argument callable that runs one eager PyTorch training step of the twin."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    # On the GPU when there is one (the accelerator check compares the two frameworks there).
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = torch_model(name).to(device)
    eps = train_step.EPS[name]
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True,
                          weight_decay=5e-4)
    x = torch.from_numpy(batch["image"]).permute(0, 3, 1, 2).contiguous().to(device)
    y = torch.from_numpy(batch["label"]).long().to(device)

    def attack():
        model.eval()
        if loss == "trades":
            with torch.no_grad():
                p_clean = F.softmax(model(x), dim=1)
            x_adv = (x + 0.001 * torch.randn_like(x)).clamp(0, 1)
        else:
            x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
        for _ in range(STEPS):
            x_adv.requires_grad_(True)
            out = model(x_adv)
            if loss == "trades":
                obj = F.kl_div(F.log_softmax(out, dim=1), p_clean, reduction="sum")
            else:
                obj = F.cross_entropy(out, y)
            (g,) = torch.autograd.grad(obj, x_adv)
            x_adv = x_adv.detach() + eps / 4 * g.sign()
            x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
        model.train()
        return x_adv.detach()

    def step():
        if loss == "clean":
            obj = F.cross_entropy(model(x), y)
        else:
            x_adv = attack()
            if loss == "pgd_at":
                obj = F.cross_entropy(model(x_adv), y)
            else:
                logits = model(x)
                kl = F.kl_div(F.log_softmax(model(x_adv), dim=1), F.softmax(logits, dim=1),
                              reduction="sum") / x.shape[0]
                obj = F.cross_entropy(logits, y) + 6.0 * kl
        opt.zero_grad(set_to_none=True)
        obj.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()  # the step is timed to its end, as the JAX one is

    return step


def interleaved_medians(fns: dict, repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds of each no-argument callable, timed in alternating order within every
    repeat (``a b``, then ``b a``, ...) so that drift in the machine's speed, and whatever one
    framework leaves running, hit both sides alike."""
    names = list(fns)
    times = {n: [] for n in names}
    for i in range(warmup + repeats):
        for n in (names if i % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            fns[n]()
            if i >= warmup:
                times[n].append(time.perf_counter() - t0)
    return {n: statistics.median(t) for n, t in times.items()}


def compare(batch_size: int, repeats: int, models=("small_cnn",),
            losses=("clean", "pgd_at", "trades")) -> dict[str, dict[str, dict[str, float]]]:
    """``{model: {loss: {"jax_s", "torch_s", "ratio"}}}`` on one random batch per model, the two
    frameworks' steps interleaved in this process."""
    rng = np.random.default_rng(0)
    rows: dict = {}
    for name in models:
        batch = common.random_batch(rng, batch_size, train_step.MODELS[name][1])
        rows[name] = {}
        for loss in losses:
            t = interleaved_medians({"jax": _jax_step(name, loss, batch),
                                     "torch": _torch_step(name, loss, batch)}, repeats)
            rows[name][loss] = {"jax_s": t["jax"], "torch_s": t["torch"],
                                "ratio": t["jax"] / t["torch"]}
            print(f"{name} {loss}: JAX {t['jax'] * 1e3:.1f} ms, PyTorch {t['torch'] * 1e3:.1f} ms",
                  flush=True)
    return rows


def to_markdown(rows: dict) -> list[str]:
    lines = ["| model | step | JAX ms | PyTorch ms | JAX / PyTorch time |",
             "|---|---|---:|---:|---:|"]
    for name, losses in rows.items():
        for loss, t in losses.items():
            step = loss if loss == "clean" else f"{loss}-10"
            lines.append(f"| {name} | {step} | {t['jax_s'] * 1e3:.1f} | {t['torch_s'] * 1e3:.1f} "
                         f"| {t['ratio']:.2f} |")
    return lines


def define_flags() -> None:
    """This entry point's flags (defined when it runs as a program only; see :mod:`benchmarks`)."""
    flags.DEFINE_string("models", ",".join(MODELS), None)
    flags.DEFINE_integer("repeats", 5, None)
    flags.DEFINE_integer("batch", 128, None)


def main(argv) -> None:
    common.check_no_arguments(argv)
    torch = common.require_torch()
    names = [m for m in FLAGS.models.split(",") if m]
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        raise app.UsageError(f"--models: no twin for {unknown}; choose from {MODELS}")
    lines = ["# Training step: JAX vs PyTorch", "",
             f"jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} "
             f"threads), {os.cpu_count()} cores; batch {FLAGS.batch}; median of {FLAGS.repeats} "
             "interleaved steps.", ""]
    lines += to_markdown(compare(FLAGS.batch, FLAGS.repeats, names))
    print("\n".join(lines))


if __name__ == "__main__":
    define_flags()
    app.run(main)
