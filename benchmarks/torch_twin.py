"""The small-CNN training step in JAX and in an equivalent PyTorch implementation, side by side.

    python -m benchmarks.torch_twin [--repeats 10] [--batch 128]

Same architecture (Conv3x3(1->32)-ReLU-MaxPool2-Conv3x3(32->64)-ReLU-MaxPool2-Dense(3136->128)-
ReLU-Dense(128->10)), same loss (clean CE, PGD-AT-10 or TRADES-10 with beta 6, KL on summed
logits), same attack schedule (10 sign-gradient steps of eps/4, eps 0.1, projection to the
L-inf ball and [0, 1]; PGD-AT from a uniform start, TRADES from x + 0.001 N(0, I)), same
optimizer (SGD, Nesterov momentum 0.9, weight decay 5e-4). PyTorch (CPU build, benchmark-only
optional dependency: ``pip install torch==2.13.0``) runs eagerly with its default intra-op
threads. Medians over repeats after two warm-up steps; in every repeat both frameworks run one
step, in alternating order, in this one process.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import numpy as np

import tscnc_jax as tj
from tscnc_jax import training

EPS = 0.1
STEPS = 10


def _jax_step(loss: str, batch: dict):
    """A no-argument callable that runs one jitted training step and waits for it."""
    model = tj.create_model("small_cnn")
    tx = training.make_optimizer(0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    state = training.create_train_state(model, tx, jax.random.key(0), (28, 28, 1))
    attack = training.default_attack(loss, eps=EPS, steps=STEPS, step_size=EPS / 4)
    step = jax.jit(training.make_train_step(model, tx, loss=loss, attack=attack, beta=6.0,
                                            ema_decay=None), donate_argnums=0)
    holder = {"state": state}

    def run():
        holder["state"], metrics = step(holder["state"], batch)
        jax.block_until_ready(metrics)

    return run


def _torch_step(loss: str, batch: dict):
    """A no-argument callable that runs one eager PyTorch training step."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(3136, 128), nn.ReLU(), nn.Linear(128, 10),
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True,
                          weight_decay=5e-4)
    x = torch.from_numpy(batch["image"]).permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(batch["label"]).long()

    def attack():
        model.eval()
        if loss == "trades":
            with torch.no_grad():
                p_clean = F.softmax(model(x), dim=1)
            x_adv = (x + 0.001 * torch.randn_like(x)).clamp(0, 1)
        else:
            x_adv = (x + torch.empty_like(x).uniform_(-EPS, EPS)).clamp(0, 1)
        for _ in range(STEPS):
            x_adv.requires_grad_(True)
            out = model(x_adv)
            if loss == "trades":
                obj = F.kl_div(F.log_softmax(out, dim=1), p_clean, reduction="sum")
            else:
                obj = F.cross_entropy(out, y)
            (g,) = torch.autograd.grad(obj, x_adv)
            x_adv = x_adv.detach() + EPS / 4 * g.sign()
            x_adv = torch.min(torch.max(x_adv, x - EPS), x + EPS).clamp(0, 1)
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


def compare(batch_size: int, repeats: int) -> dict[str, dict[str, float]]:
    """``{loss: {"jax_s", "torch_s", "ratio"}}`` for clean, PGD-AT-10 and TRADES-10 steps on the
    same random batch, the two frameworks' steps interleaved in this process."""
    rng = np.random.default_rng(0)
    batch = {"image": rng.uniform(0, 1, (batch_size, 28, 28, 1)).astype(np.float32),
             "label": rng.integers(0, 10, batch_size).astype(np.int32)}
    rows = {}
    for loss in ("clean", "pgd_at", "trades"):
        t = interleaved_medians({"jax": _jax_step(loss, batch),
                                 "torch": _torch_step(loss, batch)}, repeats)
        jax_s, torch_s = t["jax"], t["torch"]
        rows[loss] = {"jax_s": jax_s, "torch_s": torch_s, "ratio": jax_s / torch_s}
        print(f"{loss}: JAX {jax_s * 1e3:.1f} ms, PyTorch {torch_s * 1e3:.1f} ms", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()
    try:
        import torch
    except ImportError as e:
        raise SystemExit("PyTorch is a benchmark-only dependency: pip install torch==2.13.0") from e
    lines = [
        "# Small CNN training step: JAX vs PyTorch",
        "",
        f"jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"{os.cpu_count()} cores; batch {args.batch}; median of {args.repeats} steps.",
        "",
        "| step | JAX ms | PyTorch ms | JAX / PyTorch time |",
        "|---|---:|---:|---:|",
    ]
    for loss, t in compare(args.batch, args.repeats).items():
        name = loss if loss == "clean" else f"{loss}-10"
        lines.append(f"| {name} | {t['jax_s'] * 1e3:.1f} | {t['torch_s'] * 1e3:.1f} | "
                     f"{t['ratio']:.2f} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
